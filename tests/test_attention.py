"""Attention rows computed for only the needed queries equal the same rows of eager attention."""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.runtime.attention import attention_rows, chunk_mask
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.recording.events import Recorder
from kvstudio.core.spec import create_policy

from .helpers import random_ids

# Tolerance: both sides are fp32 softmax over the same scores; 1e-5 absolute on weights in [0, 1].
TOLERANCE = dict(atol=1e-5, rtol=1e-4)


def _eager_reference(query, key, scaling):
    """Full-matrix attention, the textbook way: repeat KV heads, QK^T, causal mask aligned to the end."""
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[0]


@pytest.mark.parametrize("q_len, k_len, n_queries", [(1, 30, 1), (8, 8, 8), (8, 40, 3), (16, 50, 16)])
def test_rows_match_eager_attention(q_len, k_len, n_queries):
    generator = torch.Generator().manual_seed(q_len * 100 + k_len)
    query = torch.randn(1, 6, q_len, 16, generator=generator)
    key = torch.randn(1, 2, k_len, 16, generator=generator)
    rows = attention_rows(query, key, 0.25, n_queries)
    torch.testing.assert_close(rows, _eager_reference(query, key, 0.25)[:, q_len - n_queries:], **TOLERANCE)


def test_chunk_mask_sees_every_stored_entry_and_is_causal_in_the_chunk():
    mask = chunk_mask(3, 5, "cpu")[0, 0]
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, True, True, True, False],
                             [True, True, True, True, True]]
    assert chunk_mask(1, 9, "cpu") is None and chunk_mask(4, 4, "cpu") is None


def test_watched_rows_equal_the_models_eager_attentions(tiny_engine):
    """Against transformers' own eager path with output_attentions, on a real model."""
    prompt = random_ids(24, seed=12)
    recorder = Recorder(watch_layers=(0, 2))
    tiny_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=1, chunk_size=24),
                         recorder=recorder)
    model = tiny_engine.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(torch.tensor([prompt]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("kvstudio")
    for event in recorder.all("attention"):
        torch.testing.assert_close(torch.from_numpy(event.weights), eager[event.layer][0, :, -1], **TOLERANCE)
