"""Small builders the tests share."""

from __future__ import annotations

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=generator).tolist()


def passkey_prompt(key: str, filler_repeats: int) -> str:
    """A pass key in the middle of repetitive prose, the question at the end (the Landmark-attention test)."""
    half = FILLER * (filler_repeats // 2)
    return (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        + half + f"The pass key is {key}. Remember it. {key} is the pass key. " + half
        + "What is the pass key? The pass key is"
    )
