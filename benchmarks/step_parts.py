"""Where the engine's own time per step goes: wall-clock timers wrapped around its parts.

Used by overhead.py. Each part is a function of the engine (or of transformers, for the mask) that
runs once per step or once per layer and step; `timed_parts` replaces it, for the block only, with
a wrapper that adds its wall time to a total. Parts nest (the attention function calls SDPA and the
policy), so each is reported both inclusive and as its own share with the named inner parts taken
out. The wrappers cost about a microsecond each: the figures are for finding what to cut, the
uninstrumented medians in overhead.py are the ones that count.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import defaultdict

from transformers import AttentionInterface

from kvstudio.core.runtime import attention, cache, engine, session

# (label, owner, attribute, the parts it contains): owner is a class or a module.
def part_table(model) -> list[tuple[str, object, str, tuple[str, ...]]]:
    modeling = sys.modules[type(model).__module__]
    return [
        ("run: set-up and result", engine.Engine, "generate", ("step", "sampling and text")),
        ("step", session.RunSession, "forward",
         ("begin step", "end step: cache report", "events and step record", "mask building", "attention function",
          "cache update", "layer hooks")),
        ("begin step", session.RunSession, "begin_forward", ()),
        ("end step: cache report", cache.PolicyCache, "end_step", ()),
        ("events and step record", session.RunSession, "record_step", ("memory reading",)),
        ("memory reading", session.RunSession, "record_memory", ()),
        ("mask building", modeling, "create_causal_mask", ()),
        ("attention function", attention, "kvstudio_attention", ("SDPA kernel", "policy after attention")),
        ("SDPA kernel", attention, "sdpa_attention_forward", ()),
        ("policy after attention", cache.PolicyCache, "after_attention", ()),
        ("cache update", cache.PolicyLayer, "update", ()),
        ("layer hooks", session.RunSession, "before_layer", ()),
        ("sampling and text", engine.Engine, "next_token", ()),
    ]


@contextlib.contextmanager
def timed_parts(model):
    """Within the block every part in `part_table` adds its seconds to `totals[label]` and counts
    its calls in `calls[label]`; yields (totals, calls)."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    restore = []
    engine_thread = threading.get_ident()  # the memory sampler's thread reads memory too: not a step's part
    for label, owner, name, _inner in part_table(model):
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def wrapper(*args, __original=original, __label=label, **kwargs):
            started = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                if threading.get_ident() == engine_thread:
                    totals[__label] += time.perf_counter() - started
                    calls[__label] += 1

        setattr(owner, name, wrapper)
        restore.append((owner, name, original))
    # The attention function is looked up by name in transformers' registry, not in our module.
    AttentionInterface.register(attention.ATTENTION_NAME, attention.kvstudio_attention)
    try:
        yield totals, calls
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)
        AttentionInterface.register(attention.ATTENTION_NAME, attention.kvstudio_attention)


def breakdown_lines(model, totals: dict[str, float], calls: dict[str, int], steps: int) -> list[str]:
    """One line per part: microseconds per step inclusive, its own share (inner parts out), calls per step.
    The step's own share is the model's layers (linear layers, norms, RoPE) and the glue around them."""
    lines = [f"{'part':<28} {'us/step':>9} {'own us/step':>12} {'calls/step':>11}"]
    for label, _owner, _name, inner in part_table(model):
        if not calls.get(label):
            continue
        own = totals[label] - sum(totals.get(part, 0.0) for part in inner)
        lines.append(f"{label:<28} {totals[label] / steps * 1e6:9.1f} {own / steps * 1e6:12.1f} "
                     f"{calls[label] / steps:11.2f}")
    return lines
