"""Conformance: does KV Studio's engine compute what transformers computes?

The reference is transformers' own forward with its own `DynamicCache(config=...)` (sliding layers
as `DynamicSlidingWindowLayer`), eager attention (the family's own definition: soft-capping, sinks),
the prompt in one forward, then one token per step. KV Studio runs the same tokens under the `full`
policy, the prompt in chunks of `chunk_size`. Decoding is teacher-forced: both are fed the
reference's greedy tokens, so a difference in one step cannot hide behind a different token, and
the logits of every prompt position and every decode step are compared (greedy tokens alone hide
differences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.cache_keyword import cache_kwargs
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.spec import create_policy

TOLERANCE = 1e-4  # max |delta logit| in float32 that counts as exact


@dataclass
class Conformance:
    prompt_max_delta: float  # over every prompt position's logits
    decode_max_delta: float  # over every decode step's logits
    decode_tokens: list[int] = field(default_factory=list)  # the tokens both were fed (reference greedy)
    chunk_size: int = 0

    @property
    def max_delta(self) -> float:
        return max(self.prompt_max_delta, self.decode_max_delta)

    def exact(self, tolerance: float = TOLERANCE) -> bool:
        return self.max_delta <= tolerance


def reference_logits(model, ids: list[int], decode_steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """transformers alone: (prompt logits (n, vocab), each decode step's logits, the greedy tokens fed)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            prompt = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=0,
                           **cache_kwargs(model, cache)).logits[0].float()
            steps, tokens, last = [], [], prompt[-1]
            for _ in range(decode_steps):
                token = int(last.argmax())
                tokens.append(token)
                last = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                             **cache_kwargs(model, cache)).logits[0, -1].float()
                steps.append(last)
    finally:
        model.set_attn_implementation(previous)
    return prompt, steps, tokens


def engine_logits(engine, ids: list[int], tokens: list[int], chunk_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KV Studio under `full`: the prompt in chunks (every position's logits), then `tokens` one by one."""
    session = RunSession(engine, engine.new_cache(create_policy("full")), Recorder())
    prompt = []
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start:start + chunk_size]
        prompt.append(session.forward(chunk, "prefill", is_last_prefill_chunk=start + len(chunk) >= len(ids),
                                      all_logits=True).float())
    steps = [session.forward([token], "decode").float() for token in tokens]
    return torch.cat(prompt), steps


def compare_with_transformers(engine, ids: list[int], chunk_size: int, decode_steps: int = 6,
                              reference=None) -> Conformance:
    """Logits of the engine under `full` against transformers' own, prompt and decode steps.
    `reference`: what reference_logits returned for these ids, to compare several chunk sizes."""
    ref_prompt, ref_steps, tokens = reference or reference_logits(engine.model, ids, decode_steps)
    got_prompt, got_steps = engine_logits(engine, ids, tokens, chunk_size)
    prompt_delta = float((ref_prompt - got_prompt.to(ref_prompt.device)).abs().max())
    decode_delta = max((float((r - g.to(r.device)).abs().max()) for r, g in zip(ref_steps, got_steps)), default=0.0)
    return Conformance(prompt_delta, decode_delta, tokens, chunk_size)
