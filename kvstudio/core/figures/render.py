"""A run's views as figure files (PNG at a chosen width and DPI, SVG, PDF; the token map also as HTML),
each with a caption line: model, policy and parameters, layer, head.

matplotlib through its object API and the Agg canvas only (as core/evaluate/figures.py): no GUI
toolkit is touched, so `kvstudio runs plot` works without a display. The data come from data.py, the
same computation the studio's views use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstudio.core.io.atomic import atomic_produce, atomic_write, check_writable_folder
from kvstudio.core.errors import KVStudioError
from kvstudio.core.units import MIB
from kvstudio.core.figures import colours, data
from kvstudio.core.figures.token_html import token_map_html

VIEWS = ("token-map", "attention", "occupancy", "evictions", "memory")
FORMATS = (".png", ".svg", ".pdf", ".html")
DEFAULT_DPI = 150
DEFAULT_SIZE_IN = (8.0, 5.0)
TOKENS_PER_ROW = 64  # the token-map image: one cell per token, in rows like a page of text


@dataclass
class FigureRequest:
    view: str
    layer: int | None = None  # attention, evictions, token map ("all layers" when None)
    head: int | None = None  # attention: None is the mean over heads
    width_px: int | None = None  # PNG: the image's width in pixels (the height follows the view's shape)
    dpi: int = DEFAULT_DPI
    log_scale: bool = False  # attention: colour by log weight
    title: str = ""  # the run, e.g. "run 12", in the caption


def _events(recorder) -> dict:
    return {kind: recorder.all(kind) for kind in ("runs", "tokens", "steps", "evictions", "attention", "memory",
                                                    "recalls")}


def caption(run, request: FigureRequest) -> str:
    """model · policy(parameters) · layer · head · run: what a reader of the figure needs to know."""
    parts = [run.model, run.policy.removesuffix("()")]  # 'full', not 'full()': a policy without parameters
    if request.view in ("attention", "evictions") or (request.view == "token-map" and request.layer is not None):
        parts.append(f"layer {request.layer}")
    elif request.view == "token-map":
        parts.append("all layers")
    if request.view == "attention":
        parts.append("mean over heads" if request.head is None else f"head {request.head}")
        parts.append("log scale" if request.log_scale else "linear scale")
    if request.title:
        parts.append(request.title)
    return " · ".join(parts)


def check_request(recorder, request: FigureRequest) -> None:
    """Refuse, with what to do, a view the run has no data for or a layer or head out of range."""
    events = _events(recorder)
    if not events["runs"]:
        raise KVStudioError("the run has no recorded views: it stopped before its first step")
    run = events["runs"][-1]
    if request.view not in VIEWS:
        raise KVStudioError(f"unknown view '{request.view}': choose one of {', '.join(VIEWS)}")
    if request.layer is not None:
        data.check_layer(request.layer, run.n_layers)
    if request.view == "attention":
        recorded = data.recorded_layers(events["attention"])
        if not recorded:
            raise KVStudioError("the run recorded no attention rows: no layer was watched while it ran (record them "
                                "with `kvstudio run --attention-layers all`, or in the studio's Attention map)")
        if request.layer is not None and request.layer not in recorded:
            raise KVStudioError(f"layer {request.layer} was not recorded in this run (recorded: "
                                f"{', '.join(map(str, recorded))}); record every layer in the Attention map "
                                "view before a run to plot any")
        heads = run.n_heads or run.n_kv_heads
        if request.head is not None and not 0 <= request.head < heads:
            raise KVStudioError(f"head {request.head} is out of range: the model has query heads 0-{heads - 1}")
    if request.view in ("occupancy", "evictions") and not events["steps"]:
        raise KVStudioError(f"the run has no {request.view} to plot: it finished no step")
    if request.view == "memory" and not events["memory"]:
        raise KVStudioError("the run has no memory readings to plot")


def _resolve_layer(recorder, request: FigureRequest) -> FigureRequest:
    """A layer for the views that need one: attention the first recorded layer, evictions the middle."""
    if request.layer is not None or request.view not in ("attention", "evictions"):
        return request
    run = recorder.all("runs")[-1]
    recorded = data.recorded_layers(recorder.all("attention"))
    layer = recorded[0] if request.view == "attention" and recorded else run.n_layers // 2
    return FigureRequest(**{**vars(request), "layer": layer})


def save_view(recorder, request: FigureRequest, path: str | Path) -> Path:
    """Write one view of a recorded run into `path` (.png .svg .pdf; .html for the token map)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise KVStudioError(f"cannot write a figure as '{path.suffix or path.name}': use .png, .svg, .pdf"
                            " (or .html for the token map)")
    if suffix == ".html" and request.view != "token-map":
        raise KVStudioError("only the token map is written as .html: use .png, .svg or .pdf for the "
                            f"{request.view} view")
    if request.width_px is not None and request.width_px < 100:
        raise KVStudioError(f"--width must be at least 100 pixels, got {request.width_px}")
    if not 20 <= request.dpi <= 1200:
        raise KVStudioError(f"--dpi must be between 20 and 1200, got {request.dpi}")
    check_writable_folder(path)
    check_request(recorder, request)
    request = _resolve_layer(recorder, request)
    if suffix == ".html":
        html = token_map_html(recorder, request.layer, caption(recorder.all("runs")[-1], request))
        return atomic_write(path, lambda stream: stream.write(html))
    figure = draw(recorder, request)

    def produce(temporary: Path) -> None:
        from matplotlib import rc_context

        with rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable and editable in a paper
            figure.savefig(temporary, format=suffix[1:], dpi=request.dpi)
    return atomic_produce(path, produce)


