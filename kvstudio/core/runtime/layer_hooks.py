"""Between two decoder layers: where a long prefill chunk can stop, and show how far it got.

A 512-token chunk of a 30-layer model takes seconds on a CPU (tens under load). Checking the
cancellation flag only between chunks made Stop wait for the whole chunk, and the prefill progress
stood still meanwhile. A forward pre-hook on every decoder layer calls back with the layer's index
before it runs: the engine raises `StepCancelled` there when Stop was pressed, and records how many
layers of the chunk are done. The hooks live only for one run (`layer_callbacks`), cost one Python
call per layer and step, and never touch the tensors.
"""

from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn


class StepCancelled(Exception):
    """The run was cancelled between two decoder layers of a forward step; the step is abandoned."""


def decoder_layers(model: nn.Module, n_layers: int) -> list[nn.Module]:
    """The model's decoder layers, in order: its decoder's `layers`, else the one ModuleList of
    `n_layers` modules (models wrapped by peft or of another layout)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == n_layers:
        return list(layers)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    return list(candidates[0]) if len(candidates) == 1 else []


@contextlib.contextmanager
def layer_callbacks(model: nn.Module, n_layers: int, before_layer: Callable[[int], None]):
    """Within the block, `before_layer(index)` runs before each decoder layer's forward; an exception
    it raises ends the forward step there. A model whose layers cannot be found runs without."""
    handles = [layer.register_forward_pre_hook(lambda _module, _args, index=index: before_layer(index))
               for index, layer in enumerate(decoder_layers(model, n_layers))]
    try:
        yield len(handles) > 0
    finally:
        for handle in handles:
            handle.remove()
