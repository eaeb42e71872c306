"""Errors a user can act on.

Every error raised for bad input derives from `KVStudioError`, whose message names what was
wrong and what to do. The CLI prints these as one line; the GUI shows them in a dialog.
Anything else that escapes is a bug.
"""


class KVStudioError(Exception):
    """An error with a message meant for the user."""


class ModelLoadError(KVStudioError):
    """A model spec could not be turned into a model."""


class PolicyConfigError(KVStudioError):
    """A policy was given parameters it cannot work with."""


class PolicyError(KVStudioError):
    """A policy misbehaved during a run (returned bad indices, exceeded its budget, raised)."""


class PromptError(KVStudioError):
    """A prompt or prompt file cannot be used."""