def draw(recorder, request: FigureRequest):
    """The matplotlib Figure of one view (sized for request.width_px at request.dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = _events(recorder)
    run = events["runs"][-1]
    width_in, height_in = DEFAULT_SIZE_IN
    if request.view == "token-map":
        rows = math.ceil(max(len(token_map_of(events).tokens), 1) / TOKENS_PER_ROW)
        height_in = min(max(2.2, 1.6 + rows * 0.12), 12)
    if request.width_px is not None:
        scale = request.width_px / request.dpi / width_in
        width_in, height_in = width_in * scale, height_in * scale
    figure = Figure(figsize=(width_in, height_in), dpi=request.dpi, layout="constrained")
    FigureCanvasAgg(figure)
    DRAWERS[request.view](figure, events, request)
    figure.get_layout_engine().set(h_pad=0.05)
    figure.supxlabel(caption(run, request), fontsize=8, color="#444")
    return figure


def token_map_of(events: dict) -> data.TokenMap:
    """The token map a recording ends with."""
    token_map = data.TokenMap.for_run(events["runs"][-1])
    token_map.add(events)
    return token_map


def _token_map(figure, events, request: FigureRequest) -> None:
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    token_map = token_map_of(events)
    fractions = token_map.held_fractions(request.layer)
    n = len(fractions)
    rows = max(math.ceil(n / TOKENS_PER_ROW), 1)
    grid = np.ones((rows * TOKENS_PER_ROW, 3))
    for index, fraction in enumerate(fractions):
        colour = colours.UNFED if np.isnan(fraction) else colours.held_colour(float(fraction))
        grid[index] = to_rgb(colour)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(grid.reshape(rows, TOKENS_PER_ROW, 3), aspect="auto", interpolation="nearest",
                extent=(0, TOKENS_PER_ROW, rows, 0))
    boundary = token_map.prompt_count
    if boundary < n:  # where the prompt ends and the generated text begins
        row, column = divmod(boundary, TOKENS_PER_ROW)
        axes.plot([column, column], [row, row + 1], color="#1f3fbf", linewidth=2.5)
        axes.annotate("generated →", (column, row), xytext=(0, 3), textcoords="offset points", fontsize=7,
                      color="#1f3fbf")
    axes.set_xlabel(f"token position mod {TOKENS_PER_ROW}")
    axes.set_ylabel(f"row ({TOKENS_PER_ROW} tokens each)")
    scope = "layers" if request.layer is None else "heads"
    gone = token_map.gone_count(request.layer)
    axes.set_title(f"{n} tokens ({token_map.prompt_count} prompt, {n - token_map.prompt_count} generated) · "
                   f"{gone} gone from {'every layer' if request.layer is None else f'layer {request.layer}'}",
                   fontsize=9)
    handles = [Patch(facecolor=colour, edgecolor="#888", label=label) for colour, label in colours.held_key(scope)]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12 * 5 / figure.get_figheight()),
                ncol=4, fontsize=7, frameon=False)


def _attention(figure, events, request: FigureRequest) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = data.attention_image(events["attention"], request.layer, request.head)
    top = data.attention_top(image)
    scaled = data.scale_attention(image, top, request.log_scale)
    axes = figure.add_subplot(1, 1, 1)
    height, width = image.shape
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    shown = axes.imshow(np.ma.masked_less(scaled, 0), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                        interpolation="nearest", extent=extent)
    for marker, rgba in ((data.EVICTED, colours.ATTENTION_EVICTED_RGBA), (data.UNSEEN, colours.ATTENTION_UNSEEN_RGBA)):
        mask = np.ma.masked_where(scaled != marker, np.ones_like(scaled))
        axes.imshow(mask, cmap=ListedColormap([np.array(rgba) / 255]), aspect="auto", interpolation="nearest",
                    extent=extent)
    axes.set_xlabel("key position")
    axes.set_ylabel("step (the step's newest query)")
    bar = figure.colorbar(shown, ax=axes, shrink=0.9)
    if request.log_scale:
        ticks = np.linspace(0, 1, int(data.LOG_DECADES) + 1)
        bar.set_ticks(ticks, labels=[f"{top * 10 ** (-data.LOG_DECADES * (1 - t)):.0e}" for t in ticks])
    else:
        bar.set_ticks(np.linspace(0, 1, 5), labels=[f"{top * t:.3g}" for t in np.linspace(0, 1, 5)])
    bar.set_label("attention weight" + (" (log)" if request.log_scale else ""))
    axes.legend(handles=[Patch(facecolor=np.array(colours.ATTENTION_EVICTED_RGBA) / 255, label="evicted"),
                         Patch(facecolor=np.array(colours.ATTENTION_UNSEEN_RGBA) / 255, edgecolor="#888",
                               label="not yet seen")],
                loc="lower left", fontsize=7, framealpha=0.9)


def _occupancy(figure, events, request: FigureRequest) -> None:
    occupancy = data.occupancy(events["runs"], events["steps"], events["memory"])
    per_layer, totals = figure.subplots(2, 1, height_ratios=(3, 2))
    layers = np.arange(len(occupancy.per_layer))
    per_layer.bar(layers, occupancy.per_layer, width=0.8, color="#508cdc", label="entries held")
    if not np.all(np.isnan(occupancy.budgets)):
        per_layer.stairs(occupancy.budgets, np.append(layers - 0.5, layers[-1] + 0.5), color="#e6503c",
                         linewidth=2, label="budget")
    if occupancy.has_windows:
        per_layer.stairs(occupancy.windows, np.append(layers - 0.5, layers[-1] + 0.5), color=colours.TIER_COLOURS["window"],
                         linewidth=2, linestyle="--", label="sliding window")
    per_layer.set_xlabel("layer")
    per_layer.set_ylabel("entries")
    limits = [b for b in occupancy.budgets + occupancy.windows if b == b]
    per_layer.set_ylim(*data.padded_range(list(occupancy.per_layer) + limits))
    per_layer.legend(fontsize=7)
    totals.plot(np.arange(len(occupancy.totals)), occupancy.totals, color="#508cdc", linewidth=1.5)
    totals.set_xlabel("step")
    totals.set_ylabel("entries, all layers")
    totals.set_ylim(*data.padded_range(occupancy.totals))


def _evictions(figure, events, request: FigureRequest) -> None:
    raster, counts = figure.subplots(2, 1, height_ratios=(3, 2), sharex=True)
    steps, positions = data.eviction_points(events["evictions"], request.layer)
    raster.scatter(steps, positions, s=3, color="#d62728", alpha=0.7, linewidths=0)
    raster.set_ylabel("token position evicted")
    if not len(steps):
        raster.text(0.5, 0.5, f"no evictions in layer {request.layer}", ha="center", va="center",
                    transform=raster.transAxes, color="#666")
    per_step = [s.evicted for s in events["steps"]]
    counts.stairs(per_step, np.arange(len(per_step) + 1) - 0.5, color="#d62728", linewidth=1.5)
    counts.set_ylim(*data.padded_range(per_step))
    counts.set_xlabel("step")
    counts.set_ylabel("entries evicted\n(all layers, heads)")


def _memory(figure, events, request: FigureRequest) -> None:
    series = data.memory_series(events["memory"])
    cache, system = figure.subplots(2, 1, sharex=True)
    seconds = series["seconds"]
    cache.plot(seconds, series["cache_bytes"] / MIB, color="#508cdc", label="KV cache")
    if series["host_cache_bytes"].any():
        cache.plot(seconds, series["host_cache_bytes"] / MIB, color="#e69628", linestyle="--", label="host tier")
    cache.set_ylim(*data.padded_range(np.concatenate([series["cache_bytes"], series["host_cache_bytes"]]) / MIB))
    cache.set_ylabel("cache (MiB)")
    cache.legend(fontsize=7)
    system.plot(seconds, series["process_bytes"] / MIB, color="#888")
    system.set_ylim(*data.padded_range(series["process_bytes"] / MIB))
    system.set_ylabel("process (MiB)")
    system.set_xlabel("seconds since the run started")
    for axes in (cache, system):  # prefill and decode, shaded as in the studio
        for phase, colour in (("prefill", "#4678c8"), ("decode", "#50b45a")):
            inside = series["phase"] == phase
            if inside.any():
                axes.axvspan(seconds[inside].min(), seconds[inside].max(), color=colour, alpha=0.12, linewidth=0)


DRAWERS = {"token-map": _token_map, "attention": _attention, "occupancy": _occupancy, "evictions": _evictions,
           "memory": _memory}
