"""The headless front end, `kvstudio <command>`: the dispatcher, options shared by every command, and one module per command."""

from kvstudio.cli.dispatch import main

__all__ = ["main"]
