"""Out of memory, explained: which thing ran out, and what to change for that thing.

"Out of memory" has different cures depending on what was allocating: a prompt file that is too
large wants a smaller file, the KV cache wants a smaller budget, the model's activations for a
prefill chunk want a smaller chunk, the model's weights want a smaller model or dtype, and a policy
allocating too much is the policy's problem. `explain(error, stage)` reads the traceback of the
failed allocation to tell which, so the CLI and the studio give the same, right advice.

Python's MemoryError, torch.OutOfMemoryError (CUDA) and torch's CPU allocator failure (a
RuntimeError saying "can't allocate memory") are all recognised.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

from kvstudio.core.errors import is_out_of_memory  # noqa: F401  (callers name it here, beside explain)
from kvstudio.core.policies import BUILT_IN, available_policies, source_of
from kvstudio.core.units import format_bytes

_CORE = Path(__file__).resolve().parents[1]
_RUNTIME = _CORE / "runtime"
_ALLOCATION = re.compile(r"tried to allocate (\d+ bytes|[0-9.]+ ?[KMGT]i?B)", re.I)


def _allocation(error: BaseException) -> str:
    """' (it tried to allocate 2.00 GiB)' when the error says how much."""
    match = _ALLOCATION.search(str(error))
    if not match:
        return ""
    amount = match.group(1)
    if amount.endswith("bytes"):
        amount = format_bytes(int(amount.split()[0]))
    return f" (it tried to allocate {amount})"


def culprit(error: BaseException) -> str:
    """What was allocating when memory ran out, from the innermost frame KV Studio knows:
    "policy", "tokenize", "cache", "attention", "model" (a forward step's activations) or
    "unknown"."""
    plugin_files = _plugin_files()
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename)
        if any(frame.filename.startswith(f) for f in plugin_files) or _CORE / "policies" in path.parents:
            return "policy"
        if path == _RUNTIME / "engine.py" and frame.name == "encode":
            return "tokenize"
        if path == _RUNTIME / "cache.py":
            return "cache"
        if path == _RUNTIME / "attention.py":
            return "attention"
        if "transformers" in path.parts or "torch" in path.parts:
            continue
    for frame in traceback.extract_tb(error.__traceback__):
        if "transformers" in Path(frame.filename).parts:
            return "model"
    return "unknown"


def _plugin_files() -> list[str]:
    return [source for name in available_policies() if (source := source_of(name)) not in (None, BUILT_IN)
            and not source.startswith("entry point")]


# The CLI's option names, and what the studio calls the same settings.
_STUDIO_WORDS = {"--budget": "the budget", "--chunk-size": "the chunk size", "--dtype bfloat16/float16":
                 "dtype bfloat16 or float16", "--quantize 4bit on CUDA": "4-bit quantization on CUDA"}


def explain(error: BaseException, stage: str, *, chunk_size: int | None = None, model: str | None = None,
            policy: str | None = None, studio: bool = False) -> str:
    """One line naming what ran out. `stage` is what KV Studio was doing: "load" (the model),
    "tokenize" (the prompt) or "run" (generation). `studio`: name settings as the studio does."""
    text = _explain(error, stage, chunk_size, model, policy)
    if studio:
        for option, words in _STUDIO_WORDS.items():
            text = text.replace(option, words)
    return text


def _explain(error, stage, chunk_size, model, policy) -> str:
    amount = _allocation(error)
    if stage == "load":
        return (f"out of memory loading the model {model or ''}{amount}: its weights do not fit; try a smaller "
                "model, --dtype bfloat16/float16, or --quantize 4bit on CUDA").replace("model  ", "model ")
    found = culprit(error)
    if stage == "tokenize" or found == "tokenize":
        return f"out of memory tokenizing the prompt{amount}: give a shorter prompt or document"
    if found == "policy":
        return (f"out of memory inside the policy {policy or ''} while it chose what to keep{amount}: the "
                "policy's own tensors do not fit; check its code or lower --budget").replace("policy  ", "policy ")
    if found == "cache":
        return f"out of memory growing the KV cache{amount}: lower --budget (or use a policy with a budget)"
    chunk = f" of {chunk_size} tokens" if chunk_size else ""
    if found == "attention":
        return (f"out of memory computing attention for a prefill chunk{chunk}{amount}: lower --chunk-size")
    if found == "model":
        return (f"out of memory in the model's forward step for a chunk{chunk}{amount}: lower --chunk-size, "
                "or use a smaller model")
    return f"out of memory during the run{amount}: lower --chunk-size or --budget, or use a smaller model"
