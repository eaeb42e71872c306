"""The words a finished run leaves in the status bar and the Compare table: counts with their right
plural, and a speed only where one was measured (a Stop after one token measured no decoding)."""

from __future__ import annotations
from kvstudio.core.storage import storage_config


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def speed_text(result) -> str:
    """Decode speed when two or more tokens were generated; else the prefill's, over what it fed."""
    if len(result.token_ids) >= 2 and result.decode_seconds > 0:
        return f"{result.tokens_per_second:.1f} tokens/s"
    fed = sum(step.input_tokens for step in result.steps if step.phase == "prefill")
    restored = result.restored_tokens  # from a saved cache: restored, not computed
    if restored and not fed:
        return f"prefill restored from the cache in {result.prefill_seconds:.3f} s"
    if fed and result.prefill_seconds > 0:
        of = f" of {result.prompt_tokens:,}" if fed + restored < result.prompt_tokens else ""
        after = f" after {restored:,} restored from the cache" if restored else ""
        return f"prefill {fed:,}{of} tokens at {fed / result.prefill_seconds:.0f} tokens/s{after}"
    if result.stop_reason == "cancelled":
        return "stopped before the first prefill chunk was through"
    return "no speed measured"


def describe_run(policy: str, result) -> str:
    loss = getattr(result, "attention_loss", None)  # measured only when the form asked for it
    return (f"{policy}: {result.stop_reason} · {plural(len(result.token_ids), 'token')} · {speed_text(result)} · "
            f"peak cache {result.peak_cache_bytes / 2**20:.2f} MiB · {plural(result.evictions, 'eviction')}"
            + ("" if loss is None else f" · attention loss {loss:.3f}"))


def budget_text(parameters: dict) -> str:
    budget = parameters.get("budget")
    return "all" if budget is None else f"{budget:,}"


def parameters_text(parameters: dict) -> str:
    """A run's parameters besides the budget, as a line: 'sink 4 · window 20 · int4, group 32, residual 64'.
    Unset (None) and off (False) parameters are left out; the storage fields read as one item."""
    parts = []
    for name, value in parameters.items():
        if name == "budget" or value is None or value is False:
            continue
        if name == "storage" and isinstance(value, dict):
            parts.append(_storage_text(value))
        elif value is True:
            parts.append(name.replace("_", " "))
        else:
            parts.append(f"{name.replace('_', ' ')} {value}")
    return " · ".join(part for part in parts if part)


def _storage_text(storage: dict) -> str:
    """The storage as a run's summary words it ('int4, group 32, residual 64', 'fp, minicache from layer 2
    (threshold 0.5, t 0.6)'); empty for fp on the device."""
    described = storage_config(storage).describe()
    return "" if described == "fp" else described
