"""Small builders the tests share."""

from __future__ import annotations

import torch


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=generator).tolist()


def check_policy_invariants(policy, prompt_length, chunk_size, new_tokens, seed, sink=0):
    """Run `policy` on tiny-llama and check what every policy must guarantee; returns the result.

    Entries held never exceed the policy's limit; held positions are unique and increasing; an
    evicted entry never returns; the first `sink` tokens stay; a prefill step never ends above the
    budget, and nothing ever holds more than budget + one chunk (or + the decoded tokens).
    """
    from kvstudio.core.runtime.engine import GenerationSettings
    from kvstudio.core.recording.events import Recorder

    from .conftest import engine_for

    engine = engine_for("tiny-llama")
    recorder = Recorder(watch_layers=range(4))
    result = engine.generate(random_ids(prompt_length, seed=seed), policy,
                             GenerationSettings(max_new_tokens=new_tokens, chunk_size=chunk_size),
                             recorder=recorder, keep_cache=True)
    held_by_step = {(a.step, a.layer): a.positions for a in recorder.all("attention")}
    evicted_so_far: dict[tuple[int, int], set[int]] = {}
    for step in recorder.all("steps"):
        for layer in range(4):
            limit = policy.limit_for(layer, 4, step.phase)
            assert limit is None or step.kept_per_layer[layer] <= limit
            for head, row in enumerate(held_by_step[(step.step, layer)]):
                row = row.tolist()
                assert row == sorted(set(row))
                assert not evicted_so_far.get((layer, head), set()) & set(row)
                assert row[: min(sink, len(row))] == list(range(min(sink, len(row))))
        for eviction in recorder.all("evictions"):
            if eviction.step == step.step:
                evicted_so_far.setdefault((eviction.layer, eviction.kv_head), set()).update(eviction.positions.tolist())
    budgets = [policy.budget_for(layer, 4) for layer in range(4)]
    prefill = [max(s.kept_per_layer) for s in recorder.all("steps") if s.phase == "prefill"]
    assert max(prefill, default=0) <= max(budgets)
    assert max(result.peak_kept_per_layer) <= max(budgets) + max(chunk_size, new_tokens)
    return result


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`kvstudio ARGV` in-process, as a user types it: (exit status, stdout, stderr)."""
    from kvstudio.cli.dispatch import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
