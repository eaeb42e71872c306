"""Colour maps shared by the views (the colours themselves live in kvstudio.core.figures.colours, which
the figure export uses too)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg

from kvstudio.core.figures.colours import ATTENTION_EVICTED_RGBA, ATTENTION_UNSEEN_RGBA, held_colour  # noqa: F401

EVICTED_RGBA = ATTENTION_EVICTED_RGBA  # red: was in the cache, evicted
UNSEEN_RGBA = ATTENTION_UNSEEN_RGBA  # near-white: not fed yet (the ramp's dark end is a low weight)


def attention_lut() -> np.ndarray:
    """256 RGBA entries: 0 evicted, 1 unseen, 2..255 the viridis ramp for weights 0..max."""
    ramp = pg.colormap.get("viridis").getLookupTable(0.0, 1.0, 254, alpha=True)
    return np.vstack([np.array([EVICTED_RGBA, UNSEEN_RGBA], dtype=np.ubyte), ramp.astype(np.ubyte)])
