"""Evaluation: how much a policy costs in quality, measured on tasks that need no download.

  haystack.py     real prose (Python's own pydoc_data.topics) and token-exact contexts with needles
  tasks.py        generation tasks: pass key and needle grids, RULER-style synthetic tasks, QA files
  language.py     perplexity and KL to the full cache along a long text fed through the policy
  metrics.py      exact match, token F1, partial digits, string matches, KL, perplexity
  sweep.py        policies x budgets (x variants) x task samples: each cell stored as it finishes,
                  so a cancelled or crashed sweep resumes where it stopped
  cluster.py      the same sweep's cells on Ray workers (the `cluster` extra), stored here as they
                  finish; cluster_worker.py is what runs on each worker
  results.py      tables, summaries, CSV/JSON exports of the stored cells
  figures.py      needle heatmaps, score vs budget, score vs cache bytes, perplexity/KL curves
                  (matplotlib without pyplot: PNG and SVG, no GUI toolkit)
  codec_error.py  --measure-error: a codec's KL to the same run stored in fp
  passkey.py      the original filler pass-key prompt (tests/test_passkey.py, benchmarks/passkey.py)
"""

from kvstudio.core.evaluate.passkey import FILLER, passkey_prompt, passkey_retrieved

__all__ = ["FILLER", "passkey_prompt", "passkey_retrieved"]
