"""What KV Studio keeps on disk about a computation: saved caches (a run's whole state, to restore and
continue bit-identically) and the prompt cache (saved caches keyed by prompt, reused across runs).

  (a run's state itself, RunState, and the layer tensors are core/runtime: run_state.py, layer_tensors.py)
  history.py        the run history (SQLite), every run kept
  exports.py        a run as JSON, CSV or .npy
  fingerprint.py    cheap fingerprints of a model and a tokenizer, to refuse a cache made by another
  saved_cache.py    the file: safetensors + JSON header, zstandard, checksum, atomic; every refusal
  prompt_cache.py   a folder of saved caches named by (model, policy, chunk size, prompt tokens)
  internal_errors.py  the last net: an unexpected exception as one line and a report file under the data folder
"""
