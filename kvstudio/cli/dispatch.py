"""`kvstudio`: the studio window and the headless commands.

  kvstudio [--model SPEC]  the studio window, loading the default model (or SPEC; "none": nothing)
  kvstudio run ...         generate under a policy; text to stdout, then a summary; --json PATH
  kvstudio policies        the policies, their parameters and defaults
  kvstudio finetune ...    LoRA fine-tuning with the policy's cache in the loop (cli/finetune.py)
  kvstudio demo            a short streamed demo on the default model, in the terminal
  kvstudio eval TASK ...   policies x budgets on a task (needle, ruler, perplexity, kl, qa), resumable
  kvstudio check-model SPEC  is the model computed exactly? the engine under full against transformers
  kvstudio runs ...        the run history: list, show, export, plot (cli/runs_plot.py: figures)

Every error a user can cause ends in one line on stderr and exit status 2, never a traceback. What
is left is a bug: the last net in `main` prints it as one line "internal error: ...; details in
FILE" (a report with the traceback under the data folder) and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

# Never reach for the network: models come from the wheel, local folders or the local HF cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kvstudio.core.errors import KVStudioError  # noqa: E402
from kvstudio.core.runtime.interruptions import (EXIT_BROKEN_PIPE, EXIT_TERMINATED, Terminated, TextOutput,  # noqa: E402
                                 silence_stdout, sigterm_raises)
from kvstudio.core.units import format_bytes  # noqa: E402
from kvstudio.cli.storage_options import add_storage_options, format_storage, measure_error, storage_from_args  # noqa: E402
from kvstudio.cli.model_options import (add_device_map_option, add_kv_groups_option, apply_kv_groups,  # noqa: E402
                                        device_map_from)
from kvstudio.cli.options import add_policy_options, policy_from_args, prompt_from_args  # noqa: E402
from kvstudio.cli import batch_run  # noqa: E402
from kvstudio.cli.output import format_summary, open_history, progress, warn, write_json_atomic, write_snapshot  # noqa: E402

EXIT_INTERNAL = 1  # a bug in KV Studio: one line, and a report file
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command to get help from."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _plugin_folders(argv: list[str]) -> list[str]:
    """The --plugins DIR values, wherever they stand, read before the full parser exists."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugins", action="append", default=[])
    return pre.parse_known_args(argv)[0].plugins


