"""The token map as one self-contained HTML page: the text as the model saw it, each token on the colour
the studio gives it, a hover (title) per token, a colour key, where the prompt ends, and the caption."""

from __future__ import annotations

import html

import numpy as np

from kvstudio.core.figures import colours
from kvstudio.core.figures.data import TokenMap

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 60em; }}
.tokens {{ font-family: monospace; white-space: pre-wrap; line-height: 1.6; }}
.tokens span {{ color: #111; }}
.tokens span.unfed {{ color: {unfed_text}; }}
.key span.swatch {{ display: inline-block; width: 1em; height: 1em; vertical-align: middle; border: 1px solid #888; }}
.boundary {{ color: #1f3fbf; font-weight: bold; }}
.caption {{ color: #444; font-size: 0.9em; }}
</style></head><body>
<p class="caption">{caption}</p>
<p>{summary}</p>
<p class="key">{key}</p>
<div class="tokens">{tokens}</div>
</body></html>
"""


def token_map_html(recorder, layer: int | None, caption: str) -> str:
    """`layer` None colours by how many layers hold each token; a layer number by its KV heads."""
    token_map = TokenMap.for_run(recorder.all("runs")[-1])
    token_map.add({kind: recorder.all(kind) for kind in ("tokens", "steps", "evictions", "recalls")})
    fractions = token_map.held_fractions(layer)
    spans = []
    for position, fraction in enumerate(fractions):
        if position == token_map.prompt_count:
            spans.append('<span class="boundary" title="the prompt ends here; generated text follows">▍</span>')
        unfed = bool(np.isnan(fraction))
        colour = colours.UNFED if unfed else colours.held_colour(float(fraction))
        text = token_map.tokens[position].replace("\n", "↵\n") or "·"
        spans.append(f'<span{" class=unfed" if unfed else ""} style="background:{colour}" '
                     f'title="{html.escape(token_map.describe(position, layer))}">{html.escape(text)}</span>')
    scope = "layers" if layer is None else "heads"
    key = " ".join(f'<span class="swatch" style="background:{colour}"></span> {html.escape(label)}'
                   for colour, label in colours.held_key(scope))
    key += ' &nbsp;<span class="boundary">▍</span> the prompt ends, generated text begins'
    n = len(fractions)
    where = "every layer" if layer is None else f"layer {layer}"
    summary = (f"{n} tokens ({token_map.prompt_count} prompt, {n - token_map.prompt_count} generated) · "
               f"{token_map.gone_count(layer)} gone from {where} · {n - token_map.fed_count} not fed")
    return PAGE.format(title=html.escape(caption), caption=html.escape(caption), summary=html.escape(summary), key=key,
                       tokens="".join(spans), unfed_text=colours.UNFED_TEXT)
