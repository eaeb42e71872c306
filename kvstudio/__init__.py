"""KV Studio: see and shape what a language model keeps in its KV cache."""

__version__ = "0.1.0"
