"""Files KV Studio writes get the permissions a plain open() would give (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from kvstudio.core.io.atomic import atomic_produce, atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_0666_less_the_umask_like_open(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as stream:
        stream.write("x")
    written = atomic_write(tmp_path / "atomic.json", lambda stream: stream.write("{}"))
    produced = atomic_produce(tmp_path / "figure.png", lambda temporary: temporary.write_bytes(b"png"))
    assert _mode(written) == _mode(produced) == _mode(tmp_path / "plain.txt") == 0o666 & ~mask


def test_an_existing_file_keeps_its_permissions(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "run.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write(target, lambda stream: stream.write("new"))
    assert target.read_text() == "new" and _mode(target) == 0o640
