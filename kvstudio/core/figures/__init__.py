"""Figures of a run, from its recording alone (no Qt, no model): what each studio view draws, as data
the views and the tests share, and as files for papers.

  colours.py     the colours of held / evicted / not-yet-fed tokens and of attention weights
  data.py        TokenMap, attention images, occupancy, evictions, memory: a recording -> arrays
  render.py      matplotlib (Agg) figures of each view as PNG, SVG or PDF, with a caption line
  token_html.py  the token map as a self-contained HTML page
"""
