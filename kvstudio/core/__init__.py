"""The engine of KV Studio. Nothing below this package imports Qt (a test enforces it)."""
