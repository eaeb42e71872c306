"""Positions after evictions: the true absolute ones by default, contiguous ones under --rerotate.

References are computed by hand here, not by the code under test.
"""

from __future__ import annotations

import pytest
import torch

from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import create_policy
from kvstudio.core.runtime.rotary import Rerotator

from .helpers import random_ids


def _capture_position_ids(engine):
    """Record the position_ids each forward hands to the rotary embedding."""
    captured = []
    rotary = engine.model.model.rotary_emb

    def hook(module, args, kwargs):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        captured.append(position_ids[0].tolist())

    return captured, rotary.register_forward_pre_hook(hook, with_kwargs=True)


# 20 prompt tokens in chunks of 5, then 5 new tokens (the 5th is sampled, not fed): budget 8, 2 sinks.
PROMPT, CHUNK, NEW, BUDGET, SINK = 20, 5, 5, 8, 2


def _run(engine, rerotate: bool):
    captured, handle = _capture_position_ids(engine)
    try:
        result = engine.generate(random_ids(PROMPT, seed=11),
                                 create_policy("streaming_llm", budget=BUDGET, sink=SINK, rerotate=rerotate),
                                 GenerationSettings(max_new_tokens=NEW, chunk_size=CHUNK), keep_cache=True)
    finally:
        handle.remove()
    return result, captured


def test_original_positions_by_default(llama_engine):
    result, captured = _run(llama_engine, rerotate=False)
    assert captured == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19],
                        [20], [21], [22], [23]]
    # 24 tokens fed: sinks 0, 1 and the 6 most recent, 18..23, in every layer and head.
    for layer in range(4):
        assert result.cache.positions(layer).tolist() == [[0, 1, 18, 19, 20, 21, 22, 23]] * 2


def test_contiguous_positions_under_rerotation(llama_engine):
    result, captured = _run(llama_engine, rerotate=True)
    # Chunk 1: 0..4, 5 held. Chunk 2: 5..9, 10 held -> evict to 8, renumber 0..7.
    # Chunks 3 and 4: 8..12 each (8 held before each). Decode: always 8 held, so position 8.
    assert captured == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [8, 9, 10, 11, 12], [8, 9, 10, 11, 12],
                        [8], [8], [8], [8]]
    layer = result.cache.layers[0]
    assert layer.positions.tolist() == [[0, 1, 18, 19, 20, 21, 22, 23]] * 2  # token positions still reported
    assert layer.rope_positions.tolist() == [list(range(8))] * 2


@pytest.mark.parametrize("rerotate", [False, True])
def test_layer0_keys_sit_at_the_expected_rotation(llama_engine, rerotate):
    """Layer 0's keys depend only on the token and its rotation, so they can be rebuilt by hand."""
    result, _ = _run(llama_engine, rerotate=rerotate)
    model = llama_engine.model.model
    attention = model.layers[0].self_attn
    fed = random_ids(PROMPT, seed=11) + result.token_ids[:-1]
    layer = result.cache.layers[0]
    rotary_positions = layer.rope_positions[0].tolist()
    with torch.no_grad():
        for slot, (token_position, rotary_position) in enumerate(zip(layer.positions[0].tolist(), rotary_positions)):
            hidden = model.layers[0].input_layernorm(model.embed_tokens(torch.tensor([[fed[token_position]]])))
            key = attention.k_proj(hidden).view(1, 1, -1, attention.head_dim).transpose(1, 2)  # (1, kv, 1, d)
            cos, sin = model.rotary_emb(hidden, position_ids=torch.tensor([[rotary_position]]))
            half = key.shape[-1] // 2
            rotated_half = torch.cat((-key[..., half:], key[..., :half]), dim=-1)
            expected = key * cos[:, None] + rotated_half * sin[:, None]
            torch.testing.assert_close(layer.keys[:, :, slot], expected[:, :, 0], atol=1e-5, rtol=1e-5)


def test_rerotator_agrees_with_the_models_rope(tiny_engine):
    model = tiny_engine.model.model
    rerotator = Rerotator.for_model(tiny_engine.model)
    head_dim = tiny_engine.model.config.head_dim if hasattr(tiny_engine.model.config, "head_dim") else 16
    raw = torch.randn(1, 2, 6, head_dim, generator=torch.Generator().manual_seed(0))
    start = torch.tensor([[0, 3, 7, 20, 100, 511]])
    target = torch.tensor([[0, 1, 2, 3, 4, 5]])

    def rope(keys, positions):
        cos, sin = model.rotary_emb(keys, position_ids=positions)
        half = head_dim // 2
        return keys * cos[:, None] + torch.cat((-keys[..., half:], keys[..., :half]), dim=-1) * sin[:, None]

    moved = rerotator.rotate(rope(raw, start), (target - start).expand(2, -1))
    # Tolerance 1e-4: fp32 angles near 500 rad carry rounding of ~3e-5 in cos/sin.
    torch.testing.assert_close(moved, rope(raw, target), atol=1e-4, rtol=1e-4)
