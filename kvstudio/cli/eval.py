"""`kvstudio eval TASK`: a policy x budget sweep of one task, stored cell by cell, resumable.

  kvstudio eval needle --policies full,streaming_llm,h2o --budgets 128,256 --lengths 1024,2048
  kvstudio eval perplexity --policies full,h2o --budgets 128,512 --tokens 4096 --plot ppl.png
  kvstudio eval qa --file resources/qa_sample.jsonl --policies full,snapkv --budgets 128

Progress and an estimate of the time left go to stderr, one line per cell; the summary table to
stdout. Running the same command again resumes: finished cells are read from the sweep's store.
Each --variant adds cells beside the plain ones (no variant), which run too unless --no-baseline.
"""

from __future__ import annotations

import argparse
import json
import sys


from kvstudio.core.errors import KVStudioError

EXIT_INTERRUPTED = 130
EXIT_CELLS_FAILED = 1  # the sweep went on past them; a rerun tries them again


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    from kvstudio.core.evaluate.protocols import DEFAULT_PROTOCOL, PROTOCOLS
    from kvstudio.core.evaluate.tasks import RULER_SUBTASKS, TASKS

    parser = subparsers.add_parser("eval", help="evaluate policies x budgets on a task (needle, ruler, perplexity, "
                                                "qa, ...), stored cell by cell and resumable",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=TASKS, help="passkey | needle | ruler | perplexity | kl | qa")
    parser.add_argument("--model", default="default", help="default, tiny-llama|..., a folder, or a cached hub id")
    from kvstudio.cli.model_options import add_kv_groups_option

    add_kv_groups_option(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policies", type=_names, default=("full", "streaming_llm", "h2o"),
                        help="comma-separated (default full,streaming_llm,h2o)")
    parser.add_argument("--budgets", type=_ints, default=(128,), help="comma-separated budgets (default 128); "
                        "a policy that keeps everything (full) runs once")
    parser.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size (default 512)")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=PROTOCOLS,
                        help=f"how the question meets the policy (default {DEFAULT_PROTOCOL}): bounded = the whole prompt in "
                             "--chunk-size chunks; question-aware = one prefill chunk, question included, then "
                             "compression (KVCache-Factory, SnapKV's paper); question-agnostic = the context "
                             "compressed before the question is fed (kvpress), one compressed context per question set")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate each sample's whole answer length whatever the model says (benchmarks)")
    parser.add_argument("--measure-loss", action="store_true",
                        help="each cell's attention loss: the mass on evicted entries against a shadow cache of "
                             "every key (it costs a full cache of keys per cell)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a policy parameter for every policy that has it, e.g. --option sink=4 (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="extra options making one more cell per policy and budget (repeatable): policy "
                             "parameters or storage settings, e.g. codec=int8 or merge=minicache,merge_from=15; "
                             "the plain cells (no variant) run too, as the baseline")
    parser.add_argument("--no-baseline", action="store_true",
                        help="with --variant: run only the variants, not the plain cells")
    grid = parser.add_argument_group("passkey, needle and ruler")
    grid.add_argument("--lengths", type=_ints, default=None, help="context lengths in tokens (default 1024,2048)")
    grid.add_argument("--depths", type=_floats, default=None, help="needle depths 0..1 (default 0,0.25,0.5,0.75,1)")
    grid.add_argument("--samples", type=int, default=None,
                      help="samples per grid point (default 1); qa: the first N records (default all)")
    grid.add_argument("--seed", type=int, default=0, help="seed of the generated tasks and prose (default 0)")
    grid.add_argument("--subtasks", type=_names, default=None, help=f"ruler: {','.join(RULER_SUBTASKS)} (default all)")
    qa = parser.add_argument_group("qa")
    qa.add_argument("--file", help="a .jsonl, .json or .parquet file of questions")
    qa.add_argument("--context-field", default="context")
    qa.add_argument("--question-field", default="input")
    qa.add_argument("--answers-field", default="answers")
    qa.add_argument("--max-context-tokens", type=int, default=3500, help="longer contexts lose their middle")
    language = parser.add_argument_group("perplexity and kl")
    language.add_argument("--tokens", type=int, default=4096, help="length of the text (default 4096)")
    language.add_argument("--prefix-tokens", type=int, default=512, help="prefilled before scoring (default 512)")
    language.add_argument("--stride", type=int, default=1, help="tokens per step after the prefix (default 1: "
                          "token by token; larger is faster and coarser)")
    language.add_argument("--text-file", help="a UTF-8 text to use instead of the built-in prose")
    out = parser.add_argument_group("results")
    out.add_argument("--json", metavar="PATH", help="every cell as one JSON record (curves included)")
    out.add_argument("--csv", metavar="PATH", help="every cell as one CSV row")
    out.add_argument("--plot", metavar="PATH", action="append", default=[],
                     help="the task's figure as .png or .svg (repeatable)")
    out.add_argument("--store", metavar="PATH", help="the sweep's store (default: one per sweep in the user data "
                     "folder); the same store resumes the sweep")
    out.add_argument("--stored-only", action="store_true", help="compute nothing: report, export and plot the "
                     "cells already stored (e.g. while the sweep still runs elsewhere)")
    out.add_argument("--fresh", action="store_true", help="start over: ignore (and replace) the stored cells")
    out.add_argument("--no-history", action="store_true", help="do not store the cells' runs in the run history")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N", help="run up to N cells at once as one "
                        "batched run (generation tasks; each cell as it would run alone); default: as many of the "
                        "missing cells as fit in memory, at most 8 (the output says what was chosen and why); "
                        "1: one at a time")
    parser.add_argument("--plugins", action="append", default=[], metavar="DIR", help="also load policy plugins")
    from kvstudio.cli.eval_cluster import add_options

    add_options(parser)  # --ray ADDRESS, --ray-workers N, --ray-cpus N
    return parser


