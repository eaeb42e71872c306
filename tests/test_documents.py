"""Reading dropped documents: text, PDF, and a clear refusal for everything else."""

from __future__ import annotations

import os

import pytest

from kvstudio.core.io.documents import read_document
from kvstudio.core.errors import PromptError


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, written by hand: a real file, no generator."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_text_is_extracted(tmp_path):
    path = tmp_path / "paper.pdf"
    path.write_bytes(minimal_pdf("Attention sinks keep the first tokens"))
    document = read_document(path)
    assert document.text == "Attention sinks keep the first tokens" and document.name == "paper.pdf"


@pytest.mark.parametrize("name, content, message", [
    ("broken.pdf", b"%PDF-1.4 then nothing", "could not be read as a PDF"),
    ("fake.pdf", bytes(range(256)) * 8, "fake.pdf could not be read as a PDF"),  # binary garbage named .pdf
    ("blob", b"\x00\x01\x02" * 100, "looks binary .* give a UTF-8 text file or a PDF"),  # no suffix: read as text
    ("README", b"plain words", None),
    ("photo.jpg", b"\xff\xd8\xff", "unsupported file type '.jpg'"),
    ("data.json", b"\x00\x00\x00\x01", "looks binary"),
    ("empty.md", b"   \n", "is empty"),
    ("notes.txt", "café".encode("cp1252"), "not UTF-8"),
])
def test_bad_documents_are_refused_with_the_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    if message is None:
        assert read_document(path).text == content.decode()
        return
    with pytest.raises(PromptError, match=message):
        read_document(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_named_as_one_whatever_its_name(tmp_path):
    """What the path is comes first: /dev/zero is a character device, not an 'unsupported file type'."""
    with pytest.raises(PromptError, match="document /dev/zero is a character device, not a regular file"):
        read_document("/dev/zero")
    link = tmp_path / "picture.png"
    link.symlink_to("/dev/zero")
    with pytest.raises(PromptError, match="picture.png is a character device"):
        read_document(link)


def test_the_cli_prompt_file_and_the_studio_say_the_same(tmp_path, capsys):
    """One reader: a fake PDF given as --prompt-file is refused as a PDF, as the studio refuses it, and
    a real PDF is read."""
    from .helpers import run_cli

    fake = tmp_path / "fake.pdf"
    fake.write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt-file", str(fake), "--no-history")
    assert code == 2 and "fake.pdf could not be read as a PDF" in err and err.count("\n") == 1
    paper = tmp_path / "paper.pdf"
    paper.write_bytes(minimal_pdf("Sinks"))
    code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt-file", str(paper), "--no-history",
                             "--max-new-tokens", "2")
    assert code == 0, err


def test_oversized_documents_are_refused(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 5000)
    with pytest.raises(PromptError, match="above the 0 MiB limit|limit"):
        read_document(path, max_bytes=1000)
    assert read_document(path).text == "x" * 5000


def test_text_documents_keep_their_text(tmp_path):
    path = tmp_path / "code.py"
    path.write_text("def f():\n    return 'ünïcode'\n", encoding="utf-8")
    assert read_document(path).text == "def f():\n    return 'ünïcode'\n"
