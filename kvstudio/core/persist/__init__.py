"""What KV Studio keeps on disk about a computation: saved caches (a run's whole state, to restore and
continue bit-identically) and the prompt cache (saved caches keyed by prompt, reused across runs).

  run_state.py      RunState: everything a run needs to go on (cache layers, policy state, tokens,
                    last logits, sampler RNG, step counter), captured from and restored into the engine
  layer_tensors.py  the one place that reads and writes a cache layer's tensors (codecs hook in here)
  fingerprint.py    cheap fingerprints of a model and a tokenizer, to refuse a cache made by another
  saved_cache.py    the file: safetensors + JSON header, zstandard, checksum, atomic; every refusal
  prompt_cache.py   a folder of saved caches named by (model, policy, chunk size, prompt tokens)
"""
