"""Models: specs, loading (the embedded default, tiny models, folders, GGUF) and KV-head pooling."""
