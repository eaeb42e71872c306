"""`kvstudio run` with several prompts: one batched run (core/runtime/batch.py), each row its own run.

  kvstudio run --prompt-file A --prompt-file B ...   one row per file, all under the command's policy
  kvstudio run --prompts FILE.jsonl                  one row per line: {"prompt": TEXT} or
                                                     {"prompt_file": PATH} (relative to FILE's folder),
                                                     optional "policy" (a cache name: h2o-int8), its
                                                     "parameters" ({"budget": 64, "storage": {...}}),
                                                     "seed" and "label"
  --batch-size N                                     at most N rows in flight (default: all that fit)

Each row is stored in the run history as its own run, its settings naming the batch
(`"batch": {"id", "row", "rows", "label"}`), so `kvstudio runs show ID` says which batch it was in
and `kvstudio runs list` marks it. A row that fails (its policy raised) is stored as failed with the
policy's message; the others finish, and the command exits with status 2.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from kvstudio.cli.output import open_history, warn, write_json_atomic
from kvstudio.core.errors import KVStudioError, PromptError
from kvstudio.core.units import format_bytes

EXIT_ROW_FAILED = 2


def add_options(run, prompt_group) -> None:
    """--prompts (beside --prompt and --prompt-file, which repeats) and --batch-size."""
    prompt_group.add_argument("--prompts", metavar="FILE.jsonl", help="a batch: one JSON record per line, {\"prompt\": TEXT} "
                     "or {\"prompt_file\": PATH}, optional \"policy\" (cache name), \"parameters\", \"seed\", "
                     "\"label\"; rows without a policy use --policy")
    run.add_argument("--batch-size", type=int, metavar="N", help="run the prompts as a batch, at most N rows at a "
                     "time (default: every row that fits in memory)")


def wants_batch(args) -> bool:
    return bool(args.prompts) or len(args.prompt_file or []) > 1 or args.batch_size is not None


def read_rows(args, policy) -> list:
    """The batch's rows from --prompt-file (repeated) or --prompts FILE.jsonl; each row's policy is its
    own or the command's."""
    from kvstudio.core.io.documents import read_document
    from kvstudio.core.runtime.batch import BatchRow

    if args.prompts:
        return _jsonl_rows(Path(args.prompts).expanduser(), policy)
    if args.prompt_file:
        return [BatchRow(read_document(path, what="prompt file", any_suffix=True).text, policy, label=Path(path).name)
                for path in args.prompt_file]
    if args.prompt is None:
        raise PromptError("no prompt: give --prompt TEXT, --prompt-file PATH (repeatable) or --prompts FILE.jsonl")
    return [BatchRow(args.prompt, policy, label="--prompt")]


def _jsonl_rows(path: Path, default_policy) -> list:
    from kvstudio.core.io.documents import read_document
    from kvstudio.core.runtime.batch import BatchRow
    from kvstudio.core.spec import CacheSpec

    text = read_document(path, what="--prompts file", any_suffix=True).text
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptError(f"{where} is not JSON ({error.msg}): write one object per line, "
                              '{"prompt": "..."}') from error
        if not isinstance(record, dict) or ("prompt" in record) == ("prompt_file" in record):
            raise PromptError(f'{where}: give exactly one of "prompt" or "prompt_file"')
        unknown = sorted(set(record) - {"prompt", "prompt_file", "policy", "parameters", "seed", "label"})
        if unknown:
            raise PromptError(f"{where}: unknown field {', '.join(map(repr, unknown))} (fields: prompt, prompt_file, "
                              "policy, parameters, seed, label)")
        if "prompt_file" in record:
            prompt = read_document(path.parent / record["prompt_file"], what=f"{where}'s prompt file",
                                   any_suffix=True).text
        else:
            prompt = record["prompt"]
            if not isinstance(prompt, str):
                raise PromptError(f'{where}: "prompt" must be text')
        parameters = record.get("parameters", {})
        if not isinstance(parameters, dict):
            raise PromptError(f'{where}: "parameters" must be an object, e.g. {{"budget": 64}}')
        if "policy" in record:
            try:
                policy = CacheSpec.parse(str(record["policy"]), parameters).build()
            except KVStudioError as error:
                raise KVStudioError(f"{where}: {error}") from error
        elif parameters:
            raise PromptError(f'{where}: "parameters" without a "policy"; name the policy they are for')
        else:
            policy = default_policy
        seed = record.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise PromptError(f'{where}: "seed" must be a whole number')
        rows.append(BatchRow(prompt, policy, seed=seed, label=str(record.get("label", where))))
    if not rows:
        raise PromptError(f"{path.name} holds no prompts: one JSON object per line")
    return rows


