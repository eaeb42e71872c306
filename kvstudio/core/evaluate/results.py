"""What a sweep's cells add up to: grids, means, a terminal table, CSV and JSON files.

A record is one cell (sweep.py writes them); every function here takes a list of them, so the CLI,
the studio and the figures read the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstudio.core.evaluate.protocols import DEFAULT_PROTOCOL
from kvstudio.core.io.atomic import atomic_write, check_writable_folder
from kvstudio.core.errors import KVStudioError
from kvstudio.core.units import format_bytes

PLAIN = "plain"  # the summary's variant column for the cells without one (the baseline)
CSV_COLUMNS = ("task", "subtask", "policy", "budget", "variant", "context_tokens", "depth", "needle_depth", "sample",
               "score", "partial_score", "exact_match", "perplexity", "kl_mean", "kl_max", "peak_cache_bytes",
               "seconds", "run_id", "output", "expected", "protocol", "attention_loss")
CURVES = ("positions", "true_logprobs", "kl")  # per-position lists of the language tasks (JSON only)
LOWER_IS_BETTER = ("perplexity", "kl")


def series_label(record: dict) -> str:
    """How a record's policy is named in legends and tables: policy, budget and variant (and the protocol
    when it is not the default, so one figure can hold a sweep under two protocols)."""
    label = record["policy"] if record.get("budget") is None else f"{record['policy']} @ {record['budget']}"
    protocol = protocol_of(record) if "task" in record else None
    suffix = f" [{protocol}]" if protocol not in (None, DEFAULT_PROTOCOL) else ""
    return label + "".join(f" {k}={v}" for k, v in (record.get("variant") or {}).items()) + suffix


def policy_label(record: dict) -> str:
    return record["policy"] + "".join(f" {k}={v}" for k, v in (record.get("variant") or {}).items())


@dataclass
class Row:
    """One line of the summary table: a policy at a budget (and variant, and RULER subtask)."""

    task: str
    policy: str
    budget: int | None
    variant: dict
    subtask: str | None
    mean_score: float
    cells: int
    peak_cache_bytes: int
    seconds: float
    mean_partial: float | None = None
    perplexity: float | None = None
    kl_mean: float | None = None
    protocol: str | None = None  # generation tasks: how the question met the policy (protocols.py)
    attention_loss: float | None = None  # with --measure-loss: the mean over the cells


def protocol_of(record: dict) -> str | None:
    """A generation cell's protocol; cells stored before protocols existed ran bounded."""
    if record["task"] in LOWER_IS_BETTER:
        return None
    return record.get("protocol") or DEFAULT_PROTOCOL


