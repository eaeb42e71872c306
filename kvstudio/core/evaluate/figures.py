"""The figures people look at, as PNG or SVG files: needle heatmaps per policy (KVCache-Factory's
figure: depth x context length), score vs budget per policy, score vs cache bytes with the Pareto
front, and perplexity / KL along the text.

matplotlib through its object API and the Agg canvas only: pyplot is never imported, so no GUI
toolkit is touched (the core never imports Qt) and figures render on a machine without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kvstudio.core.io.atomic import atomic_produce, check_writable_folder
from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.results import (LOWER_IS_BETTER, needle_grid, pareto_front, protocol_of, running_mean,
                                            score_by_budget, score_by_bytes, series)

FORMATS = (".png", ".svg")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def needle_heatmaps(figure, records: list[dict], metric: str = "score") -> None:
    from matplotlib.colors import LinearSegmentedColormap

    labels = series(records)
    columns = min(3, len(labels))
    rows = math.ceil(len(labels) / columns)
    # KVCache-Factory's colours: red (lost) through yellow to green (found).
    colours = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    image = None
    for index, label in enumerate(labels):
        axes = figure.add_subplot(rows, columns, index + 1)
        lengths, depths, grid = needle_grid(records, label, metric)
        image = axes.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=0, vmax=1, aspect="auto")
        axes.set_xticks(range(len(lengths)), [f"{n / 1024:g}k" if n % 256 == 0 else str(n) for n in lengths])
        axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        mean = np.nanmean(grid) if np.isfinite(grid).any() else float("nan")
        axes.set_title(f"{label}  (mean {mean:.2f})", fontsize=10)
        axes.set_xlabel("context tokens")
        if index % columns == 0:
            axes.set_ylabel("needle depth")
        for (row, column), value in np.ndenumerate(grid):
            if np.isfinite(value):
                axes.text(column, row, f"{value:.2f}".rstrip("0").rstrip(".") if value not in (0, 1) else
                          f"{value:.0f}", ha="center", va="center", fontsize=8, color="#222")
    if image is not None:
        figure.colorbar(image, ax=figure.axes, shrink=0.8, label=metric.replace("_", " "))


def budget_and_bytes(figure, records: list[dict]) -> None:
    task = records[0]["task"]
    higher = task not in LOWER_IS_BETTER
    name = {"perplexity": "perplexity", "kl": "mean KL to full (nats)"}.get(task, "mean score")
    by_budget = figure.add_subplot(1, 2, 1)
    for label, (budgets, scores) in score_by_budget(records).items():
        if budgets == [None]:
            by_budget.axhline(scores[0], linestyle="--", color="#555", label=f"{label} (no budget)")
            continue
        pairs = sorted((b, s) for b, s in zip(budgets, scores) if b is not None)
        by_budget.plot([b for b, _ in pairs], [s for _, s in pairs], marker="o", label=label)
    by_budget.set_xscale("log", base=2)
    by_budget.set_xlabel("budget (entries per layer and KV head)")
    by_budget.set_ylabel(name)
    by_budget.set_title(f"{task}: {name} vs budget", fontsize=10)
    by_budget.legend(fontsize=8)
    by_bytes = figure.add_subplot(1, 2, 2)
    points = []
    for label, (sizes, scores) in score_by_bytes(records).items():
        mib = [s / 2**20 for s in sizes]
        by_bytes.scatter(mib, scores, label=label, s=28)
        points += list(zip(mib, scores))
    front = pareto_front([p for p in points if not math.isnan(p[1])], higher_is_better=higher)
    if front:
        by_bytes.step([x for x, _ in front], [y for _, y in front], where="post", color="#333", linewidth=1,
                      label="Pareto front")
    by_bytes.set_xlabel("peak cache (MiB)")
    by_bytes.set_ylabel(name)
    by_bytes.set_title(f"{name} vs cache bytes", fontsize=10)
    by_bytes.legend(fontsize=7)


def language_curves(figure, records: list[dict], window: int = 128) -> None:
    nll = figure.add_subplot(2, 1, 1)
    kl = figure.add_subplot(2, 1, 2, sharex=nll)
    for record in records:
        label = f"{record['policy']}" + ("" if record.get("budget") is None else f" @ {record['budget']}")
        positions = record.get("positions") or []
        if not positions:
            continue
        nll.plot(positions, np.exp(-running_mean(record["true_logprobs"], window)), label=label, linewidth=1)
        kl.plot(positions, running_mean(record["kl"], window), label=label, linewidth=1)
    nll.set_ylabel(f"perplexity ({window}-token window)")
    nll.set_title("perplexity and KL to the full cache along the text", fontsize=10)
    nll.legend(fontsize=7, ncol=2)
    kl.set_ylabel("KL(full || policy), nats")
    kl.set_xlabel("token position")


def save_figure(records: list[dict], path: str | Path, kind: str | None = None, metric: str = "score") -> Path:
    """Draw the task's figure into `path` (.png or .svg): heatmaps for passkey/needle, curves for
    perplexity/kl, score vs budget and vs bytes otherwise. `kind` forces one: heatmap | budget | curves."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise KVStudioError(f"a figure is saved as .png or .svg, not '{path.suffix or path.name}'")
    check_writable_folder(path)
    if not records:
        raise KVStudioError("no finished cells to plot yet")
    task = records[0]["task"]
    kind = kind or {"passkey": "heatmap", "needle": "heatmap", "perplexity": "curves", "kl": "curves"}.get(task,
                                                                                                          "budget")
    if kind == "heatmap":
        count = len(series(records))
        figure = _figure(4.2 * min(3, count), 3.2 * math.ceil(count / 3) + 0.4)
        needle_heatmaps(figure, records, metric)
    elif kind == "curves":
        figure = _figure(9, 6)
        language_curves(figure, records)
    else:
        figure = _figure(11, 4.2)
        budget_and_bytes(figure, records)
    protocols = sorted({p for p in map(protocol_of, records) if p is not None})
    if protocols:  # a generation task's figure says how the question met the policy
        figure.suptitle(f"protocol{'s' if len(protocols) > 1 else ''}: {', '.join(protocols)}", fontsize=9,
                        x=0.01, ha="left")
    return atomic_produce(path, lambda temporary: figure.savefig(temporary, format=path.suffix[1:].lower()))
