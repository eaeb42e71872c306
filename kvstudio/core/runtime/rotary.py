"""Moving RoPE-rotated keys to other positions, for the contiguous-positions option.

RoPE rotates each pair of dimensions (i, i + d/2) by angle position * inv_freq[i]. Rotations
compose, so a key cached at position p moves to p' by one more rotation of (p' - p): no need to
keep un-rotated keys. Any attention scaling that a RoPE variant multiplies into cos/sin is already
in the cached key and must not be applied twice, so the delta rotation uses plain cos/sin.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rerotator:
    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()
        self.rotary_dim = 2 * inv_freq.shape[0]  # may be less than head_dim (partial rotary)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> Rerotator | None:
        """The model's rotary embedding, or None for models without RoPE."""
        for module in model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor):
                return cls(inv_freq)
        return None

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """keys (1, kv_heads, n, head_dim) rotated by delta (kv_heads, n) positions."""
        angles = delta.to(keys.device).float()[..., None] * self.inv_freq.to(keys.device)  # (kv, n, d/2)
        angles = torch.cat((angles, angles), dim=-1)[None]
        rotary, rest = keys[..., : self.rotary_dim].float(), keys[..., self.rotary_dim:]
        rotated = rotary * angles.cos() + rotate_half(rotary) * angles.sin()
        return torch.cat((rotated.to(keys.dtype), rest), dim=-1)
