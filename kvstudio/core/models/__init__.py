"""Models: specs and loading (loading.py), the embedded default (default_model.py), tiny models built in code
(tiny.py), devices and dtypes (devices.py), KV-head pooling (kv_pooling.py)."""
