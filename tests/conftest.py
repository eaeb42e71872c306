"""Shared fixtures: tiny models (seconds, no files) and the embedded default model (slow tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels (core/runtime/triton_scoring.py) run through Triton's interpreter in
# tests/test_triton_scoring.py; it must be on before anything imports triton (torch._dynamo does,
# through transformers), and it only changes kernels that are launched.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvstudio.core.runtime.engine import Engine  # noqa: E402
from kvstudio.core.models.loading import load_model  # noqa: E402
from kvstudio.core.models.tiny import TINY_FAMILIES  # noqa: E402

_engines: dict[str, Engine] = {}


@pytest.fixture(autouse=True, scope="session")
def isolated_user_data(tmp_path_factory):
    """Run history and user plugins of the test session live in a temporary folder, never the user's."""
    folder = tmp_path_factory.mktemp("user_data")
    previous = os.environ.get("KVSTUDIO_DATA_DIR")
    os.environ["KVSTUDIO_DATA_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("KVSTUDIO_DATA_DIR", None)
    else:
        os.environ["KVSTUDIO_DATA_DIR"] = previous


def engine_for(spec: str) -> Engine:
    """One Engine per model spec for the whole session: loading is the slow part."""
    if spec not in _engines:
        _engines[spec] = Engine(load_model(spec, device="cpu"))
    return _engines[spec]


@pytest.fixture(params=TINY_FAMILIES)
def tiny_engine(request) -> Engine:
    return engine_for(f"tiny-{request.param}")


@pytest.fixture
def llama_engine() -> Engine:
    return engine_for("tiny-llama")


@pytest.fixture(scope="session")
def default_engine() -> Engine:
    return engine_for("default")


# -- the studio window (pytest-qt) ------------------------------------------------------------------


@pytest.fixture
def studio_folders(tmp_path, monkeypatch):
    """The studio's user data (run history, user plugins) in the test's own folder; no extra plugin path."""
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "user_data"))
    monkeypatch.delenv("KVSTUDIO_PLUGIN_PATH", raising=False)
    return tmp_path / "user_data"


@pytest.fixture
def window(request, qtbot, tmp_path, studio_folders):
    """A shown studio window with its own settings file. With `@pytest.mark.studio_model("tiny-llama")`
    on the test or its module, that model is loaded (on the CPU) before the test starts."""
    from PySide6.QtCore import QSettings

    from kvstudio.gui.app import configure_plots
    from kvstudio.gui.main_window import MainWindow

    configure_plots()  # as the studio does at start
    win = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat))
    qtbot.addWidget(win)
    win.show()
    marker = request.node.get_closest_marker("studio_model")
    if marker is not None:
        win.loading.request_load(marker.args[0], "cpu", "auto")
        qtbot.waitUntil(lambda: win.state.model_info is not None, timeout=30_000)
    yield win
    win.close_guard.ask = False  # a test that ends mid-run closes at once
    win.close()
    win.plugins.unload()  # the policy registry is process-wide: leave it as the test found it