def parse_assignments(items: list[str], what: str) -> dict:
    """NAME=VALUE pairs typed by the policy parameter of that name (any policy's); storage fields and
    unknown names stay text, typed when the sweep is planned (policy_storage.storage_from_options)."""
    from kvstudio.core.errors import PolicyConfigError
    from kvstudio.core.params import parse_text
    from kvstudio.core.policies import available_policies

    specs = {spec.name: spec for policy in available_policies().values() for spec in policy.Config.parameters()}
    values = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            name, separator, text = pair.partition("=")
            name = name.strip().lstrip("-").replace("-", "_")
            if not separator or not name:
                raise PolicyConfigError(f"{what} '{pair}' is not NAME=VALUE")
            spec = specs.get(name)
            if spec is None:
                values[name] = text  # checked against each policy when the sweep is planned
                continue
            values[name] = parse_text(spec, text, f"{what} {name}={text}", PolicyConfigError)
    return values


def build_spec(args):
    from kvstudio.cli.model_options import apply_kv_groups

    apply_kv_groups(args)  # --kv-groups G: the sweep's model is SPEC+kvG
    from kvstudio.core.evaluate.language import LanguageOptions
    from kvstudio.core.evaluate.sweep import SweepSpec
    from kvstudio.core.evaluate.tasks import RULER_SUBTASKS, TaskOptions

    task_options = TaskOptions(
        lengths=args.lengths or TaskOptions.lengths, depths=args.depths or TaskOptions.depths,
        samples=args.samples if args.samples is not None else (0 if args.task == "qa" else 1), seed=args.seed,
        subtasks=args.subtasks or RULER_SUBTASKS, qa_file=args.file, context_field=args.context_field,
        question_field=args.question_field, answers_field=args.answers_field,
        max_context_tokens=args.max_context_tokens)
    language_options = LanguageOptions(tokens=args.tokens, prefix_tokens=args.prefix_tokens, stride=args.stride,
                                       seed=args.seed, text_file=args.text_file)
    variants = [parse_assignments([v], "--variant") for v in args.variant]
    if args.no_baseline and not any(variants):
        raise KVStudioError("--no-baseline leaves nothing to run: give a --variant, or run the plain cells "
                            "without --no-baseline")
    if not args.no_baseline:  # the plain cells: what a variant is compared against
        variants.insert(0, {})
    variants = tuple({json.dumps(v, sort_keys=True): v for v in variants}.values())  # a variant given twice: once
    return SweepSpec(args.task, args.model, args.policies, args.budgets, task_options, language_options,
                     parse_assignments(args.option, "--option"), variants, args.chunk_size, args.protocol,
                     args.measure_loss, args.ignore_eos)


def run(args) -> int:
    from kvstudio.core.io.atomic import check_writable_folder
    from kvstudio.core.runtime.engine import Engine
    from kvstudio.core.evaluate.figures import FORMATS
    from kvstudio.core.models.loading import load_model

    spec = build_spec(args)
    spec.validate()  # every bad option before seconds of model loading
    if args.batch_size is not None and args.batch_size < 1:
        raise KVStudioError(f"--batch-size must be at least 1, got {args.batch_size}")
    for path in [args.json, args.csv, *args.plot]:
        if path:
            check_writable_folder(path)
    for path in args.plot:
        if not path.lower().endswith(FORMATS):
            raise KVStudioError(f"--plot {path}: a figure is a .png or .svg file")

    history = None if args.no_history else _open_history()
    from kvstudio.core.evaluate.sweep import Sweep, default_store_path

    store = args.store or default_store_path(spec)
    if args.fresh:
        from pathlib import Path

        Path(store).expanduser().unlink(missing_ok=True)
    if args.ray and not args.stored_only:  # stored cells are reported from here, without a cluster
        from kvstudio.cli.eval_cluster import cluster_sweep

        with cluster_sweep(args, spec, store, history) as (sweep, described):
            return _run_sweep(args, sweep, described)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype,
                        progress=lambda message, _: print(f"[kvstudio] {message}", file=sys.stderr, flush=True))
    return _run_sweep(args, Sweep(Engine(loaded), spec, store, history=history), loaded.describe())


