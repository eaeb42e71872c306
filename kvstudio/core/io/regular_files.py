"""Reading a file a user named, safely: only regular files, and never more than a limit.

A prompt file or a dropped document may be anything with a path: `/dev/zero` (endless), a FIFO
(blocks until someone writes, then may never end), a socket, a symlink to one of those. Reading
such a thing "to the end" runs the process out of memory. `read_regular_file` looks at what the
path is before opening it (opening some devices has effects), opens without blocking, checks the
opened file again (the path may have been swapped in between), refuses anything that is not a
regular file, refuses a file over the size limit before reading, and reads at most limit + 1
bytes, so a file that grows while being read is refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kvstudio.core.errors import PromptError
from kvstudio.core.units import format_bytes

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | Path, max_bytes: int, what: str = "file",
                      error: type[Exception] = PromptError) -> bytes:
    """The bytes of `path`, or `error` naming the file and why: missing, not a regular file (a
    device, FIFO, socket, folder, or a symlink to one), unreadable, or larger than `max_bytes`."""
    path = Path(path).expanduser()
    shown = f"{what} {path}"
    check_regular_file(path, max_bytes, what, error)
    try:
        # O_NONBLOCK: if the path became a FIFO since the stat, opening it must not wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as problem:
        raise error(f"cannot read {shown}: {problem.strerror or problem}") from problem
    with os.fdopen(descriptor, "rb") as stream:
        _check(os.fstat(descriptor), shown, path, max_bytes, error)  # the file actually opened
        try:
            data = stream.read(max_bytes + 1)
        except OSError as problem:
            raise error(f"cannot read {shown}: {problem.strerror or problem}") from problem
        except MemoryError:
            raise error(f"{shown} does not fit in memory: give a smaller file") from None
    if len(data) > max_bytes:
        raise error(f"{shown} grew past the {format_bytes(max_bytes)} limit while being read: give a smaller file")
    return data


def check_regular_file(path: str | Path, max_bytes: int, what: str = "file",
                       error: type[Exception] = PromptError) -> None:
    """Refuse, as read_regular_file does, what `path` is before anything is opened: missing, not a
    regular file, over the limit. Callers that judge a file by its name check this first, so
    `/dev/zero` is called a device, not an unsupported type."""
    path = Path(path).expanduser()
    shown = f"{what} {path}"
    if path.is_symlink() and not path.exists():
        raise error(f"{shown} is a symlink to {os.readlink(path)}, which does not exist")
    try:
        status = os.stat(path)  # follows symlinks: what a symlink points to is what would be read
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as problem:
        raise error(f"cannot read {shown}: {problem.strerror or problem}") from problem
    _check(status, shown, path, max_bytes, error)


def _check(status: os.stat_result, shown: str, path: Path, max_bytes: int, error) -> None:
    if not stat.S_ISREG(status.st_mode):
        target = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise error(f"{shown} is {kind_of(status.st_mode)}{target}, not a regular file: give a text file")
    if status.st_size > max_bytes:
        raise error(f"{shown} is {format_bytes(status.st_size)}, above the {format_bytes(max_bytes)} limit: give a smaller file")
