"""Documents a user drops onto the studio: text files and PDFs, read with clear refusals.

Accepted: .txt .md .py .json .jsonl (UTF-8 text) and .pdf (text extracted with pypdf). Anything
else, anything binary, unreadable, empty or over the size limit is refused with a message that
says which and why; nothing is half-added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError
from .prompts import MAX_PROMPT_BYTES, read_text_file

TEXT_SUFFIXES = (".txt", ".md", ".py", ".json", ".jsonl")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + (".pdf",)


@dataclass(frozen=True)
class Document:
    name: str
    path: str | None  # None for text dropped or pasted directly
    text: str


def read_document(path: str | Path, max_bytes: int = MAX_PROMPT_BYTES) -> Document:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        raise PromptError(f"{path.name}: unsupported file type '{suffix or 'none'}'; "
                          f"use {', '.join(DOCUMENT_SUFFIXES)}")
    text = _read_pdf(path, max_bytes) if suffix == ".pdf" else read_text_file(path, max_bytes)
    return Document(path.name, str(path), text)


def _read_pdf(path: Path, max_bytes: int) -> str:
    if not path.is_file():
        raise PromptError(f"file not found: {path}")
    if path.stat().st_size > max_bytes:
        raise PromptError(f"{path.name} is larger than the {max_bytes / 2**20:.0f} MiB limit")
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise PromptError(f"{path.name} is an encrypted PDF: save an unencrypted copy first")
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except PromptError:
        raise
    except (PdfReadError, OSError, ValueError, KeyError) as error:
        raise PromptError(f"{path.name} is not a readable PDF: {error}") from error
    if not text.strip():
        raise PromptError(f"{path.name} holds no extractable text (a scanned PDF?)")
    return text