def load_plugins(folders: list[str]):
    """Load every plugin; report the broken ones in one line each and carry on without them."""
    from kvstudio.core.plugins.loader import PluginManager

    manager = PluginManager(folders)
    for folder in folders:
        if not Path(folder).expanduser().is_dir():
            raise KVStudioError(f"--plugins {folder}: no such folder")
    manager.load()
    return manager


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvstudio", description="See and shape what a language model keeps in its KV cache.")
    parser.add_argument("--model", dest="studio_model", default="default",
                        help="model the studio loads at start (default: the embedded model; none: nothing)")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = commands.add_parser("run", help="generate under a KV-cache policy, headless")
    run.add_argument("--model", default="default", help="default, tiny-llama|qwen2|mistral|phi3|gemma, a model "
                                                        "folder, or a hub id already in the local HF cache")
    add_kv_groups_option(run)
    run.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    add_device_map_option(run)
    run.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    run.add_argument("--quantize", choices=("4bit", "8bit"), help="load weights in 4/8 bit with bitsandbytes (CUDA)")
    run.add_argument("--adapter", metavar="DIR", help="apply a LoRA adapter saved by `kvstudio finetune` (its --out "
                                                      "folder or one step-NNNNNN checkpoint)")
    run.add_argument("--policy", default="full", help="cache policy (see `kvstudio policies`)")
    run.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size in tokens (default 512)")
    prompt = run.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", action="append", help="a UTF-8 text file holding the prompt; repeated: a "
                                                               "batch, one row per file (cli/batch_run.py)")
    batch_run.add_options(run, prompt)
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int, help="seed for sampling")
    run.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    run.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens, whatever the "
                     "model says (benchmarks)")
    run.add_argument("--measure-loss", action="store_true", help="measure the attention mass that falls on evicted "
                     "entries, per layer and step, against a shadow cache of every key (it costs a full cache of keys)")
    run.add_argument("--json", metavar="PATH", help="write the run (text, figures, per-step records) as JSON")
    run.add_argument("--no-history", action="store_true", help="do not store this run in the run history")
    run.add_argument("--prompt-cache", metavar="DIR", help="restore the prompt's cache from DIR when saved there "
                     "(or its longest chunk-aligned prefix); save it there after the prefill")
    run.add_argument("--memory-snapshot", metavar="PATH", help="record every allocation of the run with the frames "
                     "that made it, as a PyTorch memory snapshot (.pickle); on CPU through the profiler (slower)")
    run.add_argument("--attention-layers", metavar="all|N,M", help="record each step's newest attention row of "
                     "these layers, for `kvstudio runs plot --view attention` (per layer and step: 4 B per query "
                     "head + 8 B per KV head, per held entry)")
    run.add_argument("--memory-sample-hz", type=float, default=20.0,
                     help="memory readings per second between steps (default 20; 0: only after each step)")
    run.add_argument("--plugins", action="append", default=[], metavar="DIR", help="also load policy plugins "
                     "from DIR (repeatable; plugins/, the user plugin folder and KVSTUDIO_PLUGIN_PATH always are)")
    add_policy_options(run)
    add_storage_options(run)

    policies = commands.add_parser("policies", help="list the policies with their parameters and defaults")
    policies.add_argument("--plugins", action="append", default=[], metavar="DIR", help="also load plugins from DIR")
    commands.add_parser("demo", help="a short streamed demo on the default model, in the terminal")
    from kvstudio.cli import finetune

    finetune.add_parser(commands)

    runs = commands.add_parser("runs", help="the run history: list, show, export")
    runs_commands = runs.add_subparsers(dest="runs_command", parser_class=_Parser, required=True)
    listing = runs_commands.add_parser("list", help="stored runs, newest first")
    listing.add_argument("--policy", help="a policy's runs, whatever their storage (h2o), or one cache's "
                                          "(h2o-int8, full+minicache)")
    listing.add_argument("--model")
    listing.add_argument("--search", help="text in the prompt or the output")
    listing.add_argument("--limit", type=int, default=20)
    show = runs_commands.add_parser("show", help="one run in full")
    show.add_argument("id", type=int)
    show.add_argument("--command", dest="print_command", action="store_true", help="print only a command that reruns it: the command "
                      "line it was run with, or for a studio run the `kvstudio run` command that does the same")
    export = runs_commands.add_parser("export", help="one run as .json (everything) or .csv (per step)")
    export.add_argument("id", type=int)
    export.add_argument("path")
    from kvstudio.cli import runs_plot

    runs_plot.add_parser(runs_commands)
    # Subcommands that live in their own modules (kvstudio/cli/).
    from kvstudio.cli import cache as cache_command, check_model, eval as eval_command

    eval_command.add_parser(commands)
    cache_command.add_parser(commands)
    check_model.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except Exception as error:  # the last net: a bug in KV Studio, as one line and a report file
        from kvstudio.core.persist.internal_errors import internal_error_line

        print(f"kvstudio: {internal_error_line(error, 'kvstudio ' + ' '.join(argv[:2]))}", file=sys.stderr)
        return EXIT_INTERNAL


