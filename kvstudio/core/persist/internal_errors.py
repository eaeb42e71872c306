"""The last net: an exception nobody expected becomes one line and a report file.

Every error a user can cause is a KVStudioError raised where the input is read (a model folder,
the history, a file, an argument). What is left is a bug in KV Studio. The entry points (the CLI's
main, the studio's task runner, the studio's event loop) hand it here: the traceback and the
versions that matter go into a report file under the data folder (`reports/`), and the user reads
one line, "internal error: ...; details in FILE". The process or the window carries on where it can.

Writing the report never raises: when the data folder cannot hold it (it is a file, it is full),
the report goes to the temporary folder, and when that fails too the line says so.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from kvstudio.core.plugins.loader import user_data_dir

REPORTS_FOLDER = "reports"
KEEP_REPORTS = 50  # older reports are removed: a loop of failures must not fill the disk
PACKAGES = ("kvstudio", "torch", "transformers", "tokenizers", "safetensors", "PySide6-Essentials", "pyqtgraph",
            "numpy")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def internal_error_line(error: BaseException, where: str) -> str:
    """Write a report of `error` (raised by `where`: "kvstudio run", "the studio's run task") and
    return the line to show: 'internal error: TypeError: ...; details in FILE'."""
    text = first_line(error)
    line = f"internal error: {type(error).__name__}" + (f": {text}" if text else "")
    try:
        path = write_report(error, where)
    except Exception as problem:  # noqa: BLE001 - the net itself must never be what escapes
        return f"{line} (no report could be written: {first_line(problem) or type(problem).__name__})"
    return f"{line}; details in {path}"


def write_report(error: BaseException, where: str) -> Path:
    body = "".join([
        f"KV Studio internal error in {where}\n",
        f"time: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n",
        f"command: {' '.join(sys.argv)!r}\n",
        f"python: {sys.version.split()[0]} ({platform.platform()})\n",
        *(f"{name}: {_version(name)}\n" for name in PACKAGES),
        "\n",
        *traceback.format_exception(type(error), error, error.__traceback__),
    ])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"internal-error-{stamp}-{os.getpid()}-{id(error) % 10**6}.txt"
    for folder in (user_data_dir() / REPORTS_FOLDER, Path(tempfile.gettempdir()) / f"kvstudio-{REPORTS_FOLDER}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(body, encoding="utf-8", errors="backslashreplace")
        except OSError:
            continue
        _prune(folder)
        return path
    raise OSError("neither the data folder nor the temporary folder could hold it")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _prune(folder: Path) -> None:
    try:
        reports = sorted(folder.glob("internal-error-*.txt"), key=lambda p: p.stat().st_mtime)
        for old in reports[:-KEEP_REPORTS]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
