"""Conformance: does KV Studio's engine compute what transformers computes?

The reference is transformers' own forward with its own `DynamicCache(config=...)` (sliding layers
as `DynamicSlidingWindowLayer`), eager attention (the family's own definition: soft-capping, sinks),
the prompt in one forward, then one token per step. KV Studio runs the same tokens under the `full`
policy, the prompt in chunks of `chunk_size`. Decoding is teacher-forced: both are fed the
reference's greedy tokens, so a difference in one step cannot hide behind a different token, and
the logits of every prompt position and every decode step are compared (greedy tokens alone hide
differences). Each decoder layer's attention output is compared too, so a difference is traced to
the first layer that computes it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.models.layer_kinds import text_config
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.cache_keyword import cache_kwargs
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.runtime.layer_hooks import decoder_layers
from kvstudio.core.runtime.session import RunSession
from kvstudio.core.spec import create_policy

TOLERANCE = 1e-4  # max |delta logit| in float32 that counts as exact


@dataclass
class Conformance:
    prompt_max_delta: float  # over every prompt position's logits
    decode_max_delta: float  # over every decode step's logits
    decode_tokens: list[int] = field(default_factory=list)  # the tokens both were fed (reference greedy)
    chunk_size: int = 0
    # Each layer's attention output, prompt and decode; None for a layer without attention (state layers)
    layer_max_delta: list[float | None] = field(default_factory=list)

    @property
    def max_delta(self) -> float:
        return max(self.prompt_max_delta, self.decode_max_delta)

    def first_layer_over(self, tolerance: float) -> int | None:
        """The first layer whose attention output differs by more than `tolerance`, or None."""
        return next((i for i, delta in enumerate(self.layer_max_delta) if delta is not None and delta > tolerance), None)

    @property
    def worst_layer(self) -> int | None:
        """The layer whose attention output differs most, or None when no layer was compared."""
        compared = [i for i, delta in enumerate(self.layer_max_delta) if delta is not None]
        return max(compared, key=self.layer_max_delta.__getitem__) if compared else None

    def exact(self, tolerance: float = TOLERANCE) -> bool:
        return self.max_delta <= tolerance


def _attention_module(layer):
    """A decoder layer's attention block (`self_attn`, `attn`, `attention`, ...): its first child whose
    class is an attention, or None."""
    return next((m for m in layer.children() if type(m).__name__.endswith("Attention")), None)


@contextlib.contextmanager
def attention_outputs(model, n_layers: int):
    """Within the block, each decoder layer's attention output (after its output projection) is
    appended, one (tokens, hidden) tensor per forward, to the yielded lists, one list per layer."""
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def hook(_module, _args, output, index):
        tensor = output[0] if isinstance(output, tuple) else output
        outputs[index].append(tensor.detach()[0].float().cpu())

    handles = []
    for index, layer in enumerate(decoder_layers(model, n_layers)):
        module = _attention_module(layer)
        if module is not None:
            handles.append(module.register_forward_hook(lambda m, a, o, index=index: hook(m, a, o, index)))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _layer_deltas(reference: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> list[float | None]:
    """Per layer, the max |delta| between two runs' attention outputs over every position fed; None for
    a layer without attention."""
    return [float((torch.cat(ref) - torch.cat(mine)).abs().max()) if ref and mine else None
            for ref, mine in zip(reference, got)]


@dataclass
class Reference:
    """What transformers alone computes for a prompt: every prompt position's logits (n, vocab), each
    decode step's logits, the greedy tokens it fed, and each layer's attention outputs."""

    prompt: torch.Tensor
    steps: list[torch.Tensor]
    tokens: list[int]
    layer_outputs: list[list[torch.Tensor]]


def reference_logits(model, ids: list[int], decode_steps: int, chunk_size: int | None = None) -> Reference:
    """transformers alone: its own cache, eager attention, the prompt in one forward (or in chunks of
    `chunk_size`: for layers whose own chunked forward differs from one forward, Mamba's PyTorch scan),
    then greedy steps."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache(config=model.config)
        with attention_outputs(model, text_config(model.config).num_hidden_layers) as outputs, torch.inference_mode():
            size = chunk_size or len(ids)
            prompt = torch.cat([model(input_ids=torch.tensor([ids[start:start + size]], device=device), use_cache=True,
                                      position_ids=torch.arange(start, min(start + size, len(ids)), device=device)[None],
                                      logits_to_keep=0, **cache_kwargs(model, cache)).logits[0].float()
                                for start in range(0, len(ids), size)])
            steps, tokens, last = [], [], prompt[-1]
            for _ in range(decode_steps):
                token = int(last.argmax())
                tokens.append(token)
                last = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                             **cache_kwargs(model, cache)).logits[0, -1].float()
                steps.append(last)
    finally:
        model.set_attn_implementation(previous)
    return Reference(prompt, steps, tokens, outputs)


