"""`kvstudio runs plot ID|RUN.json --view VIEW OUT.(png|svg|pdf|html)`: a stored run's view as a figure.

  kvstudio runs plot 12 --view token-map tokens.png --width 1600
  kvstudio runs plot 12 --view attention attention.pdf --layer 3 --head 0 --log
  kvstudio runs plot run.json --view evictions evictions.svg     (`runs export` or `run --json` wrote it)

Drawn with matplotlib's Agg canvas from the run's recording (kvstudio.core.figures): no display, no
model, no Qt.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvstudio.core.errors import KVStudioError


def add_parser(runs_commands) -> None:
    from kvstudio.core.figures.render import DEFAULT_DPI, VIEWS

    plot = runs_commands.add_parser("plot", help="one view of a stored run as .png, .svg, .pdf (token map: .html)")
    plot.add_argument("run", help="a run id (`kvstudio runs list`) or a run exported as .json")
    plot.add_argument("path", help="the figure to write: .png .svg .pdf, or .html for the token map")
    plot.add_argument("--view", required=True, choices=VIEWS, help="which view to draw")
    plot.add_argument("--layer", type=int, help="the layer (attention: the first recorded one by default; "
                                                "token map: every layer by default)")
    plot.add_argument("--head", type=int, help="attention: one query head (default: the mean over heads)")
    plot.add_argument("--log", action="store_true", help="attention: colour by log weight")
    plot.add_argument("--width", type=int, metavar="PX", help="PNG width in pixels (default 8 inches at --dpi)")
    plot.add_argument("--dpi", type=int, default=DEFAULT_DPI, help=f"dots per inch (default {DEFAULT_DPI})")


def load_recording(source: str):
    """(recorder, title) of a run: from the history by id, or from an exported .json file."""
    from kvstudio.core.recording.packing import recording_from_dict, unpack_events

    if source.isdigit():
        from kvstudio.core.persist.history import RunHistory

        history = RunHistory()
        run_id = int(source)
        history.get(run_id)  # an unknown id says so, with where to find the ids
        blob = history.events(run_id)
        if blob is None:
            raise KVStudioError(f"run {run_id} has no recorded views to plot: it ran before KV Studio kept them, "
                                "or failed before its first step")
        return unpack_events(blob), f"run {run_id}"
    path = Path(source)
    if path.suffix.lower() != ".json":
        raise KVStudioError(f"'{source}' is neither a run id nor an exported run (.json)")
    try:
        exported = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise KVStudioError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KVStudioError(f"{path} is not JSON ({error})") from None
    if not isinstance(exported, dict) or "recording" not in exported:
        raise KVStudioError(f"{path} holds no recording: export the run again with `kvstudio runs export ID "
                            f"{path.name}`")
    title = f"run {exported['id']}" if exported.get("id") is not None else path.stem
    return recording_from_dict(exported["recording"]), title


def watched_layers(text: str | None, n_layers: int) -> tuple[int, ...]:
    """`kvstudio run --attention-layers`: "all", or layer numbers separated by commas."""
    if not text:
        return ()
    if text.strip() == "all":
        return tuple(range(n_layers))
    try:
        layers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise KVStudioError(f"--attention-layers takes 'all' or layer numbers such as 0,5,11, not '{text}'") from None
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise KVStudioError(f"--attention-layers: layer {layer} is out of range: the model has layers "
                                f"0-{n_layers - 1}")
    return layers


def run(args) -> int:
    from kvstudio.core.figures.render import FigureRequest, save_view

    recorder, title = load_recording(args.run)
    request = FigureRequest(args.view, args.layer, args.head, args.width, args.dpi, args.log, title)
    path = save_view(recorder, request, args.path)
    print(f"wrote the {args.view} view of {title} to {path}")
    return 0
