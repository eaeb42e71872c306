"""Shared fixtures: tiny models (seconds, no files) and the embedded default model (slow tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from kvstudio.core.engine import Engine  # noqa: E402
from kvstudio.core.models import TINY_FAMILIES, load_model  # noqa: E402

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
