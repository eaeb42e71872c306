"""Colour maps shared by the views."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg

EVICTED_RGBA = (214, 39, 40, 255)  # red: was in the cache, evicted
UNSEEN_RGBA = (30, 30, 30, 255)  # dark: not fed yet


def attention_lut() -> np.ndarray:
    """256 RGBA entries: 0 evicted, 1 unseen, 2..255 the viridis ramp for weights 0..max."""
    ramp = pg.colormap.get("viridis").getLookupTable(0.0, 1.0, 254, alpha=True)
    return np.vstack([np.array([EVICTED_RGBA, UNSEEN_RGBA], dtype=np.ubyte), ramp.astype(np.ubyte)])


def held_colour(fraction: float) -> str:
    """Hex colour from red (held by no layer) through amber to green (held by every layer)."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < 0.5:
        red, green = 220, int(60 + 320 * fraction)
    else:
        red, green = int(220 - 360 * (fraction - 0.5)), 200
    return f"#{red:02x}{green:02x}50"
