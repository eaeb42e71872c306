"""Gradients through the policy's cache (core/train/through_cache.py), checked in float64.

- `full`, chunked, `through`: loss and every LoRA gradient equal one ordinary unchunked
  forward/backward (tolerance 1e-10 absolute: float64, the same arithmetic in another order).
- `window` and `streaming_llm` (fixed eviction schedules): loss and gradients equal the reference
  of DESIGN.md, one ordinary forward whose attention mask hides from each query exactly the
  entries evicted before its chunk (built from the evictions the chunked pass recorded).
- `truncated`: no gradient reaches an earlier chunk from a later chunk's loss (a hook on layer 0's
  key projection output of every chunk), while `through` does reach it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvstudio.core.runtime.engine import Engine
from kvstudio.core.recording.events import Recorder
from kvstudio.core.models.loading import load_model
from kvstudio.core.spec import create_policy
from kvstudio.core.train import lora
from kvstudio.core.train.data import Example
from kvstudio.core.train.through_cache import example_loss

from .helpers import random_ids

LENGTH, CHUNK = 40, 8
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def engine64():
    """tiny-llama in float64 with LoRA on its attention projections; lora_B random (peft starts
    it at zero, which would leave lora_A's gradient zero and the check half empty)."""
    loaded = load_model("tiny-llama", device="cpu")
    loaded.model.to(torch.float64)
    engine = Engine(loaded)
    torch.manual_seed(0)
    lora.attach(loaded, lora.LoraSettings(rank=4))
    for name, parameter in loaded.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    yield engine
    lora.detach(loaded)


def trainable(engine):
    return {n: p for n, p in engine.model.named_parameters() if p.requires_grad}


def take_gradients(engine) -> dict[str, torch.Tensor]:
    gradients = {}
    for name, parameter in trainable(engine).items():
        gradients[name] = parameter.grad.clone() if parameter.grad is not None else torch.zeros_like(parameter)
        parameter.grad = None
    return gradients


def reference(engine, example: Example, visible: torch.Tensor | None = None):
    """One ordinary forward/backward over the whole sequence; `visible` (q, k) bool masks keys."""
    ids = torch.tensor([example.ids])
    mask = None if visible is None else visible[None, None]
    output = engine.model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(len(example.ids))[None])
    targets = torch.tensor(example.targets[1:])
    losses = F.cross_entropy(output.logits[0, :-1], ids[0, 1:], reduction="none")
    loss = losses[targets].mean()
    loss.backward()
    return float(loss.detach()), take_gradients(engine)


def assert_same(loss, gradients, ref_loss, ref_gradients):
    assert abs(loss - ref_loss) < TOLERANCE
    assert gradients.keys() == ref_gradients.keys() and len(gradients) == 32  # q,k,v,o x A,B x 4 layers
    for name in gradients:
        assert torch.allclose(gradients[name], ref_gradients[name], rtol=0, atol=TOLERANCE), name
        assert ref_gradients[name].abs().max() > 1e-6, f"{name}: the reference gradient is zero, the check is empty"


def masked_reference_visibility(recorder: Recorder, n: int, chunk: int) -> torch.Tensor:
    """Causal, minus what was evicted before each query's chunk (layer 0, head 0: the schedule
    of window/streaming_llm is the same for every layer and head, which the test checks)."""
    evictions = recorder.all("evictions")
    by_step: dict[int, set[int]] = {}
    for event in evictions:
        by_step.setdefault((event.step, event.layer, event.kv_head), set()).update(event.positions.tolist())
    steps = sorted({e.step for e in evictions})
    for step in steps:  # the schedule is position-based: every layer and head evicts the same entries
        assert len({frozenset(v) for (s, _, _), v in by_step.items() if s == step}) == 1
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    gone: set[int] = set()
    for index, start in enumerate(range(0, n, chunk)):
        if gone:
            visible[start:start + chunk, sorted(gone)] = False
        gone |= by_step.get((index, 0, 0), set())
    return visible


def test_full_policy_chunked_equals_ordinary_training(engine64):
    example = Example(random_ids(LENGTH, seed=1), [True] * LENGTH)
    result = example_loss(engine64, example, create_policy("full"), CHUNK, "through")
    assert result.evictions == 0
    assert_same(result.loss, take_gradients(engine64), *reference(engine64, example))


def test_full_policy_with_the_loss_on_an_answer_only(engine64):
    targets = [False] * (LENGTH - 5) + [True] * 5  # like a pass-key answer: the last chunk only
    example = Example(random_ids(LENGTH, seed=2), targets)
    result = example_loss(engine64, example, create_policy("full"), CHUNK, "through")
    assert result.targets == 5
    assert_same(result.loss, take_gradients(engine64), *reference(engine64, example))


@pytest.mark.parametrize("name, parameters", [("window", {"budget": 12}),
                                              ("streaming_llm", {"budget": 12, "sink": 2})])
def test_evicting_policy_equals_the_masked_forward_reference(engine64, name, parameters):
    example = Example(random_ids(LENGTH, seed=3), [True] * LENGTH)
    recorder = Recorder()
    result = example_loss(engine64, example, create_policy(name, **parameters), CHUNK, "through", recorder=recorder)
    gradients = take_gradients(engine64)
    assert result.evictions > 0
    visible = masked_reference_visibility(recorder, LENGTH, CHUNK)
    assert not visible.equal(torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril())  # something is hidden
    assert_same(result.loss, gradients, *reference(engine64, example, visible))
    # ... and the unmasked forward differs: the check can tell eviction from no eviction.
    unmasked_loss, _ = reference(engine64, example)
    assert abs(unmasked_loss - result.loss) > 1e-6


def key_gradient_per_chunk(engine, example, mode) -> tuple[dict[int, float], float]:
    """Gradient norm reaching layer 0's key projection output in each chunk (a tensor hook)."""
    reached: dict[int, float] = {}
    calls = []
    module = engine.model.model.layers[0].self_attn.k_proj

    def on_forward(_module, _inputs, output):
        chunk = len(calls)
        calls.append(chunk)
        if output.requires_grad:
            output.register_hook(lambda grad: reached.__setitem__(chunk, float(grad.norm())))

    handle = module.register_forward_hook(on_forward)
    try:
        result = example_loss(engine, example, create_policy("full"), CHUNK, mode)
    finally:
        handle.remove()
    take_gradients(engine)
    assert len(calls) == LENGTH // CHUNK
    return reached, result.loss


def test_truncated_mode_stops_gradients_at_chunk_boundaries(engine64):
    # The loss is on the last chunk only: any gradient in an earlier chunk crossed a boundary.
    example = Example(random_ids(LENGTH, seed=4), [False] * (LENGTH - CHUNK + 1) + [True] * (CHUNK - 1))
    through, through_loss = key_gradient_per_chunk(engine64, example, "through")
    truncated, truncated_loss = key_gradient_per_chunk(engine64, example, "truncated")
    last = LENGTH // CHUNK - 1
    assert all(through.get(chunk, 0.0) > 0 for chunk in range(last + 1))  # through: every chunk is reached
    assert truncated.get(last, 0.0) > 0  # the loss's own chunk still learns
    assert all(truncated.get(chunk, 0.0) == 0.0 for chunk in range(last))  # ... and no other
    assert abs(through_loss - truncated_loss) < TOLERANCE  # the same forward either way
