"""Every decoder family of the conformance matrix: exact or refused, and what a run costs.

For each tiny family (core/models/tiny_families.py: 4 layers, hidden 64, a sliding window of 8 where
the family has sliding layers): refused at load (with its line), or the max |delta logit| of the
engine under `full` against transformers' own forward and cache (one chunk against one forward, and
chunks of 5 against transformers fed the same chunks: where its own chunks differ from its one
forward, Mamba's PyTorch scan, the note says by how much; a 96-token prompt, 8 teacher-forced decode
steps); whether every built-in policy runs with its budget
held (no layer above budget + chunk); and prefill and decode time of `full` against `model.generate`
on the same model (transformers' greedy loop with its own cache), side by side in one process
(median of REPEATS).

    .venv/bin/python benchmarks/architectures.py [--families llama,gemma2]

Last lines: families_exact=N/M, families_refused=K, worst_full_vs_hf_decode_ratio=R.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate.conformance import TOLERANCE, compare_with_transformers, reference_logits
from kvstudio.core.models.loading import LoadedModel
from kvstudio.core.models.support import check_supported
from kvstudio.core.models.tiny import byte_tokenizer
from kvstudio.core.models.tiny_families import FAMILIES, build_family_model
from kvstudio.core.policies import BUILT_IN, available_policies, source_of
from kvstudio.core.runtime.cache_keyword import cache_kwargs
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.spec import create_policy

PROMPT = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1)).tolist()
DECODE_STEPS = 8
BUDGET, CHUNK = 48, 16  # above every policy's observation window (32), below the 96-token prompt
NEW_TOKENS = 32
REPEATS = 3


def median_seconds(work) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_times(model) -> tuple[float, float]:
    """transformers alone, greedy with its own cache, as generate() runs it: (prefill seconds, decode
    seconds per token), each timed on its own (generate's whole time minus a prefill is too noisy)."""
    from transformers import DynamicCache

    def one_run() -> tuple[float, float]:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            start = time.perf_counter()
            logits = model(input_ids=torch.tensor([PROMPT]), use_cache=True, logits_to_keep=1,
                           **cache_kwargs(model, cache)).logits
            prefilled = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                token = logits[0, -1].argmax().view(1, 1)
                logits = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)).logits
            done = time.perf_counter()
        return prefilled - start, (done - prefilled) / (NEW_TOKENS - 1)

    runs = [one_run() for _ in range(REPEATS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def engine_times(engine) -> tuple[float, float]:
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, chunk_size=len(PROMPT), ignore_eos=True,
                                  memory_sample_hz=0)
    results = [engine.generate(PROMPT, create_policy("full"), settings) for _ in range(REPEATS)]
    return (statistics.median(r.prefill_seconds for r in results),
            statistics.median(r.decode_seconds / max(len(r.token_ids) - 1, 1) for r in results))


def budgets_held(engine) -> str:
    """'all' when every built-in policy ran with no layer above budget + chunk, else the failures."""
    failures = []
    for name, cls in available_policies().items():
        if source_of(name) != BUILT_IN or name == "full":
            continue
        params = {"budget": BUDGET} if "budget" in {p.name for p in cls.Config.parameters()} else {}
        policy = create_policy(name, **params)
        # Each layer's own budget: PyramidKV gives lower layers more than the budget, upper ones less.
        budgets = engine.new_cache(policy).budgets
        try:
            result = engine.generate(PROMPT, policy,
                                     GenerationSettings(max_new_tokens=8, chunk_size=CHUNK, memory_sample_hz=0))
        except Exception as error:  # the benchmark reports every family, whatever fails
            failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:60]}")
            continue
        over = [layer for layer, (kept, budget) in enumerate(zip(result.peak_kept_per_layer, budgets))
                if budget is not None and kept > budget + CHUNK]
        if over:
            failures.append(f"{name}: layers {over} above their budget + chunk")
    return "all" if not failures else "; ".join(failures)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", help="comma-separated (default: all)")
    families = parser.parse_args().families
    families = families.split(",") if families else list(FAMILIES)
    exact, refused, ratios = 0, 0, {}
    print(f"{'family':<13} {'verdict':<9} {'max|dlogit|':>11} {'policies':<9} {'prefill x':>9} {'decode x':>9}  note")
    for family in families:
        model = build_family_model(family)
        try:
            check_supported(model)
        except KVStudioError as error:
            refused += 1
            print(f"{family:<13} {'refused':<9} {'-':>11} {'-':<9} {'-':>9} {'-':>9}  {error}")
            continue
        engine = Engine(LoadedModel(model, byte_tokenizer(), f"tiny {family}", family, torch.device("cpu"),
                                    torch.float32))
        reference = reference_logits(model, PROMPT, DECODE_STEPS)
        chunked = reference_logits(model, PROMPT, DECODE_STEPS, chunk_size=5)
        delta = max(compare_with_transformers(engine, PROMPT, len(PROMPT), DECODE_STEPS, reference).max_delta,
                    compare_with_transformers(engine, PROMPT, 5, DECODE_STEPS, chunked).max_delta)
        own = float((chunked.prompt - reference.prompt).abs().max())
        own_note = f"transformers' own chunks differ from its one forward by {own:.1e}; " if own > TOLERANCE else ""
        exact += delta <= TOLERANCE
        held = budgets_held(engine)
        hf_prefill, hf_decode = hf_times(model)
        ours_prefill, ours_decode = engine_times(engine)
        ratios[family] = ours_decode / hf_decode
        verdict = "exact" if delta <= TOLERANCE else "DIFFERS"
        print(f"{family:<13} {verdict:<9} {delta:>11.2e} {'all' if held == 'all' else 'some':<9} "
              f"{ours_prefill / hf_prefill:>9.2f} {ratios[family]:>9.2f}  {own_note}{'' if held == 'all' else held}")
    checked = len(families) - refused
    print(f"families_exact={exact}/{checked}")
    print(f"families_refused={refused}")
    worst = max(ratios, key=ratios.get) if ratios else None
    print(f"worst_full_vs_hf_decode_ratio={ratios[worst]:.2f} ({worst})" if worst else "worst_full_vs_hf_decode_ratio=nan")


if __name__ == "__main__":
    main()