def check_arguments(argv: list[str]) -> None:
    """Arguments are text in UTF-8. Bytes that are not (a file name in another encoding, a paste)
    reach Python as lone surrogates, which fail wherever the text is stored or encoded later; they
    are refused here, naming the argument."""
    for number, argument in enumerate(argv, 1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            raise KVStudioError(f"argument {number} ('{_shown(argument)}') is not UTF-8 text: KV Studio reads its arguments "
                                "as UTF-8; rename the file, or put the text in a UTF-8 file (--prompt-file)") from None


def _shown(argument: str) -> str:
    """The argument as its bytes were, the ones that are not UTF-8 as \\xff."""
    try:
        return argument.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from bytes (a call from Python)
        return argument.encode("utf-8", "backslashreplace").decode("utf-8")


def _main(argv: list[str]) -> int:
    try:
        check_arguments(argv)
        # Plugins first: their policies and parameters become choices and options of the parser.
        plugins = load_plugins(_plugin_folders(argv))
    except KVStudioError as error:
        print(f"kvstudio: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(build_parser().parse_args(argv), plugins)
    finally:
        plugins.unload()  # main() may be called in-process (scripts, tests): leave no policies behind


def _dispatch(args, plugins) -> int:
    try:
        if args.command == "run":
            for record in plugins.errors:
                print(f"kvstudio: warning: {_plugin_problem(record)}: {record.error}", file=sys.stderr)
            with sigterm_raises():  # SIGTERM ends the run recorded as interrupted, not killed mid-write
                return command_run(args)
        if args.command == "policies":
            return command_policies(plugins)
        if args.command == "finetune":
            from kvstudio.cli import finetune

            return finetune.run(args)
        if args.command == "demo":
            return command_demo()
        if args.command == "runs":
            return command_runs(args)
        if args.command == "cache":
            from kvstudio.cli import cache as cache_command

            return cache_command.run(args)
        if args.command == "eval":
            from kvstudio.cli import eval as eval_command

            return eval_command.run(args)
        if args.command == "check-model":
            from kvstudio.cli import check_model

            return check_model.run(args)
        from kvstudio.gui.app import run_studio

        return run_studio(None if args.studio_model == "none" else args.studio_model)
    except KVStudioError as error:
        print(f"kvstudio: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nkvstudio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("\nkvstudio: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # the reader of stdout went away (`kvstudio policies | head -1`): stop quietly
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except (Exception, SystemExit) as error:  # SystemExit: a plugin's sys.exit() outside the guarded calls
        message = _known_fault(error, plugins)
        if message is None:
            raise  # a bug in KV Studio itself (its traceback is what a report needs), or a real exit
        print(f"kvstudio: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def _known_fault(error: BaseException, plugins) -> str | None:
    """Out of memory, or a plugin's fault that escaped the guard, as one line; None otherwise."""
    from kvstudio.core.runtime.oom import explain, is_out_of_memory
    from kvstudio.core.plugins.guard import fault_from_traceback

    if is_out_of_memory(error):
        return explain(error, "run")
    fault = fault_from_traceback(error, [record.source for record in plugins.records])  # loaded or broken
    return None if fault is None else str(fault)


def _plugin_problem(record) -> str:
    return "plugin broken" if record.status == "broken" else "plugin not loaded"


# --- commands -----------------------------------------------------------------------------------


def command_run(args) -> int:
    from kvstudio.cli.cache import finish_prompt_cache, open_prompt_cache
    from kvstudio.core.io.atomic import check_writable_folder
    from kvstudio.core.runtime.engine import CancelToken, Engine, GenerationSettings
    from kvstudio.core.recording.events import Recorder
    from kvstudio.core.recording.packing import recording_to_dict
    from kvstudio.core.persist.run_book import RunBook
    from kvstudio.core.runtime.interruptions import OUTPUT_CLOSED
    from kvstudio.core.recording.snapshots import MemorySnapshotRecording
    from kvstudio.core.spec import CacheSpec

    # Check everything the user typed before spending seconds on loading a model.
    apply_kv_groups(args)  # --kv-groups G: the model spec SPEC+kvG
    storage = storage_from_args(args)  # also reads the `--policy h2o-int4` shorthand
    policy = policy_from_args(args)
    policy.storage = storage
    prompt = None if batch_run.wants_batch(args) else prompt_from_args(args)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, chunk_size=args.chunk_size, stop_strings=tuple(args.stop), chat_template=args.chat,
        memory_sample_hz=args.memory_sample_hz, ignore_eos=args.ignore_eos, measure_loss=args.measure_loss,
    )
    settings.validate()
    if prompt is None:  # several prompts: one batched run, each row its own run in the history
        return batch_run.run(args, policy, settings, _load_reporting_oom)
    for path in (args.json, args.memory_snapshot):
        if path:
            check_writable_folder(path)
    if args.adapter:
        from kvstudio.core.train.lora import resolve

        resolve(args.adapter)  # a wrong folder is reported before the model loads

    loaded = _load_reporting_oom(args)
    if args.adapter:
        from kvstudio.core.train.lora import load_adapter

        _, checkpoint, _ = load_adapter(loaded, args.adapter)
        print(f"[kvstudio] adapter {checkpoint}", file=sys.stderr, flush=True)
        loaded.name = f"{loaded.name}+lora:{loaded.adapter}"  # the summary and --json name it, as the history does
    print(f"[kvstudio] {loaded.describe()}; policy {policy.describe()}", file=sys.stderr, flush=True)
    engine = Engine(loaded)
    recording = MemorySnapshotRecording(loaded.device) if args.memory_snapshot else contextlib.nullcontext()
    from kvstudio.cli.runs_plot import watched_layers

    # What the history keeps to reopen the run's views in the studio (and to plot them).
    recorder = Recorder(watch_layers=watched_layers(args.attention_layers, loaded.n_layers))
    from kvstudio.core.persist.provenance import environment

    provenance = environment(loaded.device, loaded.dtype)
    book = RunBook(open_history(args.no_history), model=loaded.identity, cache=CacheSpec.of(policy), prompt=prompt,
                   settings=settings.record(), recorder=recorder, on_warning=warn, provenance=provenance)
    book.start()
    output = TextOutput(CancelToken())  # a closed stdout cancels the run
    try:
        prompt_cache = open_prompt_cache(args.prompt_cache, engine, policy, settings, prompt)
        with recording:
            result = _generate_reporting_oom(engine, prompt, policy, settings, recorder, output,
                                             **(prompt_cache.generate_options() if prompt_cache else {}))
    except BaseException as error:
        book.fail(error)  # cancelled (Ctrl-C), interrupted (SIGTERM) or failed, keeping what it made
        if args.memory_snapshot and recording.snapshot is not None:  # what led to the failure
            write_snapshot(recording, args.memory_snapshot)
        raise
    finish_prompt_cache(prompt_cache)
    if args.memory_snapshot:
        write_snapshot(recording, args.memory_snapshot, result)
    if storage.measure_error:
        measure_error(engine, result, policy, settings, prompt)
    book.finish(result, error=OUTPUT_CLOSED if output.closed else None)
    print()
    print(format_summary(result))
    if prompt_cache is not None:
        print(f"prompt cache: {prompt_cache.status}")
    if format_storage(result):
        print(format_storage(result))
    if book.run_id is not None and book.history is not None:
        print(f"[kvstudio] stored as run {book.run_id} (kvstudio runs show {book.run_id})", file=sys.stderr)
    if args.json:
        data = result.to_dict()
        data["policy"] = policy.name
        data["policy_parameters"] = policy.config.as_dict()
        data["settings"] = settings.record()
        data["provenance"] = provenance
        if prompt_cache is not None:
            data["prompt_cache"] = prompt_cache.status
        # The recording too, as `runs export` writes it: `kvstudio runs plot run.json` draws the file alone.
        data["recording"] = recording_to_dict(recorder)
        write_json_atomic(Path(args.json), data)
        print(f"[kvstudio] wrote {args.json}", file=sys.stderr)
    return EXIT_BROKEN_PIPE if output.closed else 0


def command_runs(args) -> int:
    from kvstudio.core.persist.exports import export_run
    from kvstudio.core.persist.history import RunHistory

    if args.runs_command == "plot":
        from kvstudio.cli import runs_plot

        return runs_plot.run(args)
    history = RunHistory()
    if args.runs_command == "list":
        records = history.list(policy=args.policy, model=args.model, text=args.search, limit=args.limit)
        if not records:
            print("no runs stored yet" if not (args.policy or args.model or args.search) else "no run matches")
        for r in records:
            figures = r.figures
            speed = f"{figures['tokens_per_second']:.1f} tok/s" if "tokens_per_second" in figures else ""
            peak = f"peak {format_bytes(figures['peak_cache_bytes'])}" if "peak_cache_bytes" in figures else ""
            preview = r.prompt_preview[:40].replace("\n", " ")
            if r.kind != "generate":  # a fine-tune session: its data, and the kind in front
                preview = f"[{r.kind}] {preview}"
            if r.damaged:  # shown, not hidden: `runs show` has what could be read
                preview = f"[damaged: {', '.join(r.damaged)}] {preview}"
            if isinstance(r.settings.get("batch"), dict):  # a row of a batched run (cli/batch_run.py)
                link = r.settings["batch"]
                preview = f"[batch {link.get('id')} {link.get('row')}/{link.get('rows')}] {preview}"
            print(f"{r.id:>5}  {r.created}  {r.shown_status:<11} {r.model:<24} {r.cache:<14} {speed:>13}  "
                  f"{peak:<16} {preview!r}")
        return 0
    if args.runs_command == "show":
        if args.print_command:
            from kvstudio.core.persist.provenance import command_of_record

            command, note = command_of_record(history.get(args.id))
            print(command)
            if note:
                print(f"[kvstudio] {note}", file=sys.stderr)
            return 0
        print(json.dumps({k: v for k, v in history.get(args.id).to_dict().items()
                          if k not in ("steps", "memory")}, indent=1))
        return 0
    from kvstudio.core.recording.packing import unpack_events

    record, blob = history.get(args.id), history.events(args.id)
    path = export_run(record, args.path, unpack_events(blob) if blob is not None else None)
    print(f"wrote run {args.id} to {path}")
    return 0


def _load_reporting_oom(args):
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.runtime.oom import explain, is_out_of_memory

    try:
        if args.device_map is not None and args.quantize:
            raise KVStudioError("--device-map and --quantize together are not supported: drop one")
        return load_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantize,
                          progress=progress, device_map=device_map_from(args))
    except Exception as error:
        if is_out_of_memory(error):
            raise KVStudioError(explain(error, "load", model=args.model)) from error
        raise


def _generate_reporting_oom(engine, prompt, policy, settings, recorder=None, output=None, **options):
    """Generate, streaming the text to stdout; out of memory becomes one line naming what ran out."""
    from kvstudio.core.runtime.engine import CancelToken
    from kvstudio.core.runtime.oom import explain, is_out_of_memory
    from kvstudio.core.plugins.guard import policy_label

    output = output or TextOutput(CancelToken())
    try:
        return engine.generate(prompt, policy, settings, recorder=recorder, cancel=output.cancel,
                               on_text=output.write, **options)
    except Exception as error:
        if is_out_of_memory(error):
            raise KVStudioError(explain(error, "run", chunk_size=settings.chunk_size,
                                        policy=policy_label(policy))) from error
        raise


def command_policies(plugins) -> int:
    from kvstudio.core.policies import BUILT_IN, available_policies, source_of

    policies = available_policies().values()
    width = max(len(spec.option) for policy in policies for spec in policy.Config.parameters())
    for policy in policies:
        source = source_of(policy.name)
        print(f"{policy.name}: {policy.summary}" + ("" if source == BUILT_IN else f"  [plugin {source}]"))
        for spec in policy.Config.parameters():
            default = "none" if spec.default is None else spec.default
            kind = "flag" if spec.type is bool else spec.type.__name__
            choices = f" ({'|'.join(map(str, spec.choices))})" if spec.choices else ""
            print(f"    {spec.option:<{width}}  {kind:<4}  default {str(default):<7}  {spec.help}{choices}")
    print("\nplugin folders searched: " + ", ".join(str(folder) for folder in plugins.folders))
    for record in plugins.errors:
        print(f"{_plugin_problem(record)}: {record.error}  [{record.source}]")
    return 0


DEMO_QUESTION = "In two sentences, what does a KV cache do in a transformer?"


def command_demo() -> int:
    from kvstudio.core.runtime.engine import Engine, GenerationSettings
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.spec import create_policy

    print("KV Studio demo: the embedded default model answers a question under StreamingLLM (budget 64).",
          file=sys.stderr)
    loaded = load_model("default", progress=progress)
    engine = Engine(loaded)
    policy = create_policy("streaming_llm", budget=64, sink=4)
    print(f"\n> {DEMO_QUESTION}\n")
    result = _generate_reporting_oom(engine, DEMO_QUESTION, policy,
                                     GenerationSettings(max_new_tokens=80, chat_template=True))
    print("\n")
    print(format_summary(result))
    print(
        "\nNext: `kvstudio policies` lists the policies; `kvstudio run --policy streaming_llm --budget 128 "
        "--prompt-file FILE` runs one on your own text (`kvstudio run --help` for every option)."
    )
    return 0


