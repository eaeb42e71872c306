"""Shared fixtures: tiny models (seconds, no files) and the embedded default model (slow tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from kvstudio.core.engine import Engine  # noqa: E402
from kvstudio.core.models import TINY_FAMILIES, load_model  # noqa: E402

_engines: dict[str, Engine] = {}


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
