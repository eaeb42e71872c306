"""Reading prompts and documents from files, with a clear error for everything that is not text."""

from __future__ import annotations

from pathlib import Path

from kvstudio.core.errors import PromptError
from kvstudio.core.io.regular_files import read_regular_file

MAX_PROMPT_BYTES = 20 * 1024 * 1024  # a 20 MB text is ~5M tokens: far past any model's context
_SNIFF_BYTES = 8192


def read_text_file(path: str | Path, max_bytes: int = MAX_PROMPT_BYTES, what: str = "prompt file",
                   wanted: str = "a UTF-8 text file") -> str:
    """The file's text, or PromptError saying why it cannot be a prompt. Devices, FIFOs and other
    special files are refused, and the size is capped before anything is read (regular_files)."""
    path = Path(path).expanduser()
    data = read_regular_file(path, max_bytes, what)
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise PromptError(f"{path} looks binary (it contains NUL bytes): give {wanted}")
    try:
        text = data.decode("utf-8-sig")
    except MemoryError:
        raise PromptError(f"out of memory decoding the {what} {path} ({len(data) / 2**20:.1f} MiB): "
                          "give a smaller file") from None
    except UnicodeDecodeError as error:
        raise PromptError(f"{path} is not UTF-8 text (bad byte at offset {error.start}): "
                          "save it as UTF-8 or give another file") from error
    if not text.strip():
        raise PromptError(f"{path} is empty")
    return text
