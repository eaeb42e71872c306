"""`kvstudio finetune`: a LoRA fine-tune session under a cache policy, headless.

Streams one line per optimizer step (and one per validation) to stdout; `--json PATH` writes the
session (steps, validations, the adapter folder, the validation losses before and after). The
session is stored in the run history (kind "finetune"). Every bad argument, file or model ends in
a one-line error and exit status 2; the last saved adapter is never touched by a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvstudio.cli.options import add_policy_options, policy_from_args
from kvstudio.cli.output import open_history, progress, warn, write_json_atomic
from kvstudio.core.errors import KVStudioError
from kvstudio.core.units import format_bytes


def add_parser(commands) -> argparse.ArgumentParser:
    from kvstudio.core.train.data import SYNTHETIC_PASSKEY
    from kvstudio.core.train.through_cache import GRAD_MODES

    parser = commands.add_parser("finetune", help="LoRA fine-tuning with the policy's cache in the loop, headless")
    parser.add_argument("--model", default="default", help="model spec, as for `kvstudio run`")
    from kvstudio.cli.model_options import add_kv_groups_option

    add_kv_groups_option(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policy", default="full", help="cache policy the training runs under")
    parser.add_argument("--data", required=True, metavar="PATH|synthetic-passkey",
                        help=f"a local .json/.jsonl/.csv/.parquet/.txt file, or {SYNTHETIC_PASSKEY}")
    parser.add_argument("--text-field", help="the field holding text (language modelling on it; default 'text')")
    parser.add_argument("--prompt-field", help="the prompt field (with --answer-field: loss on the answer only)")
    parser.add_argument("--answer-field", help="the answer field")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    parser.add_argument("--examples", type=int, default=64, help="synthetic examples to generate (default 64)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps (the total, when resuming)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    parser.add_argument("--grad-accumulation", type=int, default=1, help="examples per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=1, metavar="N",
                        help="feed a step's examples N at a time, packed into one forward per chunk (no padding; "
                             "each example its own cache and policy state): the same losses and gradients in "
                             "fewer passes (with --lora-dropout above 0 the masks fall on the packed tokens, so they "
                             "differ); at most --grad-accumulation")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", help="comma-separated module names (default: attention projections)")
    parser.add_argument("--qlora", action="store_true", help="4-bit base weights via bitsandbytes (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad-mode", choices=GRAD_MODES, default="through",
                        help="through: gradients cross chunks through kept entries (memory grows with length); "
                             "truncated: they stop at chunk boundaries (memory flat)")
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per forward chunk (default 128)")
    parser.add_argument("--eval-every", type=int, default=10, help="validate every N steps (0: start and end)")
    parser.add_argument("--save-every", type=int, default=10, help="save the adapter every N steps (0: end)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the adapter checkpoints")
    parser.add_argument("--resume", action="store_true", help="go on from the newest checkpoint in --out")
    parser.add_argument("--json", metavar="PATH", help="write the session (steps, validations, adapter) as JSON")
    parser.add_argument("--no-history", action="store_true", help="do not store the session in the run history")
    parser.add_argument("--memory-snapshot", metavar="PATH", help="record a memory snapshot of one step (.pickle)")
    parser.add_argument("--snapshot-step", type=int, default=1, help="which step --memory-snapshot records")
    parser.add_argument("--memory-sample-hz", type=float, default=20.0)
    parser.add_argument("--plugins", action="append", default=[], metavar="DIR", help="also load policy plugins")
    add_policy_options(parser)
    return parser


def settings_from_args(args):
    from kvstudio.core.train.lora import LoraSettings
    from kvstudio.core.train.session import FinetuneSettings

    targets = tuple(t.strip() for t in (args.target_modules or "").split(",") if t.strip())
    settings = FinetuneSettings(
        steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup, grad_accumulation=args.grad_accumulation,
        micro_batch=args.micro_batch,
        seed=args.seed, chunk_size=args.chunk_size, grad_mode=args.grad_mode, eval_every=args.eval_every,
        save_every=args.save_every, max_grad_norm=args.max_grad_norm, memory_sample_hz=args.memory_sample_hz,
        snapshot_step=args.snapshot_step if args.memory_snapshot else 0,
        lora=LoraSettings(rank=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets,
                          qlora=args.qlora))
    settings.validate()
    return settings


def format_step(event, total_steps: int) -> str | None:
    from kvstudio.core.train.log import Status, TrainStep, Validation

    if isinstance(event, TrainStep):
        return (f"step {event.step}/{total_steps}  loss {event.loss:.4f}  grad_norm {event.grad_norm:.3f}  "
                f"lr {event.lr:.2e}  {event.seconds:.2f} s  {event.tokens_per_second:.0f} tok/s  "
                f"peak {format_bytes(event.peak_bytes)}  evicted {event.evictions}")
    if isinstance(event, Validation):
        return f"val @{event.step}  loss_policy {event.loss_policy:.4f}  loss_full {event.loss_full:.4f}"
    if isinstance(event, Status):
        return f"[kvstudio] {event.message}"
    return None


def run(args) -> int:
    import torch

    from kvstudio.core.io.atomic import check_writable_folder
    from kvstudio.core.runtime.engine import Engine
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.train import records
    from kvstudio.core.train.data import load_data
    from kvstudio.core.train.lora import check_qlora
    from kvstudio.core.train.log import Status, TrainingLog
    from kvstudio.core.spec import CacheSpec
    from kvstudio.core.train.session import FinetuneSession

    # Everything typed is checked before seconds go into loading a model.
    from kvstudio.cli.model_options import apply_kv_groups

    apply_kv_groups(args)  # --kv-groups G: the model spec SPEC+kvG
    policy = policy_from_args(args)
    settings = settings_from_args(args)
    if args.qlora and not torch.cuda.is_available():
        raise KVStudioError("--qlora needs CUDA (4-bit base weights through bitsandbytes); this machine has none: "
                            "train without --qlora")
    if args.data != "synthetic-passkey" and not Path(args.data).expanduser().exists():
        raise KVStudioError(f"data file not found: {args.data}")
    out = Path(args.out).expanduser()
    check_writable_folder(out / "x") if out.exists() else check_writable_folder(out)
    for path in (args.json, args.memory_snapshot):
        if path:
            check_writable_folder(path)

    loaded = load_model(args.model, device=args.device, dtype=args.dtype,
                        quantization="4bit" if args.qlora else None, progress=progress)
    check_qlora(loaded, settings.lora)
    print(f"[kvstudio] {loaded.describe()}; policy {policy.describe()}; grad mode {settings.grad_mode}",
          file=sys.stderr, flush=True)
    dataset = load_data(args.data, loaded.tokenizer, args.seq_len, seed=args.seed, text_field=args.text_field,
                        prompt_field=args.prompt_field, answer_field=args.answer_field,
                        synthetic_count=args.examples)
    print(f"[kvstudio] data: {dataset.description}; {len(dataset.train)} training, {len(dataset.validation)} "
          "validation examples", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)

    def show(event):
        line = format_step(event, settings.steps)
        if line:
            print(line, file=sys.stderr if isinstance(event, Status) else sys.stdout, flush=True)

    log = TrainingLog(listener=show)
    engine = Engine(loaded)
    session = FinetuneSession(engine, policy, dataset, settings, out, log=log, resume=args.resume,
                              snapshot_path=args.memory_snapshot)
    book = records.book(open_history(args.no_history), loaded.identity, CacheSpec.of(policy), dataset.description,
                        settings.as_dict(), str(out), on_warning=warn)
    book.start()
    try:
        result = session.run()
    except KeyboardInterrupt:
        book.fail("interrupted (Ctrl+C); " + session.kept_text(), "cancelled")
        raise
    except BaseException as error:
        book.fail(error)
        raise
    records.finish(book, result, log)
    print(f"--- {result.status}: {len(result.steps)} steps; val loss under {result.policy}: "
          f"{_num(result.initial_val_loss_policy)} -> {_num(result.final_val_loss_policy)}, under full: "
          f"{_num(result.initial_val_loss_full)} -> {_num(result.final_val_loss_full)}; adapter {result.adapter}")
    if book.history is not None and book.run_id is not None:
        print(f"[kvstudio] stored as run {book.run_id} (kvstudio runs show {book.run_id})", file=sys.stderr)
    if args.memory_snapshot and session.snapshot is not None:
        print(f"[kvstudio] wrote memory snapshot of step {settings.snapshot_step} to {args.memory_snapshot}",
              file=sys.stderr)
    if args.json:
        write_json_atomic(Path(args.json), result.to_dict())
        print(f"[kvstudio] wrote {args.json}", file=sys.stderr)
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"
