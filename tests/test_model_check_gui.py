"""The Model box's Check model: the engine against transformers on the loaded model, in the studio."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.studio_model("tiny-llama")


def test_check_model_says_exact_with_the_bytes_per_token(qtbot, window):
    row = window.model_check.row
    assert row.check.isEnabled() and row.result.text() == "not checked"
    row.check.click()
    assert window.state.busy == "model check" and not row.check.isEnabled()  # Run and Load wait for it
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert row.result.text() == "exact; cache 1.0 KiB per token", window.error_text.text()
    assert "one chunk: max |delta logit|" in row.result.toolTip() and "chunks of 8" in row.result.toolTip()
    assert row.check.isEnabled()


def test_another_model_is_not_checked_yet(qtbot, window):
    window.model_check.row.check.click()
    qtbot.waitUntil(lambda: not window.state.busy, timeout=30_000)
    assert window.model_check.row.result.text().startswith("exact")
    window.loading.request_load("tiny-qwen2", "cpu", "auto")
    qtbot.waitUntil(lambda: window.state.model_info.spec == "tiny-qwen2", timeout=30_000)
    assert window.model_check.row.result.text() == "not checked"
