"""The studio under hostile plugins and files: the guard's message in the banner, the window kept,
broken plugins marked, special files refused, and each run's status in the Runs view. pytest-qt,
offscreen, real plugin files, real tiny-llama runs."""

from __future__ import annotations

import os
import textwrap

import pytest
from PySide6.QtCore import QMimeData, QUrl

from kvstudio.core.plugins.loader import user_plugin_dir

pytest.importorskip("pytestqt")

EXITS = '''
import sys
from kvstudio.core.policies.base import Policy

class Exits(Policy):
    name = "exits_in_select"
    summary = "calls sys.exit at the first decode step"

    def select(self, view, state):
        if view.phase == "decode":
            sys.exit(4)
        return None
'''

UNDESCRIBABLE = '''
from dataclasses import dataclass
from kvstudio.core.policies.base import Policy, PolicyConfig, parameter

@dataclass
class Config(PolicyConfig):
    layers: list = parameter(None, help="a list the form cannot edit")

class Listy(Policy):
    name = "listy"
    summary = "a Config the form cannot describe"
    Config = Config

    def select(self, view, state):
        return None
'''

BAD_VALIDATE = '''
from dataclasses import dataclass
from kvstudio.core.policies.base import Policy, PolicyConfig, parameter

@dataclass
class Config(PolicyConfig):
    def validate(self):
        super().validate()
        raise ValueError("this validate is broken")

class BadValidate(Policy):
    name = "bad_validate"
    summary = "validate raises an ordinary exception"
    Config = Config

    def select(self, view, state):
        return None
'''


pytestmark = pytest.mark.studio_model("tiny-llama")


@pytest.fixture(autouse=True)
def hostile_plugin_files(studio_folders):
    """In the user plugin folder before the window is made: it loads them."""
    folder = user_plugin_dir()
    folder.mkdir(parents=True)
    for name, code in (("exits.py", EXITS), ("listy.py", UNDESCRIBABLE), ("bad_validate.py", BAD_VALIDATE)):
        (folder / name).write_text(textwrap.dedent(code))


@pytest.fixture
def window(window):
    window.prompt_area.prompt.setPlainText("hostile plugins")
    window.form.max_new_tokens.setValue(4)
    return window


def run(qtbot, win, policy, **parameters):
    win.form.policy.setCurrentText(policy)
    win.form.policy_form.set_values(parameters)
    win.run.request_run()
    assert win.state.busy, win.error_text.text()
    qtbot.waitUntil(lambda: not win.state.busy, timeout=30_000)
    return win.state.last_outcome


def runs_view_statuses(win) -> list[str]:
    table = win.runs.view.table
    return [table.item(row, 2).text() for row in range(table.rowCount())]


def test_a_plugin_that_exits_shows_the_banner_and_the_window_carries_on(qtbot, window):
    outcome = run(qtbot, window, "exits_in_select", budget=64)
    path = user_plugin_dir() / "exits.py"
    assert outcome.error.startswith(f"policy 'exits_in_select' (plugin {path}) raised in layer 0: called "
                                    "sys.exit(4)"), outcome.error
    assert "exits.py line 11" in outcome.error
    assert window.error_banner.isVisible() and "called sys.exit(4)" in window.error_text.text()
    assert window.isVisible() and window.form.run_button.isEnabled()
    ok = run(qtbot, window, "window", budget=4)
    assert ok.error is None and ok.result.token_ids
    assert runs_view_statuses(window) == ["finished", "failed"]


def test_broken_plugins_are_marked_and_not_offered(qtbot, window):
    view = window.plugins_feature.view
    rows = {view.table.item(r, 0).text(): (view.table.item(r, 1).text(), view.table.item(r, 3).text())
            for r in range(view.table.rowCount())}
    status, error = rows[str(user_plugin_dir() / "listy.py")]
    assert status == "broken" and "parameter 'layers' has type 'list'" in error
    assert window.form.policy.findText("listy") == -1
    assert window.form.policy.findText("bad_validate") != -1  # describable: offered, and its fault shown when used


def test_a_validate_that_raises_is_shown_under_the_form_and_blocks_the_run(qtbot, window):
    window.form.policy.setCurrentText("bad_validate")
    message = window.form.policy_form.error.text()
    assert "policy 'bad_validate'" in message and "ValueError: this validate is broken" in message
    assert "bad_validate.py line 9" in message
    window.run.request_run()
    assert not window.state.busy and "this validate is broken" in window.error_text.text()


def test_stop_is_cancelled_in_the_runs_view(qtbot, window):
    window.form.max_new_tokens.setValue(100_000)
    window.form.policy.setCurrentText("window")
    window.form.policy_form.set_values({"budget": 8})
    window.run.request_run()
    qtbot.waitUntil(lambda: window.state.recorder is not None and len(window.state.recorder.all("tokens")) >= 3, timeout=20_000)
    window.run.stop()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=20_000)
    assert runs_view_statuses(window) == ["cancelled"]
    assert "stopped by the user" in window.runs.view.table.item(0, 2).toolTip()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_dropped_symlink_to_a_device_is_refused_and_nothing_is_added(qtbot, window, tmp_path):
    link = tmp_path / "endless.txt"
    link.symlink_to("/dev/zero")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(link))])
    window.prompt_area.handle_drop(mime)
    assert window.prompt_area.documents.documents == {}
    assert window.error_banner.isVisible()
    assert "endless.txt is a character device (a symlink to /dev/zero), not a regular file" in window.error_text.text()
