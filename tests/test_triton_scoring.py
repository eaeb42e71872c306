"""The Triton scoring kernels (core/runtime/triton_scoring.py) against the PyTorch path, on the CPU
through Triton's interpreter: the same output and sums at several tile and chunk sizes, with causal
masking inside a chunk, evicted (per-head) positions and sliding windows; and every policy that
scores with attention keeps the same entries with the kernels as with the PyTorch path."""

from __future__ import annotations

import os

if "triton" not in __import__("sys").modules:  # (tests/conftest.py sets it first when there is no GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET was set, and there is no GPU", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
KERNEL = "triton" if INTERPRETED else None  # on a GPU, the automatic choice

from kvstudio.core.models.loading import LoadedModel  # noqa: E402
from kvstudio.core.models.tiny import byte_tokenizer  # noqa: E402
from kvstudio.core.models.tiny_families import build_family_model  # noqa: E402
from kvstudio.core.runtime import triton_scoring  # noqa: E402
from kvstudio.core.runtime.attention import LogitRule, attention_and_sums, attention_sums  # noqa: E402
from kvstudio.core.runtime.engine import Engine, GenerationSettings  # noqa: E402
from kvstudio.core.spec import create_policy  # noqa: E402

from .helpers import random_ids  # noqa: E402

TOLERANCE = dict(atol=2e-5, rtol=1e-5)


def _tensors(heads, kv_heads, q_len, k_len, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, length, head_dim, generator=generator).to(DEVICE)
                 for n, length in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))


def _evicted_rule(kv_heads, q_len, k_len, seen, window=None, seed=0):
    """Positions as a run holds them after evictions: each KV head keeps its own increasing subset of
    the `seen` older tokens, then the chunk's own q_len tokens."""
    generator = torch.Generator().manual_seed(seed)
    old = k_len - q_len
    kept = torch.stack([torch.randperm(seen, generator=generator)[:old].sort().values for _ in range(kv_heads)])
    chunk = torch.arange(seen, seen + q_len)
    return LogitRule(torch.cat([kept, chunk.expand(kv_heads, -1)], dim=1).to(DEVICE), chunk.to(DEVICE), window)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("q_len, k_len", [(1, 37), (20, 50), (33, 33), (40, 40 + 70)])
def test_output_and_sums_equal_the_pytorch_path(block_m, block_n, q_len, k_len):
    """Every query scored (H2O): the kernel's output and sums are those of the one-pass PyTorch path,
    causal within the chunk, across GQA groups of 3 and a head dim that is not a power of two."""
    query, key, value = _tensors(6, 2, q_len, k_len, 12, seed=q_len + k_len)
    output, sums = triton_scoring.attention_and_sums(query, key, value, 0.3, q_len, None, block_m, block_n)
    expected_output, expected_sums = attention_and_sums(query, key, value, 0.3, q_len)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    torch.testing.assert_close(sums, expected_sums, **TOLERANCE)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 64)])
@pytest.mark.parametrize("n_queries", [1, 4, 17])
@pytest.mark.parametrize("window", [None, 9])
def test_an_observation_window_over_evicted_positions(block_m, block_n, n_queries, window):
    """The newest n_queries only (SnapKV's window, TOVA's one query), keys at the scattered positions
    evictions leave per KV head, a sliding window on or off: the sums of the PyTorch path; without
    values the kernel gives no output (SDPA does)."""
    q_len, k_len = 24, 24 + 40
    query, key, _ = _tensors(4, 2, q_len, k_len, 16, seed=n_queries)
    rule = _evicted_rule(2, q_len, k_len, seen=90, window=window, seed=n_queries)
    output, sums = triton_scoring.attention_and_sums(query, key, None, None, n_queries, rule, block_m, block_n)
    assert output is None
    torch.testing.assert_close(sums, attention_sums(query, key, None, n_queries, rule=rule), **TOLERANCE)


def test_the_fused_output_over_evicted_positions_and_a_window():
    q_len, k_len = 1, 30
    query, key, value = _tensors(4, 2, q_len, k_len, 16, seed=3)
    rule = _evicted_rule(2, q_len, k_len, seen=60, window=12, seed=3)
    output, sums = triton_scoring.attention_and_sums(query, key, value, None, 1, rule, 16, 16)
    expected_output, expected_sums = attention_and_sums(query, key, value, None, 1, rule=rule)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    torch.testing.assert_close(sums, expected_sums, **TOLERANCE)


def test_soft_capped_and_sink_layers_dropout_and_autograd_stay_on_the_pytorch_path():
    query = torch.zeros(1, 2, 3, 16, device=DEVICE)
    with torch.inference_mode():  # as a run is
        assert triton_scoring.usable(query, LogitRule(), 0.0, "triton")
        assert not triton_scoring.usable(query, LogitRule(softcap=30.0), 0.0, "triton")
        assert not triton_scoring.usable(query, LogitRule(sinks=torch.zeros(2)), 0.0, "triton")
        assert not triton_scoring.usable(query, LogitRule(), 0.1, "triton")
        assert not triton_scoring.usable(query, LogitRule(), 0.0, "torch")
        assert triton_scoring.usable(query, LogitRule(), 0.0, None) == (DEVICE.type == "cuda")  # automatic: CUDA only
    assert not triton_scoring.usable(query, LogitRule(), 0.0, "triton")  # autograd on: fine-tuning through the cache


def _kept(engine, name, params, prompt, settings, kernel):
    policy = create_policy(name, **params)
    cache = engine.new_cache(policy)
    cache.scoring_kernel = kernel
    result = engine.generate(prompt, policy, settings, keep_cache=True, cache=cache)
    return result.token_ids, [result.cache.positions(layer).tolist() for layer in range(engine.loaded.n_layers)]


def _engine(family):
    """tiny llama (global layers) or mistral (every layer sliding, window 8)."""
    model = build_family_model(family).to(DEVICE)
    return Engine(LoadedModel(model, byte_tokenizer(), f"tiny-{family}", family, DEVICE, torch.float32))


# The interpreter runs each program of a launch in Python: a run costs ~20 s here, so the fast set is
# every policy on llama in chunks; the one-chunk prompt and the sliding model are also `slow`.
CASES = [pytest.param(family, name, chunk, marks=[] if (family, chunk) == ("llama", 7) else [pytest.mark.slow])
         for family, chunk in (("llama", 7), ("llama", 30), ("mistral", 7))
         for name in ("h2o", "tova", "snapkv", "pyramidkv")]


@pytest.mark.parametrize("family, name, chunk_size", CASES)
def test_policies_keep_the_same_entries_with_the_kernels(family, name, chunk_size):
    engine = _engine(family)
    params = dict(budget=10) if name in ("h2o", "tova") else dict(budget=10, observation_window=4)
    prompt = random_ids(30, seed=11)
    settings = GenerationSettings(max_new_tokens=4, chunk_size=chunk_size, ignore_eos=True)
    assert (_kept(engine, name, params, prompt, settings, KERNEL)
            == _kept(engine, name, params, prompt, settings, "torch"))