def summary_rows(records: list[dict]) -> list[Row]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        key = (record["task"], record["policy"], record.get("budget"), json.dumps(record.get("variant") or {}),
               record.get("subtask"), protocol_of(record))
        groups[key].append(record)
    rows = []
    for (task, policy, budget, variant, subtask, protocol), cells in groups.items():
        partial = [c["partial_score"] for c in cells if c.get("partial_score") is not None]
        losses = [c["attention_loss"] for c in cells if c.get("attention_loss") is not None]
        rows.append(Row(task, policy, budget, json.loads(variant), subtask, _mean(c["score"] for c in cells),
                        len(cells), max(c["peak_cache_bytes"] for c in cells), sum(c["seconds"] for c in cells),
                        _mean(partial) if partial else None,
                        _mean(c["perplexity"] for c in cells) if "perplexity" in cells[0] else None,
                        _mean(c["kl_mean"] for c in cells) if "kl_mean" in cells[0] else None,
                        protocol, _mean(losses) if losses else None))
    return rows


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def format_summary(records: list[dict]) -> str:
    """The plain-text table the CLI prints after a sweep."""
    if not records:
        return "no cells finished"
    rows = summary_rows(records)
    language = rows[0].task in LOWER_IS_BETTER
    header = (["policy", "budget", "variant", "subtask", "perplexity", "mean KL", "peak cache", "cells", "seconds"]
              if language else
              ["policy", "budget", "variant", "subtask", "protocol", "mean score", "partial", "attention loss",
               "peak cache", "cells", "seconds"])
    lines = []
    for row in rows:
        variant = " ".join(f"{k}={v}" for k, v in row.variant.items()) or PLAIN
        figures = ([f"{row.perplexity:.3f}", f"{row.kl_mean:.4f}"] if language else
                   [row.protocol, f"{row.mean_score:.3f}", "-" if row.mean_partial is None else f"{row.mean_partial:.3f}",
                    "-" if row.attention_loss is None else f"{row.attention_loss:.4f}"])
        lines.append([row.policy, "-" if row.budget is None else str(row.budget), variant, row.subtask or "-",
                      *figures, format_bytes(row.peak_cache_bytes), str(row.cells), f"{row.seconds:.1f}"])
    # The protocol always shows (a generation task's scores mean little without it); the other optional
    # columns only where a row has something in them.
    keep = [i for i in range(len(header)) if header[i] not in ("variant", "subtask", "attention loss")
            or any(line[i] not in ("-", PLAIN) for line in lines)]
    table = [[header[i] for i in keep]] + [[line[i] for i in keep] for line in lines]
    widths = [max(len(line[i]) for line in table) for i in range(len(keep))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def markdown_table(records: list[dict]) -> str:
    """The summary as a Markdown table (README, the note)."""
    text = format_summary(records).splitlines()
    cells = [line.split("  ") for line in text]
    cells = [[c.strip() for c in line if c.strip()] for line in cells]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    out += ["| " + " | ".join(line) + " |" for line in cells[1:]]
    return "\n".join(out)


# --- grids for the figures and the studio -------------------------------------------------------


def needle_grid(records: list[dict], label: str, metric: str = "score") -> tuple[list[int], list[float], np.ndarray]:
    """(context lengths, depths, mean `metric` per depth x length) for one series; NaN where no cell is."""
    mine = [r for r in records if series_label(r) == label and r.get("depth") is not None]
    lengths = sorted({r["context_tokens"] for r in mine})
    depths = sorted({r["depth"] for r in mine})
    grid = np.full((len(depths), len(lengths)), np.nan, dtype=np.float32)
    sums: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in mine:
        value = r.get(metric)
        if value is not None:
            sums[(depths.index(r["depth"]), lengths.index(r["context_tokens"]))].append(value)
    for (row, column), values in sums.items():
        grid[row, column] = sum(values) / len(values)
    return lengths, depths, grid


def series(records: list[dict]) -> list[str]:
    """Series labels in the order they first appear."""
    return list(dict.fromkeys(series_label(r) for r in records))


def score_by_budget(records: list[dict]) -> dict[str, tuple[list, list[float]]]:
    """Per policy (and variant): budgets and mean scores. A policy without a budget (full) has None."""
    by_policy: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_policy[policy_label(r)][r.get("budget")].append(r["score"])
    return {name: (list(points), [_mean(v) for v in points.values()]) for name, points in by_policy.items()}


def score_by_bytes(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per series: mean peak cache bytes and mean score (one point per policy x budget)."""
    out = {}
    for row in summary_rows(records):
        label = series_label({"policy": row.policy, "budget": row.budget, "variant": row.variant})
        out.setdefault(label, ([], []))
        out[label][0].append(row.peak_cache_bytes)
        out[label][1].append(row.mean_score)
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The (bytes, score) points no other point beats on both: fewer bytes and a better score."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def running_mean(values: list[float], window: int) -> np.ndarray:
    """A trailing moving average (the curves along the text are noisy per token)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return array
    window = max(1, min(window, array.size))
    cumulative = np.cumsum(np.insert(array, 0, 0.0))
    out = np.empty_like(array)
    out[window - 1:] = (cumulative[window:] - cumulative[:-window]) / window
    out[:window - 1] = cumulative[1:window] / np.arange(1, window)
    return out


# --- files --------------------------------------------------------------------------------------


def export_cells(records: list[dict], path: str | Path) -> Path:
    """The cells as .json (a list, one record per cell, curves included) or .csv (one row per cell)."""
    path = Path(path)
    check_writable_folder(path)
    if path.suffix == ".json":
        return atomic_write(path, lambda stream: json.dump(records, stream, indent=1))
    if path.suffix == ".csv":
        def write(stream):
            writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for record in records:
                row = {k: record.get(k) for k in CSV_COLUMNS}
                row["variant"] = json.dumps(record.get("variant") or {})  # {}: a plain cell, the baseline
                row["expected"] = ";".join(record.get("expected") or [])
                writer.writerow(row)
        return atomic_write(path, write)
    raise KVStudioError(f"cannot export cells to '{path.suffix or path.name}': use a .json or .csv file name")
