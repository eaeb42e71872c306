"""Subcommands of `kvstudio` that live in their own modules: each exposes `add_parser(subparsers)`
and `run(args) -> int`, and cli.py hooks them in."""
