"""Writing files so that a reader never sees half of one.

Everything KV Studio saves (run exports, JSON, CSV, arrays) is written to a temporary file beside
the target, flushed to disk, then renamed over the target in one step. An interruption at any
point leaves the previous file as it was and no temporary file behind. A write that fails (disk
full, the file-size limit, a folder where the file should go) is one KVStudioError naming the file
and saying that what was there is unchanged.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvstudio.core.errors import KVStudioError


def check_writable_folder(path: str | Path, error: type[KVStudioError] = KVStudioError) -> None:
    """Refuse, before any work, a file whose folder is missing or read-only (raises `error`)."""
    path = Path(path)
    if path.expanduser().is_dir():
        raise error(f"cannot write {path}: it is a folder; give a file name (e.g. {Path(path, 'run.json')})")
    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        raise error(f"cannot write {path}: the folder does not exist ({folder})")
    if not os.access(folder, os.W_OK):
        raise error(f"cannot write {path}: the folder is not writable ({folder})")


def _current_umask() -> int:
    """The process's umask. Linux says it in /proc without changing it; elsewhere it is set and put
    back at once (os.umask is the only portable way to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_plain_permissions(temporary: str | Path, path: Path) -> None:
    """What open(path, "w") would have left: an existing file keeps its mode, a new one 0666 & ~umask."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_current_umask()
    os.chmod(temporary, mode)


def _failed(path: Path, problem: OSError, error: type[KVStudioError]) -> KVStudioError:
    kept = "the file there is unchanged" if path.is_file() else "nothing was written"
    return error(f"could not write {path}: {problem.strerror or problem}; {kept}")


def atomic_write(path: str | Path, write: Callable, binary: bool = False,
                 error: type[KVStudioError] = KVStudioError) -> Path:
    """Call write(handle) on a temporary file, then replace `path` with it. A failing write raises
    `error`, and leaves what was at `path` as it was."""
    path = Path(path).expanduser()
    try:
        _write_and_replace(path, write, binary)
    except OSError as problem:
        raise _failed(path, problem, error) from problem
    return path


def _write_and_replace(path: Path, write: Callable, binary: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(21, "it is a folder; give a file name")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8",
                                                                               "newline": ""})) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        _give_plain_permissions(temporary, path)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_produce(path: str | Path, produce: Callable[[Path], None]) -> Path:
    """For writers that want a file name (image exporters): produce(temporary path), then rename.
    A failing write raises KVStudioError, as atomic_write does."""
    path = Path(path).expanduser()
    try:
        _produce_and_replace(path, produce)
    except OSError as problem:
        raise _failed(path, problem, KVStudioError) from problem
    return path


def _produce_and_replace(path: Path, produce: Callable[[Path], None]) -> None:
    if path.is_dir():
        raise IsADirectoryError(21, "it is a folder; give a file name")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        produce(Path(temporary))
        if Path(temporary).stat().st_size == 0:
            raise OSError(f"nothing was written for {path.name}")
        _give_plain_permissions(temporary, path)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
