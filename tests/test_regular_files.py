"""Special files: a prompt file or a document that is a device, a FIFO or a symlink to one is refused
before it is read, and a file over the limit is refused before a byte is read. Real files, real
FIFOs, the real /dev/zero."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstudio.cli.dispatch import main
from kvstudio.core.io.documents import read_document
from kvstudio.core.errors import PromptError
from kvstudio.core.io.regular_files import read_regular_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")


def special_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what the refusal must say)."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    zero_link = tmp_path / "zero.txt"
    zero_link.symlink_to("/dev/zero")
    dangling = tmp_path / "gone.txt"
    dangling.symlink_to(tmp_path / "never-was.txt")
    folder = tmp_path / "folder.md"
    folder.mkdir()
    return {"device": (Path("/dev/zero"), "is a character device, not a regular file"),
            "symlink to a device": (zero_link, "is a character device (a symlink to /dev/zero), not a regular file"),
            "fifo without a writer": (fifo, "is a FIFO (named pipe), not a regular file"),
            "dangling symlink": (dangling, "which does not exist"),
            "folder": (folder, "is a folder, not a regular file")}


@pytest.mark.timeout(60)
def test_special_files_are_refused_without_reading_them(tmp_path):
    for name, (path, message) in special_files(tmp_path).items():
        with pytest.raises(PromptError) as caught:
            read_regular_file(path, 1000, "prompt file")
        assert message in str(caught.value) and str(path) in str(caught.value), (name, str(caught.value))


@pytest.mark.timeout(60)
def test_a_fifo_with_a_writer_is_refused_and_nothing_is_read_from_it(tmp_path):
    fifo = tmp_path / "fed.txt"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # Linux: both ends at once, never blocks
    try:
        os.write(writer, b"endless stream " * 100)
        with pytest.raises(PromptError, match="fed.txt is a FIFO"):
            read_document(fifo)
        assert os.read(writer, 1500) == b"endless stream " * 100  # every byte still in the pipe
    finally:
        os.close(writer)


def test_size_is_capped_before_reading(tmp_path):
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as stream:  # sparse: 64 GiB claimed, nothing on disk
        stream.truncate(64 * 2**30)
    with pytest.raises(PromptError, match=r"huge.txt is 64.0 GiB, above the 20.0 MiB limit: give a smaller file"):
        read_document(huge)
    exact = tmp_path / "exact.txt"
    exact.write_bytes(b"a" * 1000)
    assert read_regular_file(exact, 1000, "prompt file") == b"a" * 1000
    with pytest.raises(PromptError, match="exact.txt is 1000 B, above the 999 B limit"):
        read_regular_file(exact, 999, "prompt file")


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    target = tmp_path / "real.md"
    target.write_text("kept as text")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    assert read_document(link).text == "kept as text"


def test_a_pdf_symlinked_to_a_device_is_refused(tmp_path):
    link = tmp_path / "paper.pdf"
    link.symlink_to("/dev/zero")
    with pytest.raises(PromptError, match="paper.pdf is a character device"):
        read_document(link)


def test_a_hostile_pdf_is_a_refusal_whatever_the_parser_raises(tmp_path):
    path = tmp_path / "loop.pdf"
    # A page tree whose Kids point back at itself: the parser recurses or fails in its own way.
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
                     b"2 0 obj << /Type /Pages /Kids [2 0 R] /Count 1 >> endobj\n"
                     b"trailer << /Root 1 0 R >>\n%%EOF\n")
    with pytest.raises(PromptError, match="loop.pdf"):
        read_document(path)


@pytest.mark.timeout(60)
def test_the_cli_refuses_a_device_prompt_file_in_one_line(tmp_path, capsys):
    link = tmp_path / "prompt.txt"
    link.symlink_to("/dev/zero")
    code = main(["run", "--model", "tiny-llama", "--prompt-file", str(link)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"kvstudio: error: prompt file {link} is a character device (a symlink to /dev/zero), "
                           "not a regular file: give a text file")
    assert "out of memory" not in err
