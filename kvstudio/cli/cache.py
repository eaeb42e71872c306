"""`kvstudio cache save|load|list|show|rm`: saved caches as files, and `run --prompt-cache DIR`.

  kvstudio cache save OUT --prompt TEXT [run options]   prefill (and generate N tokens), save the state
  kvstudio cache load FILE [--max-new-tokens N]         restore and go on generating, bit-identically
  kvstudio cache load FILE --then TEXT                  restore, feed TEXT after it, generate
  kvstudio cache list DIR                               what is saved: prompt, model, policy, storage, sizes,
                                                        date; every byte checked, a bad file marked
  kvstudio cache show FILE                              the header, every byte checked
  kvstudio cache rm FILE...                             delete saved caches (and nothing else)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvstudio.cli.options import add_policy_options, policy_from_args, prompt_from_args
from kvstudio.cli.output import format_summary, progress, write_json_atomic
from kvstudio.core.errors import KVStudioError
from kvstudio.core.units import format_bytes


def add_parser(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="saved caches: save, load and continue, list, show, rm")
    commands = cache.add_subparsers(dest="cache_command", parser_class=type(cache), required=True)

    save = commands.add_parser("save", help="prefill a prompt (and generate N tokens) under a policy; save the state")
    save.add_argument("path", help="the file to write (.kvcache)")
    _model_options(save)
    save.add_argument("--policy", default="full", help="cache policy (see `kvstudio policies`)")
    save.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size in tokens (default 512)")
    prompt = save.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")
    save.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    save.add_argument("--max-new-tokens", type=int, default=0, help="tokens to generate before saving (default 0)")
    save.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    save.add_argument("--top-p", type=float, default=1.0)
    save.add_argument("--top-k", type=int, default=0)
    save.add_argument("--seed", type=int, help="seed for sampling")
    add_policy_options(save)
    from kvstudio.cli.storage_options import add_storage_options

    add_storage_options(save)  # a cache is saved as its codec and tier hold it (`--policy h2o-int4` works too)

    load = commands.add_parser("load", help="restore a saved cache and go on generating from it")
    load.add_argument("path", help="a saved cache (.kvcache)")
    _model_options(load, default=None)
    load.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate from there (default 64)")
    load.add_argument("--then", metavar="TEXT", help="feed TEXT after the saved tokens first (a follow-up question)")
    load.add_argument("--save", metavar="PATH", help="save the state again when done, to go on later")
    load.add_argument("--json", metavar="PATH", help="write the continuation (text, figures, steps) as JSON")

    listing = commands.add_parser("list", help="the saved caches in a folder")
    listing.add_argument("folder")
    show = commands.add_parser("show", help="one saved cache's header, every byte checked")
    show.add_argument("path")
    remove = commands.add_parser("rm", help="delete saved caches (refuses files that are not)")
    remove.add_argument("paths", nargs="+")
    for parser in (save, load, listing, show, remove):
        parser.add_argument("--plugins", action="append", default=[], metavar="DIR",
                            help="also load policy plugins from DIR (a cache made under a plugin needs it)")


def _model_options(parser, default: str | None = "default") -> None:
    parser.add_argument("--model", default=default, help="model spec" + (" (default: the one the cache names)"
                                                                         if default is None else ""))
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")


def run(args) -> int:
    from kvstudio.core.persist.saved_cache import SavedCacheError, what_to_do

    try:
        return {"save": _save, "load": _load, "list": _list, "show": _show, "rm": _remove}[args.cache_command](args)
    except SavedCacheError as error:  # a file `load` or `show` cannot read: say what the user can do here
        raise SavedCacheError(what_to_do(error, f"delete it (kvstudio cache rm {getattr(args, 'path', '')})",
                                         "save the cache again (kvstudio cache save)"), error.problem) from error


# --- save / load ------------------------------------------------------------------------------


def _save(args) -> int:
    from kvstudio.core.io.atomic import check_writable_folder
    from kvstudio.core.runtime.engine import Engine, GenerationSettings
    from kvstudio.core.models.loading import load_model
    from kvstudio.cli.storage_options import storage_from_args
    from kvstudio.core.runtime.layer_tensors import cache_unsaveable_reason, unsaveable_reason
    from kvstudio.core.persist.saved_cache import SavedCacheError, write_saved_cache

    storage = storage_from_args(args)
    reason = unsaveable_reason(storage)
    if reason is not None:
        raise SavedCacheError(f"nothing saved: {reason}")
    policy = policy_from_args(args)
    policy.storage = storage
    prompt = prompt_from_args(args)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed, chunk_size=args.chunk_size,
                                  chat_template=args.chat, memory_sample_hz=0)
    settings.validate()
    check_writable_folder(args.path, SavedCacheError)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, progress=progress)
    engine = Engine(loaded)
    reason = cache_unsaveable_reason(engine.new_cache(policy))  # what the model's layers hold, before any work
    if reason is not None:
        raise SavedCacheError(f"nothing saved: {reason}")
    result = engine.generate(prompt, policy, settings, keep_state=True,
                             on_text=lambda piece: print(piece, end="", flush=True))
    if result.state is None:
        raise KVStudioError("the run stopped before its prompt was in: nothing to save")
    info = write_saved_cache(args.path, result.state, loaded, policy, settings, prompt)
    print()
    print(f"saved {result.prompt_tokens} prompt + {len(result.token_ids)} generated tokens under "
          f"{policy.describe()} to {info.path}: {format_bytes(info.file_bytes)} on disk, "
          f"{format_bytes(info.memory_bytes)} in memory (prefill {result.prefill_seconds:.2f} s, "
          f"save {info.seconds:.2f} s)")
    return 0


def _load(args) -> int:
    from kvstudio.core.io.atomic import check_writable_folder
    from kvstudio.core.runtime.engine import Engine, GenerationSettings
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.persist.saved_cache import (SavedCacheError, load_saved_cache, policy_from_header, read_header,
                                          write_saved_cache)

    header = read_header(args.path)
    policy = policy_from_header(header)
    for path in (args.save, args.json):
        if path:
            check_writable_folder(path, SavedCacheError)
    saved = dict(header.get("generation") or {})
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=saved.get("temperature", 0.0), top_p=saved.get("top_p", 1.0),
        top_k=saved.get("top_k", 0), seed=saved.get("seed"), chunk_size=header.get("chunk_size") or 512,
        stop_strings=tuple(saved.get("stop_strings", ())), memory_sample_hz=0,
    )
    settings.validate()
    loaded = load_model(args.model or header["model"]["spec"], device=args.device, dtype=args.dtype,
                        progress=progress)
    header, state, seconds = load_saved_cache(args.path, loaded, policy)
    engine = Engine(loaded)
    print(f"[kvstudio] restored {len(state.token_ids)} tokens under {policy.describe()} in {seconds:.3f} s "
          f"(their prefill took {state.prefill_seconds:.2f} s)", file=sys.stderr)
    if args.then:
        ids = state.followed_by(loaded.tokenizer(args.then, add_special_tokens=False)["input_ids"])
        result = engine.generate(ids, policy, settings, start=state, keep_state=bool(args.save),
                                 on_text=lambda piece: print(piece, end="", flush=True))
    else:
        result = engine.generate(None, policy, settings, start=state, resume=True, keep_state=bool(args.save),
                                 on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(format_summary(result))
    print(f"restored {result.restored_tokens} tokens in {seconds:.3f} s")
    if args.save and result.state is not None:
        info = write_saved_cache(args.save, result.state, loaded, policy, settings)
        print(f"[kvstudio] saved the state to {info.path} ({format_bytes(info.file_bytes)})", file=sys.stderr)
    if args.json:
        data = result.to_dict() | {"restore_seconds": seconds, "policy": policy.name,
                                   "policy_parameters": policy.config.as_dict()}
        write_json_atomic(Path(args.json), data)
    return 0


# --- list / show / rm -------------------------------------------------------------------------


def _list(args) -> int:
    """One row per file with its whole name (what `cache show|load|rm` take), then its policy, storage
    and prompt on an indented line each, uncut; a file that fails its checks says what is wrong."""
    from kvstudio.core.persist.saved_cache import SUFFIX, SavedCacheError, checked_header, describe_storage, header_storage

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise KVStudioError(f"cache list {args.folder}: no such folder")
    files = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        print(f"no saved caches in {folder}")
        return 0
    width = max(len("file"), *(len(path.name) for path in files))
    print(f"{'file':<{width}}  {'saved (UTC)':<19} {'model':<16} {'tokens':>7} {'on disk':>10} {'in memory':>10}")
    for path in files:
        try:
            header = checked_header(path)
        except SavedCacheError as error:
            print(f"{path.name:<{width}}  UNREADABLE: {error.problem or 'cannot be used'} "
                  f"(`kvstudio cache show {path}` says more)")
            continue
        print(f"{path.name:<{width}}  {header['created'][:19].replace('T', ' '):<19} {header['model']['name']:<16} "
              f"{header['tokens']['fed']:>7} {format_bytes(path.stat().st_size):>10} "
              f"{format_bytes(header['cache_bytes']):>10}")
        print(f"    policy   {header['policy']['describe']}")
        print(f"    storage  {describe_storage(header_storage(header))}")
        print(f"    prompt   {header.get('prompt_preview', '')[:60].replace(chr(10), ' ')!r}")
    return 0


def _show(args) -> int:
    from kvstudio.core.persist.saved_cache import read_saved_cache

    header, state = read_saved_cache(args.path)
    shown = {k: v for k, v in header.items() if k != "layers"}
    shown["checksum"] = "ok"
    shown["file_bytes"] = Path(args.path).expanduser().stat().st_size
    print(json.dumps(shown, indent=1))
    return 0


def _remove(args) -> int:
    from kvstudio.core.persist.saved_cache import MAGIC, SUFFIX

    status = 0
    for name in args.paths:
        path = Path(name).expanduser()
        try:
            with open(path, "rb") as stream:
                start = stream.read(len(MAGIC))
        except OSError as error:
            print(f"kvstudio: error: not removed: {path}: {error.strerror or error}", file=sys.stderr)
            status = 2
            continue
        # A saved cache, or what is left of one (a truncated file still carrying the suffix).
        if start != MAGIC and not (path.suffix == SUFFIX and MAGIC.startswith(start)):
            print(f"kvstudio: error: not removed: {path} is not a KV Studio saved cache", file=sys.stderr)
            status = 2
            continue
        path.unlink()
        print(f"removed {path}")
    return status


# --- `kvstudio run --prompt-cache DIR` ----------------------------------------------------------


def open_prompt_cache(folder: str, engine, policy, settings, prompt: str):
    """A prepared PromptCacheSession for a run (warnings printed), or None without --prompt-cache."""
    if not folder:
        return None
    from kvstudio.core.storage import storage_of
    from kvstudio.core.runtime.layer_tensors import unsaveable_reason
    from kvstudio.core.persist.prompt_cache import PromptCache, PromptCacheSession

    reason = unsaveable_reason(storage_of(policy))
    if reason is None and settings.measure_loss:
        reason = ("--measure-loss needs every key of the run, and a saved prompt keeps only the entries its "
                  "policy kept: the prompt is run from its text")
    if reason is not None:
        print(f"kvstudio: warning: --prompt-cache is off for this run: {reason}", file=sys.stderr)
        return None

    ids = engine.encode(prompt, settings.chat_template)
    session = PromptCacheSession(PromptCache(Path(folder)), engine, policy, settings, ids, prompt)
    session.prepare()
    _warn(session)
    if session.start is not None:
        print(f"[kvstudio] prompt cache: {session.status}: {len(session.start.token_ids)} tokens restored in "
              f"{session.restore_seconds:.3f} s (their prefill took {session.saved_prefill_seconds:.2f} s)",
              file=sys.stderr)
    return session


def finish_prompt_cache(session) -> None:
    if session is None:
        return
    session.finish()
    _warn(session)
    for path in session.saved:
        replaced = " (in place of the refused file)" if path in session.refused else ""
        print(f"[kvstudio] prompt cache: saved {path}{replaced}", file=sys.stderr)


def _warn(session) -> None:
    for warning in session.warnings:
        print(f"kvstudio: warning: {warning}", file=sys.stderr)
    session.warnings.clear()
