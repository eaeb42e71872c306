"""Is the studio as fast as the command line, and flat in memory?

The same model object, prompt and settings, interleaved in one process:
  - a run in the studio (the real window, offscreen, every view live, the token map shown) against
    the engine alone (what `kvstudio run` does: a Recorder, no window), for `full` and h2o;
  - Compare of 3 policies in the studio against the same 3 runs headless;
  - the process's resident memory after 5 studio runs and after N (runs past the shown one must
    live on disk, not in memory).
tokens/s is decode tokens/s, as the run summary and the Compare table report it (studio 15.2 against
CLI 20.9 was the finding); throughput, (computed prompt + generated tokens) / (prefill + decode
seconds), counts the prefill too, where Compare once lost most (30-47 s against 3.7 s). Ratios are the
median over the interleaved pairs.

Last lines: studio_vs_headless_throughput=<x>, studio_vs_headless_tokens_per_second=<x> (target >= 0.9),
compare_vs_headless_tokens_per_second=<x> (>= 0.9), studio_rss_growth_mb_per_10_runs=<x> (<= 20).

usage: python benchmarks/studio_throughput.py [--model default] [--prompt-tokens 1700] [--new-tokens 64]
       python benchmarks/studio_throughput.py --quick        (tiny-llama, short: a check that it runs)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, os.path.dirname(__file__))

import psutil  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from common import prompt_of_length  # noqa: E402
from kvstudio.core.recording.events import Recorder  # noqa: E402
from kvstudio.core.spec import build_policy  # noqa: E402

COMPARED = ("full", "h2o", "snapkv")


def throughput(result) -> float:
    seconds = result.prefill_seconds + result.decode_seconds
    return (result.computed_prompt_tokens + len(result.token_ids)) / seconds if seconds > 0 else 0.0


def wait(app, done, timeout_s: float = 3600) -> None:
    """Spin the studio's event loop (it draws, the timers fire) until `done()`."""
    end = time.monotonic() + timeout_s
    while not done():
        app.processEvents()
        time.sleep(0.002)
        if time.monotonic() > end:
            raise TimeoutError("the studio did not finish in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-tokens", type=int, default=1700)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved pairs per policy")
    parser.add_argument("--rss-runs", type=int, default=50)
    parser.add_argument("--rss-prompt-tokens", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny-llama, short runs: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.model, args.prompt_tokens, args.new_tokens, args.rss_runs = "tiny-llama", 600, 16, 12

    from kvstudio.gui.app import configure_plots
    from kvstudio.gui.main_window import MainWindow

    app = QApplication([])
    configure_plots()
    folder = tempfile.mkdtemp(prefix="kvstudio-throughput-")
    os.environ.setdefault("KVSTUDIO_DATA_DIR", folder)  # its own run history, not the user's
    window = MainWindow(QSettings(os.path.join(folder, "settings.ini"), QSettings.IniFormat))
    window.resize(1600, 1000)
    window.show()
    window.docks["Token map"].raise_()  # the largest view, shown while the studio runs
    window.loading.request_load(args.model, "auto", "auto")
    wait(app, lambda: window.state.model_info is not None and not window.state.busy, 600)
    engine = window.worker.engine
    text = engine.tokenizer.decode(prompt_of_length(engine, args.prompt_tokens))
    form = window.form
    form.max_new_tokens.setValue(args.new_tokens)
    form.chunk_size.setValue(args.chunk_size)
    form.temperature.setValue(0.0)
    window.prompt_area.prompt.setPlainText(text)
    settings = form.generation_settings()

    def parameters(policy: str) -> dict:
        return {} if policy == "full" else {"budget": args.budget}

    def studio_run(policy: str):
        form.policy.setCurrentText(policy)
        form.policy_form.set_values(parameters(policy))
        window.run.request_run()
        wait(app, lambda: not window.state.busy)
        outcome = window.state.last_outcome
        if outcome.error:
            raise SystemExit(f"the studio's run failed: {outcome.error}")
        return outcome.result

    def headless_run(policy: str):
        # What `kvstudio run` does: the engine, a Recorder for the history, on this (idle) thread.
        return engine.generate(window.prompt_area.full_prompt(), build_policy(policy, parameters(policy)), settings,
                               recorder=Recorder())

    print(f"model {window.state.model_info.description}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, "
          f"chunks of {args.chunk_size}; h2o budget {args.budget}; studio offscreen at 1600x1000, token map shown")
    studio_run("full")  # warm-up: first-call costs belong to neither side
    headless_run("full")
    ratios, decode_ratios = [], []
    for policy in ("full", "h2o"):
        for _ in range(args.repeats):
            studio, headless = studio_run(policy), headless_run(policy)
            ratios.append(throughput(studio) / throughput(headless))
            decode_ratios.append(studio.tokens_per_second / headless.tokens_per_second)
            print(f"{policy:<6} studio {throughput(studio):7.1f} tok/s (decode {studio.tokens_per_second:6.1f}, "
                  f"prefill {studio.prefill_seconds:6.2f} s) · headless {throughput(headless):7.1f} tok/s (decode "
                  f"{headless.tokens_per_second:6.1f}, prefill {headless.prefill_seconds:6.2f} s)")

    # Compare: 3 policies in the studio, then the same 3 runs headless.
    results = {}

    def collect(outcome):
        if outcome.request.label == "compare" and outcome.result is not None:
            results[outcome.request.policy] = outcome.result

    window.run.run_ended.connect(collect)
    form.policy.setCurrentText("h2o")
    form.policy_form.set_values({"budget": args.budget})
    compare_started = time.perf_counter()
    window.compare.request(list(COMPARED))
    # Compare runs its policies as one batched pass (its rows end without run_ended) or, where it
    # cannot batch, one after the other through the run feature: it has ended when its total is 0.
    wait(app, lambda: window.compare.total == 0 and not window.state.busy)
    compare_wall = time.perf_counter() - compare_started
    for outcome in window.compare.batch_outcomes:
        if outcome.result is not None:
            results[outcome.request.policy] = outcome.result
    missing = [p for p in COMPARED if p not in results]
    if missing:
        raise SystemExit(f"Compare ended without a result for {', '.join(missing)}")
    print(f"compare ran {'as one batched pass' if window.compare.batch_outcomes else 'one after the other'}")
    studio_total = sum(throughput(results[p]) for p in COMPARED)
    headless_started = time.perf_counter()
    headless_results = {p: headless_run(p) for p in COMPARED}
    headless_wall = time.perf_counter() - headless_started
    headless_total = sum(throughput(headless_results[p]) for p in COMPARED)
    for policy in COMPARED:
        studio, headless = results[policy], headless_results[policy]
        print(f"compare {policy:<6} studio {throughput(studio):7.1f} tok/s (decode {studio.tokens_per_second:6.1f}, "
              f"prefill {studio.prefill_seconds:6.2f} s) · headless {throughput(headless):7.1f} tok/s (decode "
              f"{headless.tokens_per_second:6.1f}, prefill {headless.prefill_seconds:6.2f} s)")

    # Memory: resident set after 5 studio runs, then after rss_runs.
    window.prompt_area.prompt.setPlainText(engine.tokenizer.decode(prompt_of_length(engine, args.rss_prompt_tokens)))
    form.max_new_tokens.setValue(16)
    process = psutil.Process()
    rss = {}
    for index in range(1, args.rss_runs + 1):
        studio_run(("full", "h2o", "snapkv")[index % 3])
        if index in (5, args.rss_runs):
            gc.collect()
            app.processEvents()
            rss[index] = process.memory_info().rss
    growth = (rss[args.rss_runs] - rss[5]) / 2**20 / (args.rss_runs - 5) * 10
    print(f"rss after 5 runs {rss[5] / 2**20:.0f} MiB, after {args.rss_runs} runs {rss[args.rss_runs] / 2**20:.0f} MiB")
    window.close_guard.ask = False
    window.close()
    print(f"studio_vs_headless_throughput={statistics.median(ratios):.3f}")
    print(f"studio_vs_headless_tokens_per_second={statistics.median(decode_ratios):.3f}")
    decode_studio = sum(results[p].tokens_per_second for p in COMPARED)
    decode_headless = sum(headless_results[p].tokens_per_second for p in COMPARED)
    print(f"compare_vs_headless_throughput={studio_total / headless_total:.3f}")
    print(f"compare_vs_headless_tokens_per_second={decode_studio / decode_headless:.3f}")
    # A batched Compare's rows share every step, so a row's tokens/s is its rate beside the others
    # (about 1/N of a lone run's on a compute-bound CPU): the whole comparison's wall time against the
    # N runs one after the other is what a user waits for.
    print(f"compare_wall_s={compare_wall:.1f} headless_serial_wall_s={headless_wall:.1f}")
    print(f"compare_vs_headless_serial_speed={headless_wall / compare_wall:.3f}")
    print(f"studio_rss_growth_mb_per_10_runs={growth:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
