"""KV Studio: see and shape what a language model keeps in its KV cache."""

import os

__version__ = "0.1.0"

# Idle OpenMP workers sleep at once rather than spin (libgomp spins 300,000 times by default). On a
# CPU shared with anything else (another process, the studio's own window thread) a spinning torch
# worker and the one with work took turns on a core at every one of the forward pass's hundreds of
# small parallel regions: a fine-tune validation of 2 examples of 241 tokens took 18-38 s on the
# default model instead of 3-4 s (benchmarks/omp_wait.py). Read by libgomp when torch loads it, so
# it is set here, before any kvstudio module imports torch; a user's own setting stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
