"""A stopped run is recorded as what it was: Ctrl-C and a closed stdout are "cancelled", SIGTERM is
"interrupted", an error is "failed"; each keeps what the run had produced. Real `kvstudio run`
processes on tiny-llama, real signals, a real pipe closed by its reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvstudio.core.persist.history import RunHistory, RunRecord

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SLOW_PLUGIN = '''
import time
from pathlib import Path
from kvstudio.core.policies.base import Policy

class Slow(Policy):
    name = "slow"
    summary = "announces its first decode step, then takes a minute over it"

    def select(self, view, state):
        if view.phase == "decode":
            Path(r"{marker}").write_text("in select")
            time.sleep(60)
        return None
'''


def start(tmp_path: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "KVSTUDIO_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kvstudio", "run", "--model", "tiny-llama", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stored_run(tmp_path: Path) -> RunRecord:
    history = RunHistory(tmp_path / "data" / "history.sqlite3")
    try:
        [record] = history.list()
        return record
    finally:
        history.close()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached the plugin"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_each_way_a_run_is_stopped_is_recorded_as_what_it_was(tmp_path):
    """Three real runs at once (each pays the interpreter's start-up, so they share the wait):
    Ctrl-C mid-decode, SIGTERM inside a slow plugin, and stdout closed by its reader."""
    ctrl_c, sigterm, pipe = (tmp_path / name for name in ("ctrl_c", "sigterm", "pipe"))
    marker = sigterm / "in_select"
    (sigterm / "plugins").mkdir(parents=True)
    (sigterm / "plugins" / "slow.py").write_text(textwrap.dedent(SLOW_PLUGIN).format(marker=marker))
    processes = {
        "ctrl_c": start(ctrl_c, "--prompt", "cancel me", "--max-new-tokens", "1000000"),
        "sigterm": start(sigterm, "--plugins", str(sigterm / "plugins"), "--policy", "slow", "--budget", "64",
                         "--prompt", "a slow policy", "--max-new-tokens", "5"),
        "pipe": start(pipe, "--prompt", "read one byte", "--max-new-tokens", "1000000"),
    }
    errors = {}
    try:
        streamed = processes["ctrl_c"].stdout.read(40)  # it is decoding: 40 bytes of text are out
        processes["ctrl_c"].send_signal(signal.SIGINT)
        processes["pipe"].stdout.read(1)  # `kvstudio run ... | head -c 1`
        processes["pipe"].stdout.close()
        wait_for(marker, processes["sigterm"])  # inside the plugin's select()
        processes["sigterm"].send_signal(signal.SIGTERM)
        for name, process in processes.items():
            errors[name] = process.communicate(timeout=120)[1].decode()
    finally:
        for process in processes.values():
            process.kill()
    for err in errors.values():
        assert "Traceback" not in err and "Exception ignored" not in err, err

    # Ctrl-C: exit 130, cancelled, the text it had produced kept.
    assert processes["ctrl_c"].returncode == 130 and "kvstudio: interrupted" in errors["ctrl_c"], errors["ctrl_c"]
    record = stored_run(ctrl_c)
    assert (record.shown_status, record.error) == ("cancelled", "stopped by the user (SIGINT, Ctrl-C)")
    assert record.output.encode().startswith(streamed[:20])
    assert record.figures["generated_tokens"] >= 20 and record.figures["stopped_in"] == "decode"

    # SIGTERM inside a plugin: exit 143, interrupted (not a policy fault, not failed).
    assert processes["sigterm"].returncode == 143, errors["sigterm"]
    assert "kvstudio: terminated (SIGTERM)" in errors["sigterm"]
    record = stored_run(sigterm)
    assert (record.shown_status, record.error) == ("interrupted", "interrupted by SIGTERM")
    assert record.figures["generated_tokens"] == 1 and record.figures["stopped_in"] == "prefill"

    # A closed stdout: a quiet stop with 141 (128 + SIGPIPE), recorded as cancelled with its text.
    assert processes["pipe"].returncode == 141, errors["pipe"]
    assert "BrokenPipe" not in errors["pipe"]
    record = stored_run(pipe)
    assert record.shown_status == "cancelled" and "broken pipe" in record.error
    assert record.figures["stop_reason"] == "cancelled" and record.output


def test_older_histories_show_ctrl_c_runs_as_cancelled():
    """Before this change the CLI stored Ctrl-C as failed with the error 'KeyboardInterrupt'."""
    old = RunRecord(1, "2026-01-01", "m", "p", {}, "x", "x", "failed", error="KeyboardInterrupt")
    assert old.shown_status == "cancelled"
    assert RunRecord(2, "2026-01-01", "m", "p", {}, "x", "x", "failed", error="boom").shown_status == "failed"
    assert RunRecord(3, "2026-01-01", "m", "p", {}, "x", "x", "running").shown_status == "interrupted"
