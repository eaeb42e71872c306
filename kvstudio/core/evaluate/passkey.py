"""Small, pinned evaluations of what a policy keeps: the pass-key retrieval test.

The pass-key test (Mohtashami & Jaggi, "Landmark Attention", 2023): a random number hidden in the
middle of repetitive prose, asked for at the end. A policy that evicts the key's tokens before the
question arrives cannot answer, however good its scores are elsewhere.
"""

from __future__ import annotations

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(key: str, filler_repeats: int) -> str:
    """The key in the middle of `filler_repeats` filler sentences, the question at the end.

    About 25 tokens per repeat with SmolLM2's tokenizer: 40 repeats ~ 1,000 tokens, 80 ~ 2,000.
    """
    half = FILLER * (filler_repeats // 2)
    return (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        + half + f"The pass key is {key}. Remember it. {key} is the pass key. " + half
        + "What is the pass key? The pass key is"
    )


def passkey_retrieved(generated: str, key: str) -> bool:
    """Whether the key comes back whole in the generated text."""
    return key in generated
