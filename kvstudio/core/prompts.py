"""Reading prompts and documents from files, with a clear error for everything that is not text."""

from __future__ import annotations

from pathlib import Path

from .errors import PromptError

MAX_PROMPT_BYTES = 20 * 1024 * 1024  # a 20 MB text is ~5M tokens: far past any model's context
_SNIFF_BYTES = 8192


def read_text_file(path: str | Path, max_bytes: int = MAX_PROMPT_BYTES) -> str:
    """The file's text, or PromptError saying why it cannot be a prompt."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PromptError(f"prompt file not found: {path}")
    if path.is_dir():
        raise PromptError(f"{path} is a folder, not a text file")
    size = path.stat().st_size
    if size > max_bytes:
        raise PromptError(f"{path} is {size / 2**20:.1f} MiB, above the {max_bytes / 2**20:.0f} MiB limit for a prompt")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PromptError(f"cannot read {path}: {error.strerror or error}") from error
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise PromptError(f"{path} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptError(f"{path} is not UTF-8 text (bad byte at offset {error.start}): "
                          "save it as UTF-8 or give another file") from error
    if not text.strip():
        raise PromptError(f"{path} is empty")
    return text
