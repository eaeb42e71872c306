"""Small builders the tests share."""

from __future__ import annotations

import torch


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=generator).tolist()
