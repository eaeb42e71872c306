"""What commands print and write: progress lines, the run's summary, JSON files, memory snapshots.

Progress and notes go to stderr (stdout is the generated text, for pipes); the summary goes to
stdout after the text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvstudio.core.units import format_bytes


def progress(message: str, fraction) -> None:
    print(f"[kvstudio] {message}", file=sys.stderr, flush=True)


def format_summary(result) -> str:
    kept = result.kept_per_layer
    kept_text = str(kept[0]) + " in every layer" if len(set(kept)) == 1 else ", ".join(map(str, kept))
    lines = [
        "--- summary",
        f"model {result.model}, policy {result.policy}, stop: {result.stop_reason}",
        _prefill_line(result),
        f"generated {len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s",
        f"peak cache {format_bytes(result.peak_cache_bytes)}, entries kept per layer: {kept_text}",
        f"evictions: {result.evictions}" + (f", left the window: {result.left_window}" if result.left_window else ""),
    ]
    if result.layer_kinds:
        lines.insert(2, f"layers: {result.layer_kinds['summary']}")
    if result.attention_loss is not None:
        lines.append(f"attention loss {result.attention_loss:.4f} (the mass on evicted entries, mean over layers and "
                     f"generated tokens; the shadow cache of every key held {format_bytes(result.shadow_bytes)})")
    return "\n".join(lines)


def _prefill_line(result) -> str:
    """A rate only for what the prefill computed: a prompt restored from a saved cache was not."""
    restored, computed = result.restored_tokens, result.computed_prompt_tokens
    if restored and not computed:
        return f"prompt {result.prompt_tokens} tokens, prefill restored from the cache in {result.prefill_seconds:.3f} s"
    rate = f"{result.prefill_seconds:.2f} s ({result.prefill_tokens_per_second:.0f} tokens/s)"
    if restored:
        return f"prompt {result.prompt_tokens} tokens: {restored} restored from the cache, {computed} prefilled in {rate}"
    return f"prompt {result.prompt_tokens} tokens, prefill {rate}"


def write_json_atomic(path: Path, data: dict) -> None:
    from kvstudio.core.io.atomic import atomic_write

    atomic_write(path, lambda stream: json.dump(data, stream, indent=1))


def write_snapshot(recording, path: str, result=None) -> None:
    from kvstudio.core.recording.snapshots import timelines

    recording.save(path, result)
    found = timelines(recording.snapshot)
    events = sum(len(t.allocations) for t in found)
    peak = max((t.peak_bytes for t in found), default=0)
    print(f"[kvstudio] wrote memory snapshot {path}: {events} allocations, peak {format_bytes(peak)} during the run "
          "(open it in the studio: Memory > Open memory snapshot, or at pytorch.org/memory_viz)", file=sys.stderr)


def warn(message: str) -> None:
    print(f"kvstudio: warning: {message}", file=sys.stderr)


def open_history(off: bool):
    """The run history a command writes to, or None: `--no-history`, or a history that cannot be
    opened (one warning; the command goes on without it)."""
    if off:
        return None
    from kvstudio.core.persist.history import HistoryError, RunHistory

    try:
        return RunHistory()
    except HistoryError as error:
        warn(str(error))
        return None