def run(args, policy, settings, load) -> int:
    """The batched `kvstudio run`; `load(args)` loads the model (dispatch.py's, with its OOM message)."""
    from kvstudio.core.persist.run_book import RunBook
    from kvstudio.core.recording.events import Recorder
    from kvstudio.core.runtime.batch import generate_batch, row_name
    from kvstudio.core.runtime.engine import CancelToken, Engine
    from kvstudio.core.runtime.interruptions import TextOutput
    from kvstudio.core.spec import CacheSpec
    from kvstudio.cli.runs_plot import watched_layers

    rows = read_rows(args, policy)
    if args.batch_size is not None and args.batch_size < 1:
        raise KVStudioError(f"--batch-size must be at least 1, got {args.batch_size}")
    # --measure-loss runs a shadow full cache beside one run's; a batch has none, and silently
    # dropping the figure would leave a sweep of rows that look measured and are not.
    for option in ("prompt_cache", "memory_snapshot", "adapter", "measure_loss"):
        if getattr(args, option, None):
            raise KVStudioError(f"--{option.replace('_', '-')} works with one prompt, not a batch: run the prompts "
                                "one by one for it")
    loaded = load(args)
    print(f"[kvstudio] {loaded.describe()}; a batch of {len(rows)} rows", file=sys.stderr, flush=True)
    engine = Engine(loaded)
    history = open_history(args.no_history)
    batch_id = uuid.uuid4().hex[:8]
    recorders = [Recorder(watch_layers=watched_layers(args.attention_layers, loaded.n_layers)) for _ in rows]
    books: dict[int, RunBook] = {}
    output = TextOutput(CancelToken())
    texts = [row.prompt for row in rows]

    def on_row_start(index: int) -> None:
        row = rows[index]
        link = {"id": batch_id, "row": index + 1, "rows": len(rows), "label": row.label}
        books[index] = RunBook(history, model=loaded.identity, cache=CacheSpec.of(row.policy), prompt=texts[index],
                               settings=settings.record() | {"batch": link}, recorder=recorders[index],
                               on_warning=warn)
        books[index].start()

    def on_row_end(row_result) -> None:
        name = row_name(row_result.index, row_result.label)
        book = books.get(row_result.index)
        if row_result.failed:
            print(f"kvstudio: error: {name}: {row_result.error}", file=sys.stderr)
            if book is not None:
                book.fail(str(row_result.error))
            return
        result = row_result.result
        output.write(f"=== {name}: {result.policy}\n{result.text}\n")
        output.write(f"--- prompt {result.prompt_tokens} tokens, generated {len(result.token_ids)} "
                     f"(stop: {result.stop_reason}), peak cache {format_bytes(result.peak_cache_bytes)}, "
                     f"evictions {result.evictions}\n\n")
        if book is not None:
            book.finish(result)

    try:
        batch = generate_batch(engine, rows, settings, max_rows=args.batch_size, recorders=recorders,
                               cancel=output.cancel, on_row_start=on_row_start, on_row_end=on_row_end)
    except BaseException as error:
        for book in books.values():
            if book.active:
                book.fail(error)  # Ctrl-C, SIGTERM or a failure of the whole batch, keeping what each row made
        raise
    seconds = batch.seconds
    print(f"--- batch {batch_id}: {len(rows)} rows, at most {batch.max_rows_in_flight} at a time, {batch.steps} "
          f"packed steps in {seconds:.2f} s; {batch.prompt_tokens} prompt tokens, {batch.tokens_generated} generated "
          f"({batch.tokens_generated / seconds if seconds else 0:.1f} tokens/s); peak cache "
          f"{format_bytes(batch.peak_cache_bytes)}")
    stored = [book.run_id for book in books.values() if book.run_id is not None]
    if stored and history is not None:
        print(f"[kvstudio] stored as runs {', '.join(map(str, sorted(stored)))} (kvstudio runs show ID)",
              file=sys.stderr)
    if args.json:
        data = {"batch": {"id": batch_id, "rows": len(rows), "seconds": seconds, "steps": batch.steps,
                          "max_rows_in_flight": batch.max_rows_in_flight, "peak_cache_bytes": batch.peak_cache_bytes,
                          "prompt_tokens": batch.prompt_tokens, "tokens_generated": batch.tokens_generated,
                          "cancelled": batch.cancelled, "errors": batch.errors},
                "rows": [{"row": r.index + 1, "label": r.label, "run_id": books[r.index].run_id if r.index in books
                          else None, "error": str(r.error) if r.failed else None,
                          **(r.result.to_dict() if r.result is not None else {})} for r in batch.rows],
                "settings": settings.record()}
        write_json_atomic(Path(args.json), data)
        print(f"[kvstudio] wrote {args.json}", file=sys.stderr)
    if output.closed:
        from kvstudio.core.runtime.interruptions import EXIT_BROKEN_PIPE

        return EXIT_BROKEN_PIPE
    return EXIT_ROW_FAILED if batch.errors else 0
