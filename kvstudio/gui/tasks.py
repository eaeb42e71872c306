"""Long work on the model's thread: the one way its errors become the banner's line.

Every worker that runs long work on the model's thread (a run, an evaluation sweep, a fine-tune
session, saving a cache) turns whatever it raised into the banner's text here, so the same failure
reads the same wherever it happened: a KVStudioError is its own line; out of memory is explained
(what ran out and what to change, core/runtime/oom.py); a fault in plugin code the guard did not wrap
names the plugin file and line; anything else is one line "internal error: ...; details in FILE",
its traceback in a report file under the data folder (core/persist/internal_errors.py), never in
the banner.
"""

from __future__ import annotations

from kvstudio.core.errors import KVStudioError
from kvstudio.core.persist.internal_errors import internal_error_line
from kvstudio.core.plugins.guard import fault_from_traceback
from kvstudio.core.runtime.oom import explain, is_out_of_memory


def banner_text(error: BaseException, *, stage: str = "run", chunk_size: int | None = None,
                policy: str | None = None, model: str | None = None) -> str:
    """The banner's line for an error raised by long work. `stage`, `chunk_size`, `policy` and
    `model` say what was running, for the out-of-memory explanation."""
    if isinstance(error, KVStudioError):  # plugin faults the guard caught are PolicyErrors
        return str(error)
    if is_out_of_memory(error):
        return explain(error, stage, chunk_size=chunk_size, model=model, policy=policy, studio=True)
    fault = fault_from_traceback(error)  # plugin code the guard does not wrap
    if fault is not None:
        return str(fault)
    return internal_error_line(error, f"the studio's {stage} task")
