"""Colours shared by the studio's views and the figures written from a recording."""

from __future__ import annotations

EVICTED = "#dc4632"  # red: was in the cache, evicted
UNFED = "#d9d9d9"  # light grey: a token the model has not been fed yet (prefill not there yet, or stopped)
UNFED_TEXT = "#777777"
TIER_COLOURS = {"device": "#5cc850", "host": "#6a9ae6", "recalled": "#b47ae6", "evicted": EVICTED,
                "retained": "#e6c84a",  # retained: kept unmerged by MiniCache (core/storage/minicache.py)
                "window": "#a8896c"}  # left a sliding layer's window: gone, but not by the policy

# The attention image: viridis for weights; red where the entry was evicted; near-white where the
# token was not seen yet, so "not there yet" never reads as a low weight (viridis' low end is dark).
ATTENTION_EVICTED_RGBA = (214, 39, 40, 255)
ATTENTION_UNSEEN_RGBA = (245, 245, 245, 255)


def held_colour(fraction: float) -> str:
    """Hex colour from red (held by no layer) through amber to green (held by every layer)."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < 0.5:
        red, green = 220, int(60 + 320 * fraction)
    else:
        red, green = int(220 - 360 * (fraction - 0.5)), 200
    return f"#{red:02x}{green:02x}50"


def held_key(scope: str) -> list[tuple[str, str]]:
    """(colour, meaning) pairs of the token map's colour key; `scope` is "layers" or "heads"."""
    whole = "every layer holds it" if scope == "layers" else "every KV head of this layer holds it"
    some = "some layers hold it" if scope == "layers" else "some KV heads hold it"
    gone = "evicted from every layer" if scope == "layers" else "evicted from this layer"
    return [(held_colour(1.0), whole), (held_colour(0.5), some), (held_colour(0.0), gone), (UNFED, "not fed yet")]
