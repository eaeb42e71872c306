"""What a run needs to be repeated: the versions it ran under, where, and the command that reruns it.

Every run's history row (settings["provenance"]), every sweep cell and every export carries
`environment(...)`: KV Studio, torch, transformers and Python versions, the platform, the device and
dtype, and the git commit (with whether the checkout had changes) when KV Studio runs from a git
checkout, plus the command: the exact command line of a `kvstudio` command, or for a studio run
the `kvstudio run` command that does the same (`rerun_command`). `kvstudio runs show ID --command`
prints it.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import kvstudio
from kvstudio.core.persist.history import PREVIEW_CHARS
from kvstudio.core.policies import completed_record, policy_class
from kvstudio.core.storage import StorageConfig

PROVENANCE_KEY = "provenance"  # in a history row's settings, a sweep cell, an export


@lru_cache(maxsize=1)
def _versions() -> dict:
    import torch
    import transformers

    return {"kvstudio": kvstudio.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


@lru_cache(maxsize=1)
def git_commit() -> dict:
    """{"git_commit": hash, "git_dirty": bool} when KV Studio's package sits in a git checkout, else {}."""
    root = Path(kvstudio.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {}
    try:
        def git(*arguments):
            return subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True, timeout=5,
                                  check=True).stdout
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def command_line(argv: list[str] | None = None) -> str | None:
    """The command line of this process as a user would type it again (`kvstudio run ...`); None when
    the process is not a kvstudio command (the studio, a script, the tests)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).name not in ("kvstudio", "__main__.py", "kvstudio.exe") or len(argv) < 2:
        return None
    if argv[1].startswith("-"):  # `kvstudio --model SPEC`: the studio, whose runs record their own command
        return None
    return shlex.join(["kvstudio", *argv[1:]])


def environment(device=None, dtype=None, command: str | None = None) -> dict:
    """The provenance of a run made now: versions, git, device and dtype, and its command (this
    process's command line unless given)."""
    data = dict(_versions()) | git_commit()
    if device is not None:
        data["device"] = str(device)
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    data["command"] = command if command is not None else command_line()
    return data


def rerun_command(model: str, policy: str, parameters: dict, settings: dict, prompt: str | None,
                  adapter: str | None = None) -> str:
    """A `kvstudio run` command that runs the same model, cache, settings and prompt again. `parameters`
    as a history row keeps them (the storage fields under "storage"); `prompt` None when only a
    preview of it is kept (the command then reads --prompt-file PROMPT.txt); `adapter` the LoRA
    adapter's folder when one was applied."""
    words = ["kvstudio", "run", "--model", model] + (["--adapter", adapter] if adapter else []) + ["--policy", policy]
    declared = {spec.name: spec for spec in policy_class(policy).Config.parameters()}
    defaults = {name: spec.default for name, spec in declared.items()}
    for name, value in parameters.items():
        spec = declared.get(name)
        if spec is None or value is None or value == defaults.get(name):
            continue
        words += [spec.option] if spec.type is bool else [spec.option, str(value)]
    storage = {spec.name: spec for spec in StorageConfig.parameters()}
    for name, value in (parameters.get("storage") or {}).items():
        spec = storage.get(name)
        if spec is not None and value is not None:
            words += [spec.option] if spec.type is bool else [spec.option, str(value)]
    options = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
               "top_k": "--top-k", "seed": "--seed", "chunk_size": "--chunk-size"}
    for name, option in options.items():
        if settings.get(name) is not None:
            words += [option, str(settings[name])]
    for stop in settings.get("stop_strings") or ():
        words += ["--stop", stop]
    for name, option in (("chat_template", "--chat"), ("ignore_eos", "--ignore-eos"),
                         ("measure_loss", "--measure-loss")):
        if settings.get(name):
            words.append(option)
    words += ["--prompt", prompt] if prompt is not None else ["--prompt-file", "PROMPT.txt"]
    return shlex.join(words)


def command_of_record(record) -> tuple[str, str | None]:
    """(a command that reruns a history row, a note on what it cannot say). The recorded command when
    there is one; else (a studio run, or a row from before commands were recorded) one built from the
    row, whose prompt is in the command when the row's preview holds it whole."""
    recorded = (record.settings.get(PROVENANCE_KEY) or {}).get("command")
    if recorded:
        return recorded, None
    if record.kind != "generate":
        return "", f"run {record.id} is a {record.kind} session and recorded no command"
    whole = len(record.prompt_preview) < PREVIEW_CHARS
    # A run with an adapter is filed as SPEC+lora:SESSION/CHECKPOINT (models/loading.py, model_identity).
    spec, _, adapter = record.model.partition("+lora:")
    command = rerun_command(spec, record.policy, completed_record(record.policy, record.parameters),
                            record.settings, record.prompt_preview if whole else None, adapter=adapter or None)
    notes = [] if whole else [f"the history keeps only the first {PREVIEW_CHARS} characters of the prompt: save it "
                              f"as PROMPT.txt (sha256 {record.prompt_sha256}); `kvstudio runs export "
                              f"{record.id} run.json` holds its token ids"]
    if adapter:
        notes.append(f"the history names the LoRA adapter by its session folder and checkpoint ({adapter}): "
                     "give --adapter that checkpoint's path")
    return command, "; ".join(notes) or None
