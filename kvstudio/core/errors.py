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


class SavedCacheError(KVStudioError):
    """A saved cache cannot be written, read or used here; the message says which and why.
    `problem`, for a file that cannot be read at all, says what is wrong with it in a word or two
    (listings show it): 'truncated', 'corrupt', 'format version 2', 'not a saved cache', 'unreadable'."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(error, RuntimeError):
        text = str(error)
        return "can't allocate memory" in text or "out of memory" in text.lower()
    return False