def engine_logits(engine, ids: list[int], tokens: list[int], chunk_size: int
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[list[torch.Tensor]]]:
    """KV Studio under `full`: the prompt in chunks (every position's logits), then `tokens` one by one;
    with each layer's attention outputs."""
    session = RunSession(engine, engine.new_cache(create_policy("full")), Recorder())
    prompt = []
    with attention_outputs(engine.model, engine.loaded.n_layers) as outputs:
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start:start + chunk_size]
            prompt.append(session.forward(chunk, "prefill", is_last_prefill_chunk=start + len(chunk) >= len(ids),
                                          all_logits=True).float())
        steps = [session.forward([token], "decode").float() for token in tokens]
    return torch.cat(prompt), steps, outputs


def compare_with_transformers(engine, ids: list[int], chunk_size: int, decode_steps: int = 6,
                              reference: Reference | None = None) -> Conformance:
    """Logits and attention outputs of the engine under `full` against transformers' own, prompt and
    decode steps. `reference`: what reference_logits returned for these ids, to compare several chunk sizes."""
    reference = reference or reference_logits(engine.model, ids, decode_steps)
    got_prompt, got_steps, got_layers = engine_logits(engine, ids, reference.tokens, chunk_size)
    prompt_delta = float((reference.prompt - got_prompt.to(reference.prompt.device)).abs().max())
    decode_delta = max((float((r - g.to(r.device)).abs().max()) for r, g in zip(reference.steps, got_steps)),
                       default=0.0)
    return Conformance(prompt_delta, decode_delta, reference.tokens, chunk_size,
                       _layer_deltas(reference.layer_outputs, got_layers))


# What `kvstudio check-model` and the studio's Check model feed both sides by default.
CHECK_PROMPT = ("The quick brown fox jumps over the lazy dog. A cache keeps what attention needs; a policy decides "
                "which entries stay, and a sliding window forgets what is too far behind.")
# The largest logit difference that counts as exact: float32 rounding; half precision rounds far more.
TOLERANCES = {"float32": TOLERANCE, "float64": 1e-8}
HALF_TOLERANCE = 5e-2


def _layers_part(check: Conformance) -> str:
    worst = check.worst_layer
    if worst is None:
        return ""
    return f"; attention output max |delta| {check.layer_max_delta[worst]:.2e} (layer {worst})"


@dataclass
class ModelCheck:
    """A user's model checked: the comparisons (one chunk, then chunks), the tolerance they were held to,
    and the cache's bytes per token under `full`."""

    checks: list[Conformance]
    tolerance: float
    prompt_tokens: int
    bytes_per_token: float
    dtype: str  # the model's, as "float32": the tolerance depends on it

    @property
    def exact(self) -> bool:
        """Every logit and every layer's attention output within the tolerance."""
        return all(check.max_delta <= self.tolerance and check.first_layer_over(self.tolerance) is None
                   for check in self.checks)

    def lines(self) -> list[str]:
        """Each comparison, then the verdict: exact, or where it differs."""
        lines = []
        for check in self.checks:
            how = "one chunk" if check.chunk_size == self.prompt_tokens else f"chunks of {check.chunk_size}"
            lines.append(f"{how}: max |delta logit| prompt {check.prompt_max_delta:.2e}, "
                         f"decode {check.decode_max_delta:.2e}{_layers_part(check)}")
        if self.exact:
            lines.append(f"exact: every logit within {self.tolerance:g} of transformers' own")
        else:
            failing = [c for c in self.checks
                       if c.max_delta > self.tolerance or c.first_layer_over(self.tolerance) is not None]
            worst = max(failing, key=lambda c: c.max_delta)
            where = "the prompt" if worst.prompt_max_delta >= worst.decode_max_delta else "the decode steps"
            first = worst.first_layer_over(self.tolerance)
            layer = f", first in layer {first}'s attention output" if first is not None else ""
            lines.append(f"differs: max |delta logit| {worst.max_delta:.3g} (tolerance {self.tolerance:g}), largest in "
                         f"{where}{layer}; runs of this model under a policy are not the model transformers computes")
        return lines


def check_model(engine, prompt: str = CHECK_PROMPT, chunk_size: int = 8, decode_steps: int = 6,
                tolerance: float | None = None) -> ModelCheck:
    """Compare the engine with transformers on `prompt`, in one chunk and in chunks of `chunk_size`."""
    ids = engine.encode(prompt)
    if len(ids) < 2:
        raise KVStudioError("the prompt needs at least two tokens to compare a prompt and its decode steps")
    dtype = str(engine.loaded.dtype).removeprefix("torch.")
    tolerance = tolerance if tolerance is not None else TOLERANCES.get(dtype, HALF_TOLERANCE)
    reference = reference_logits(engine.model, ids, decode_steps)
    checks = [compare_with_transformers(engine, ids, size, decode_steps, reference)
              for size in dict.fromkeys((len(ids), min(chunk_size, len(ids))))]
    full = engine.generate(ids, create_policy("full"), GenerationSettings(max_new_tokens=0, memory_sample_hz=0))
    return ModelCheck(checks, tolerance, len(ids), full.peak_cache_bytes / len(ids), dtype)
