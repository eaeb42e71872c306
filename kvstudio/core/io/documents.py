"""Documents a user drops onto the studio: text files and PDFs, read with clear refusals.

Accepted: .txt .md .py .json .jsonl and names without a suffix (UTF-8 text) and .pdf (text
extracted with pypdf). Anything else, anything binary, unreadable, empty or over the size limit is
refused with a message that says which and why; nothing is half-added. The CLI's --prompt-file
reads through here too (any suffix read as text), so both say the same about the same file.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

from kvstudio.core.errors import PromptError
from kvstudio.core.io.prompts import MAX_PROMPT_BYTES, read_text_file
from kvstudio.core.io.regular_files import check_regular_file, read_regular_file

TEXT_SUFFIXES = (".txt", ".md", ".py", ".json", ".jsonl")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + (".pdf",)


@dataclass(frozen=True)
class Document:
    name: str
    path: str | None  # None for text dropped or pasted directly
    text: str


def read_document(path: str | Path, max_bytes: int = MAX_PROMPT_BYTES, what: str = "document",
                  any_suffix: bool = False) -> Document:
    """The document, or PromptError saying why not. Never anything else: a hostile file (a device,
    a FIFO, a PDF that makes the parser fail in any way, one that runs memory out) is a refusal.
    `any_suffix`: read every name but .pdf as text (a prompt file), instead of refusing unknown types."""
    path = Path(path).expanduser()
    check_regular_file(path, max_bytes, what)  # what the path is comes before what its name says
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES and suffix and not any_suffix:
        raise PromptError(f"{path.name}: unsupported file type '{suffix}'; use {', '.join(DOCUMENT_SUFFIXES)}")
    try:
        text = _read_pdf(path, max_bytes, what) if suffix == ".pdf" else \
            read_text_file(path, max_bytes, what, "a UTF-8 text file or a PDF")
    except MemoryError:
        raise PromptError(f"{path.name} does not fit in memory once read: give a smaller document") from None
    return Document(path.name, str(path), text)


def _read_pdf(path: Path, max_bytes: int, what: str) -> str:
    data = read_regular_file(path, max_bytes, what)  # a regular file, under the limit, read once
    from pypdf import PdfReader

    quiet = logging.getLogger("pypdf")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings about a broken file would print beside our one-line refusal
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise PromptError(f"{path.name} is an encrypted PDF: save an unencrypted copy first")
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PromptError, MemoryError):
        raise
    except Exception as error:  # pypdf raises many kinds on malformed files; all mean "not readable"
        raise PromptError(f"{path.name} could not be read as a PDF ({type(error).__name__}: {error}): give a PDF "
                          "that opens in a PDF viewer, or its text as a .txt file") from error
    finally:
        quiet.setLevel(level)
    if not text.strip():
        raise PromptError(f"{path.name} holds no extractable text (a scanned PDF?)")
    return text
