"""A folder of saved caches keyed by prompt: `kvstudio run --prompt-cache DIR`.

A file's name is a hash of what makes a cache reusable: the model and tokenizer fingerprints, the
policy and its parameters, the storage (codec, group size, residual, tier, recall), the chunk size, and the prompt's first n tokens. A run looks
for, in order: its whole prompt ("restored": the next token is sampled from the saved logits), then
the longest prefix of its prompt that ends on a chunk boundary ("prefix N": only the rest is
prefilled). Both give exactly what a full prefill gives, because a policy sees the same chunks in
the same order either way. After the prefill the run saves its state at the end of the prompt and
at the last chunk boundary before it, so a follow-up question on the same document (same first
chunks, another ending) finds the document's chunks.

A file that cannot be used (truncated, corrupt, from another version, model, tokenizer or policy) is
refused with a warning saying which, and the prompt is computed instead; the warning says whether
this run's cache replaces the file (it does when the file is one of the two the run saves) or the
file stays. A folder that cannot be written gives a warning and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstudio.core.persist.fingerprint import model_fingerprint, tokenizer_sha256
from kvstudio.core.storage import StorageConfig, storage_of
from kvstudio.core.runtime.layer_tensors import CODEC, storage_key
from kvstudio.core.runtime.run_state import RunState
from kvstudio.core.persist.saved_cache import SUFFIX, SavedCacheError, load_saved_cache, write_saved_cache


def cache_key_prefix(loaded, policy, chunk_size: int) -> bytes:
    """Everything but the tokens that a reusable cache must share."""
    model = model_fingerprint(loaded)
    data = {"config": model["config_sha256"], "weights": model["weights_sha256"], "dtype": model["dtype"],
            "tokenizer": tokenizer_sha256(loaded.tokenizer), "policy": policy.name,
            "parameters": policy.config.as_dict(), "chunk_size": chunk_size}
    storage = storage_key(storage_of(policy))
    # fp on the device keeps the key of files written before storage was saved; any other storage is
    # part of the key, so an int4 run never even finds an int8 or fp file (a miss, not a refusal).
    data["codec"] = CODEC if storage == storage_key(StorageConfig()) else storage
    return json.dumps(data, sort_keys=True, default=str).encode()


def candidate_lengths(n: int, chunk_size: int) -> list[int]:
    """Prefix lengths worth looking up, longest first: the whole prompt, then chunk boundaries."""
    boundaries = range((n - 1) // chunk_size * chunk_size, 0, -chunk_size)
    return [n] + [b for b in boundaries if b != n]


def saved_lengths(n: int, chunk_size: int) -> set[int]:
    """The prefix lengths a run saves (see Engine.generate's on_prefill_state): the whole prompt and
    the last chunk boundary before it."""
    return set(candidate_lengths(n, chunk_size)[:2])


@dataclass
class PromptCache:
    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder).expanduser()

    def paths(self, loaded, policy, chunk_size: int, ids: list[int], lengths: list[int]) -> dict[int, Path]:
        """The file each prefix length of `ids` would be saved in."""
        digest = hashlib.sha256(cache_key_prefix(loaded, policy, chunk_size))
        tokens = torch.tensor(ids, dtype=torch.int64).numpy().tobytes()
        found, done = {}, 0
        for length in sorted(lengths):
            digest.update(tokens[done * 8:length * 8])
            done = length
            found[length] = self.folder / f"{digest.copy().hexdigest()[:32]}{SUFFIX}"
        return found


@dataclass
class PromptCacheSession:
    """One run's use of a prompt cache: find and restore before, save after."""

    cache: PromptCache
    engine: object
    policy: object
    settings: object
    ids: list[int]
    prompt_text: str = ""
    status: str = "miss"  # saved | restored | prefix N | miss
    start: RunState | None = None
    restore_seconds: float = 0.0
    saved_prefill_seconds: float = 0.0  # what computing the restored tokens took when they were saved
    warnings: list[str] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    _states: list[RunState] = field(default_factory=list)
    refused: set[Path] = field(default_factory=set)  # files that could not be used (a save replaces them)

    def prepare(self) -> None:
        """Restore the longest saved prefix that fits; warnings say why a file was refused."""
        lengths = candidate_lengths(len(self.ids), self.settings.chunk_size)
        self._paths = self.cache.paths(self.engine.loaded, self.policy, self.settings.chunk_size, self.ids, lengths)
        for length in lengths:
            path = self._paths[length]
            if not path.is_file():
                continue
            try:
                header, state, seconds = load_saved_cache(path, self.engine.loaded, self.policy,
                                                          self.settings.chunk_size)
            except SavedCacheError as error:
                self._refuse(path, length, str(error))
                continue
            if state.token_ids != self.ids[:length] or state.generated:
                self._refuse(path, length, f"{path}: it holds other tokens than its name says")
                continue
            self.start, self.restore_seconds = state, seconds
            self.saved_prefill_seconds = header.get("prefill_seconds", 0.0)
            self.status = "restored" if length == len(self.ids) else f"prefix {length}"
            return

    def _refuse(self, path: Path, length: int, why: str) -> None:
        if length in saved_lengths(len(self.ids), self.settings.chunk_size):
            then = "this run saves its own cache in its place"
        else:  # a shorter prefix than the run saves: nothing overwrites it
            then = f"the file stays (this run saves other prefixes): delete it with `kvstudio cache rm {path}`"
        self.warnings.append(f"prompt cache: refused {why}; computing the prompt instead, and {then}")
        self.refused.add(path)

    def generate_options(self) -> dict:
        """What `Engine.generate` needs to go on from the restored state and hand back what to save."""
        if self.status == "restored":  # the whole prompt came from the file: nothing new to save
            return {"start": self.start}
        options = {"on_prefill_state": self._states.append}
        if self.start is not None:
            options["start"] = self.start
        return options

    def finish(self) -> None:
        """Save the states the run handed back (those not saved already). A folder that cannot be
        written gives a warning; the run's result stands."""
        states = [s for s in self._states if self.start is None or len(s.token_ids) > len(self.start.token_ids)]
        self._states = []
        if not states:
            return
        try:
            self.cache.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self.warnings.append(f"prompt cache: cannot create {self.cache.folder} ({error.strerror or error}); "
                                 "nothing saved, the run went on")
            return
        lengths = [len(s.token_ids) for s in states]
        paths = self.cache.paths(self.engine.loaded, self.policy, self.settings.chunk_size, self.ids, lengths)
        for state in states:
            path = paths[len(state.token_ids)]
            if path.is_file() and path not in self.refused:
                continue  # already saved by an earlier run (a refused file is replaced)
            try:
                preview = self.prompt_text if len(state.token_ids) == len(self.ids) else None
                write_saved_cache(path, state, self.engine.loaded, self.policy, self.settings, preview)
            except SavedCacheError as error:
                self.warnings.append(f"prompt cache: {error}; the run went on without saving")
                return
            self.saved.append(path)
        if self.saved and self.status == "miss":
            self.status = "saved"