def _run_sweep(args, sweep, described: str) -> int:
    """A planned sweep (here or on a cluster): run its missing cells, or report the stored ones."""
    reused = len(sweep.stored())
    protocol = "" if args.task in ("perplexity", "kl") else f", protocol {sweep.spec.protocol}"
    print(f"[eval] {described}; {args.task}{protocol}: {len(sweep.cells)} cells ({reused} already stored in "
          f"{sweep.store.path})", file=sys.stderr, flush=True)
    if args.stored_only:
        from kvstudio.core.evaluate.sweep import SweepOutcome

        stored = sweep.stored()
        return _report(args, SweepOutcome(stored, 0, len(stored), len(stored) < len(sweep.cells), sweep.store.path))
    try:
        from kvstudio.core.evaluate.batched_sweep import choose_batch_size, run_batched

        batch_size = args.batch_size
        if batch_size is None and args.ray:
            batch_size = 1  # the cluster's workers run the cells, one each
        elif batch_size is None:
            batch_size, why = choose_batch_size(sweep)
            print(f"[eval] batch size {batch_size}: {why}; --batch-size N sets it",
                  file=sys.stderr, flush=True)
        outcome = run_batched(sweep, batch_size, on_cell=_print_cell(sweep), on_progress=_print_progress)
    except KeyboardInterrupt:
        print(f"\n[eval] interrupted: {len(sweep.stored())} of {len(sweep.cells)} cells are stored in "
              f"{sweep.store.path}; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _report(args, outcome)


def _open_history():
    from kvstudio.core.persist.history import HistoryError, RunHistory

    try:
        return RunHistory()
    except HistoryError as error:
        print(f"kvstudio: warning: {error}", file=sys.stderr)
        return None


def _print_cell(sweep):
    def show(record: dict) -> None:
        if record.get("reused_shown"):
            return
        what = record["policy"] + ("" if record.get("budget") is None else f" @ {record['budget']}")
        where = " ".join(filter(None, [record.get("subtask"), f"{record['context_tokens']} tokens",
                                       None if record.get("depth") is None else f"depth {record['depth']:g}"]))
        if record["task"] in ("perplexity", "kl"):
            figures = f"perplexity {record['perplexity']:.3f}, mean KL {record['kl_mean']:.4f}"
        else:
            figures = f"score {record['score']:.2f} (output {record.get('output', '').strip()[:40]!r})"
        print(f"[eval]   {what}: {where}: {figures}, {record['seconds']:.1f} s", file=sys.stderr, flush=True)
    return show


def _print_progress(progress) -> None:
    if progress.current in ("done", "cancelled"):
        return
    left = "" if progress.seconds_left is None else f", about {_duration(progress.seconds_left)} left"
    print(f"[eval] {progress.done + 1}/{progress.total} {progress.current}{left}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _report(args, outcome) -> int:
    from kvstudio.core.evaluate.figures import save_figure
    from kvstudio.core.evaluate.results import export_cells, format_summary

    print(format_summary(outcome.records))
    print(f"[eval] {outcome.computed} cells computed, {outcome.reused} reused, store {outcome.store}",
          file=sys.stderr)
    for path, label in ((args.json, "JSON"), (args.csv, "CSV")):
        if path:
            export_cells(outcome.records, path)
            print(f"[eval] wrote {label} {path}", file=sys.stderr)
    for path in args.plot:
        if outcome.records:
            save_figure(outcome.records, path)
            print(f"[eval] wrote figure {path}", file=sys.stderr)
    for key, reason in outcome.failed.items():
        print(f"[eval] failed: {_cell_name(key)}: {reason}", file=sys.stderr)
    if outcome.cancelled:
        print("[eval] the sweep stopped before its last cell; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"[eval] {len(outcome.failed)} cells failed (recorded in the store and the run history); the same "
              "command tries them again", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return 0


def _cell_name(key: str) -> str:
    cell = json.loads(key)
    return ", ".join(f"{name} {value}" for name, value in cell.items() if value not in (None, {}) and name != "task")



