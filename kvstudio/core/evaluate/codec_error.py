"""--measure-error: how far a codec moves the model from the same run stored in fp.

The sequence a run produced (prompt + generated tokens) is fed again, teacher-forced, twice: once
stored in `fp` and once through the codec, with the same policy, chunk size and tier. At every
position that predicted a token (the prompt's last, then each decode step) the next-token
distributions are compared: KL(fp || codec), averaged over positions, in nats. The policy runs
in both, so eviction decisions that the codec changed are part of what is measured.
"""

from __future__ import annotations

import copy

import torch

from kvstudio.core.storage.base import StorageConfig
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.session import RunSession


def teacher_forced(engine, ids: list[int], prompt_tokens: int, policy, chunk_size: int):
    """Feed `ids` (prefill of the first prompt_tokens, then one decode step each); returns the
    (positions, vocab) float32 log-probabilities and the run (its step records and cache)."""
    run = RunSession(engine, engine.new_cache(policy), Recorder())
    rows = [run.prefill(ids[:prompt_tokens], chunk_size)]
    for token in ids[prompt_tokens:]:
        rows.append(run.forward([token], "decode"))
    return torch.log_softmax(torch.stack(rows).float(), dim=-1), run


def next_token_logprobs(engine, ids: list[int], prompt_tokens: int, policy, chunk_size: int) -> torch.Tensor:
    """(positions, vocab) float32 log-probabilities, teacher-forced along `ids`."""
    return teacher_forced(engine, ids, prompt_tokens, policy, chunk_size)[0]


def kl_to_fp(engine, ids: list[int], prompt_tokens: int, policy, chunk_size: int) -> tuple[float, int]:
    """Mean KL(fp || policy's codec) over the predicting positions of `ids`, and their count."""
    fp_policy = copy.copy(policy)
    fp_policy.storage = StorageConfig(**{**vars(policy.storage), "codec": "fp", "measure_error": False})
    reference = next_token_logprobs(engine, ids, prompt_tokens, fp_policy, chunk_size)
    measured = next_token_logprobs(engine, ids, prompt_tokens, policy, chunk_size)
    kl = (reference.exp() * (reference - measured)).sum(dim=-1)
    return float(kl.mean()), kl.numel()
