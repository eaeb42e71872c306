"""Sweeps: one task under policies x budgets x variants x the task's samples, one cell at a time.

Each finished cell is appended to the sweep's store (a JSON-lines file, flushed and synced per
line) and, for the run history, stored as an ordinary run with its events, so the studio can open
any cell with all its views. Running the same sweep again reads the store first and computes only
the cells it lacks: a cancelled or crashed sweep resumes where it stopped, and a sweep grown by a
policy or a budget computes only the new cells. A half-written last line (a crash mid-write) is
ignored and its cell computed again.

Cells run grid point by grid point and budget by budget, every policy at each, so a sweep stopped
half way has compared all policies on the same samples and budgets rather than finished some
policies and not begun others.

Variants are the place for storage settings that are not policy parameters yet: each variant is a
dict of extra options applied to every policy of a cell (checked against what the policy accepts),
e.g. `{"codec": "int8"}` once codecs exist, or merge settings. The default is one empty variant.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvstudio.core.runtime.engine import CancelToken, Engine, GenerationSettings
from kvstudio.core.errors import KVStudioError, PolicyConfigError
from kvstudio.core.persist.provenance import environment
from kvstudio.core.persist.run_book import RunBook
from kvstudio.core.recording.events import Recorder
from kvstudio.core.policies import policy_class
from kvstudio.core.policies.base import Policy
from kvstudio.core.spec import CacheSpec
from kvstudio.core.storage import StorageConfig, storage_from_options
from kvstudio.core.evaluate.haystack import GENERATOR_VERSION
from kvstudio.core.evaluate.language import LanguageOptions, evaluate_language, text_ids
from kvstudio.core.evaluate.protocols import (DEFAULT_PROTOCOL, QUESTION_AGNOSTIC, CompressedContexts, check_protocol,
                                              protocol_settings)
from kvstudio.core.evaluate.tasks import GENERATION_TASKS, LANGUAGE_TASKS, Sample, TaskOptions, generation_samples
from kvstudio.core.plugins.loader import user_data_dir

STORE_VERSION = 1
CURVE_DECIMALS = 5  # per-position log-probabilities and KL, as stored


@dataclass
class SweepSpec:
    task: str
    model: str
    policies: tuple[str, ...]
    budgets: tuple[int, ...]
    task_options: TaskOptions = field(default_factory=TaskOptions)
    language_options: LanguageOptions = field(default_factory=LanguageOptions)
    policy_options: dict = field(default_factory=dict)  # shared parameters (sink, window, ...), where accepted
    variants: tuple[dict, ...] = ({},)  # codecs / merge settings: extra options per cell (see the docstring)
    chunk_size: int = 512
    protocol: str = DEFAULT_PROTOCOL  # how a prompt's question meets the policy (protocols.py)
    measure_loss: bool = False  # each generation cell's attention loss (runtime/attention_loss.py)
    ignore_eos: bool = False  # every answer runs its sample's whole max_new_tokens (timings comparable)

    def validate(self) -> None:
        if self.task in GENERATION_TASKS:
            self.task_options.validate(self.task)
        elif self.task in LANGUAGE_TASKS:
            self.language_options.validate()
        else:
            self.task_options.validate(self.task)  # raises the unknown-task error
        if not self.policies:
            raise KVStudioError("no policies: give --policies a,b")
        if any(b < 1 for b in self.budgets):
            raise KVStudioError(f"--budgets must be positive token counts, got {list(self.budgets)}")
        if self.chunk_size < 1:
            raise KVStudioError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        check_protocol(self.protocol)
        if self.task in LANGUAGE_TASKS and (self.protocol != DEFAULT_PROTOCOL or self.measure_loss or self.ignore_eos):
            raise KVStudioError(f"{self.task} feeds a text, not a question: --protocol, --measure-loss and --ignore-eos "
                                f"apply to the tasks that generate ({', '.join(GENERATION_TASKS)})")
        needs_budget = [name for name in self.policies if policy_class(name).requires_budget]
        if needs_budget and not self.budgets:
            raise KVStudioError(f"{', '.join(needs_budget)} need budgets: give --budgets 64,128,...")
        unused = set(self.policy_options)
        for name in self.policies:
            for budget in self.budgets_for(name):
                for variant in self.variants:
                    make_policy(name, budget, self.policy_options, variant)  # raises what is wrong
            unused -= accepted_parameters(name)
        if unused:
            raise PolicyConfigError(f"{', '.join('--' + n.replace('_', '-') for n in sorted(unused))} applies to "
                                    f"none of the policies {', '.join(self.policies)}")

    def budgets_for(self, policy: str) -> tuple[int | None, ...]:
        """A policy that keeps everything runs once, at no budget."""
        return tuple(self.budgets) if policy_class(policy).requires_budget else (None,)

    def fingerprint(self) -> str:
        """What makes two sweeps' cells comparable: the model, the task and how it was generated.
        Policies, budgets and variants are per cell, so a sweep can grow and reuse its cells."""
        options = asdict(self.task_options) if self.task in GENERATION_TASKS else asdict(self.language_options)
        if self.task == "qa" and self.task_options.qa_file:
            options["qa_file_sha256"] = _file_digest(self.task_options.qa_file)
        for name in ("lengths", "depths", "subtasks", "samples"):
            options.pop(name, None)  # per cell: a grid can grow too
        key = {"version": STORE_VERSION, "generator": GENERATOR_VERSION, "task": store_task(self.task), "model": self.model, "options": options,
               "policy_options": self.policy_options, "chunk_size": self.chunk_size}
        if self.protocol != DEFAULT_PROTOCOL:  # (stores of bounded sweeps, written before protocols, stay theirs)
            key["protocol"] = self.protocol
        if self.ignore_eos:  # longer answers: other cells
            key["ignore_eos"] = True
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"task": self.task, "model": self.model, "policies": list(self.policies),
                "budgets": list(self.budgets), "task_options": asdict(self.task_options),
                "language_options": asdict(self.language_options), "policy_options": self.policy_options,
                "variants": list(self.variants), "chunk_size": self.chunk_size, "protocol": self.protocol,
                "measure_loss": self.measure_loss, "ignore_eos": self.ignore_eos}


def accepted_parameters(policy: str) -> set[str]:
    return {spec.name for spec in policy_class(policy).Config.parameters()}


def make_policy(name: str, budget: int | None, shared: dict, variant: dict) -> Policy:
    """The cell's policy: its budget, the shared options it accepts, and every variant option. Variant
    options named like StorageConfig fields (codec, merge, merge_from, ...) set the cell's storage."""
    storage, variant = storage_from_options(variant)
    accepted = accepted_parameters(name)
    foreign = sorted(set(variant) - accepted)
    if foreign:
        raise PolicyConfigError(f"variant option {', '.join(foreign)} does not apply to policy '{name}' "
                                f"(its options: {', '.join(sorted(accepted))})")
    params = {k: v for k, v in shared.items() if k in accepted and v is not None}
    params.update(variant)
    if budget is not None:
        params["budget"] = budget
    return CacheSpec(name, params, storage if storage is not None else StorageConfig()).build()


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the store ----------------------------------------------------------------------------------


def default_store_path(spec: SweepSpec) -> Path:
    return user_data_dir() / "evaluations" / f"{store_task(spec.task)}-{spec.fingerprint()}.jsonl"


class SweepStore:
    """The cells of one sweep, one JSON line each, appended as they finish."""

    def __init__(self, path: str | Path, spec: SweepSpec):
        self.path = Path(path).expanduser()
        self.spec = spec
        self.cells: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._read()
        else:
            self._append({"kind": "sweep", "version": STORE_VERSION, "fingerprint": spec.fingerprint(),
                          "spec": spec.to_dict()})

    def _read(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise KVStudioError(f"cannot read the sweep store {self.path}: {error}") from error
        entries = []
        for number, line in enumerate(lines):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) - 1:
                    continue  # the last cell was being written when the sweep stopped: computed again
                raise KVStudioError(f"the sweep store {self.path} is damaged at line {number + 1}; move it away "
                                    "to start the sweep afresh") from None
        header = entries[0] if entries else {}
        if header.get("kind") != "sweep":
            raise KVStudioError(f"{self.path} is not a KV Studio sweep store")
        if header.get("fingerprint") != self.spec.fingerprint():
            raise KVStudioError(f"the sweep store {self.path} holds another sweep (other model, task or options); "
                                "give another --store path, or move it away")
        self.cells = {entry["key"]: entry["cell"] for entry in entries[1:] if entry.get("kind") == "cell"}

    def add(self, key: str, cell: dict) -> None:
        self._append({"kind": "cell", "key": key, "cell": cell})
        self.cells[key] = cell

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")
            stream.flush()
            os.fsync(stream.fileno())


# --- running ------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One planned unit of work: a policy at a budget (and variant) on one sample."""

    policy: str
    budget: int | None
    variant: dict
    sample: Sample | None  # None for the language tasks (one text)

    def key(self, task: str) -> str:
        where = self.sample.grid_key() if self.sample is not None else {}
        return json.dumps({"task": store_task(task), "policy": self.policy, "budget": self.budget, "variant": self.variant,
                           **where}, sort_keys=True)

    @property
    def weight(self) -> int:
        """Work, in prompt tokens, for the time-left estimate."""
        return self.sample.context_tokens if self.sample is not None else 1


@dataclass
class SweepProgress:
    done: int  # cells finished, reused ones included
    total: int
    reused: int  # cells read from the store
    seconds_left: float | None  # None until a cell has been computed
    current: str  # what runs now
    elapsed: float = 0.0


@dataclass
class SweepOutcome:
    records: list[dict]
    computed: int
    reused: int
    cancelled: bool
    store: Path
    failed: dict = field(default_factory=dict)  # cell key -> why (a cluster cell whose worker died twice)


class Sweep:
    """Plans the cells of a spec, then runs the missing ones, storing each as it finishes."""

    def __init__(self, engine: Engine, spec: SweepSpec, store_path: str | Path | None = None, history=None,
                 cancel: CancelToken | None = None):
        spec.validate()
        self.engine = engine
        self.spec = spec
        self.store = SweepStore(store_path or default_store_path(spec), spec)
        self.history = history
        self.cancel = cancel or CancelToken()
        self._text_ids: list[int] | None = None
        self._contexts = CompressedContexts()  # question-agnostic: each context compressed once per policy
        loaded = engine.loaded
        self.provenance = environment(loaded.device, loaded.dtype)  # every cell's versions, device, command
        self.cells = self._plan()

    def _plan(self) -> list[Cell]:
        spec = self.spec
        samples: list[Sample | None] = ([None] if spec.task in LANGUAGE_TASKS
                                        else generation_samples(spec.task, self.engine.tokenizer, spec.task_options))
        # Budget-less policies (full) first, then each budget across every policy that takes one.
        budgets = [None] + list(spec.budgets)
        return [Cell(policy, budget, variant, sample)
                for sample in samples for budget in budgets for variant in spec.variants
                for policy in spec.policies if budget in spec.budgets_for(policy)]

    def stored(self) -> list[dict]:
        """The cells of this plan already in the store, in plan order."""
        task = self.spec.task
        return [as_task(self.store.cells[c.key(task)], task) for c in self.cells if self._has(c.key(task))]

    def _has(self, key: str) -> bool:
        """Whether the store holds the cell as this sweep wants it (with its loss when measured)."""
        cell = self.store.cells.get(key)
        return cell is not None and (not self.spec.measure_loss or "attention_loss" in cell)

    def run(self, on_cell: Callable[[dict], None] | None = None,
            on_progress: Callable[[SweepProgress], None] | None = None) -> SweepOutcome:
        task = self.spec.task
        records, computed, reused = [], 0, 0
        spent, weight_done = 0.0, 0
        weight_left = sum(c.weight for c in self.cells if not self._has(c.key(task)))
        started = time.perf_counter()
        for index, cell in enumerate(self.cells):
            key = cell.key(task)
            if self._has(key):
                record = as_task(self.store.cells[key], task)
                records.append(record)
                reused += 1
                if on_cell:
                    on_cell(record)
                continue
            if self.cancel.cancelled:
                break
            if on_progress:
                eta = spent / weight_done * weight_left if weight_done else None
                on_progress(SweepProgress(index, len(self.cells), reused, eta, describe_cell(cell),
                                          time.perf_counter() - started))
            record = self._run_cell(cell)
            if record is None:  # cancelled part way: not stored, computed again next time
                break
            self.store.add(key, record)
            records.append(record)
            computed += 1
            spent += record["seconds"]
            weight_done += cell.weight
            weight_left -= cell.weight
            if on_cell:
                on_cell(record)
        cancelled = len(records) < len(self.cells)
        if on_progress:
            on_progress(SweepProgress(len(records), len(self.cells), reused, 0.0,
                                      "cancelled" if cancelled else "done", time.perf_counter() - started))
        return SweepOutcome(records, computed, reused, cancelled, self.store.path)

    # -- one cell ---------------------------------------------------------------------------------

    def cell_base(self, cell: Cell, policy: Policy) -> dict:
        """What every record of a cell says first: task, policy, budget, variant, model."""
        return {"task": self.spec.task, "policy": cell.policy, "budget": cell.budget, "variant": cell.variant,
                "policy_description": policy.describe(), "model": self.spec.model, "provenance": self.provenance}

    def _run_cell(self, cell: Cell) -> dict | None:
        policy = make_policy(cell.policy, cell.budget, self.spec.policy_options, cell.variant)
        base = self.cell_base(cell, policy)
        if cell.sample is None:
            return self._language_cell(policy, base)
        return self._generation_cell(cell.sample, policy, base)

    def _generation_cell(self, sample: Sample, policy: Policy, base: dict) -> dict | None:
        spec = self.spec
        settings = protocol_settings(spec.protocol, GenerationSettings(
            max_new_tokens=sample.max_new_tokens, chunk_size=spec.chunk_size, memory_sample_hz=0,
            measure_loss=spec.measure_loss, ignore_eos=spec.ignore_eos), sample.ids, sample.question_start)
        recorder = Recorder()
        context_peak, reused = 0, False
        with self._book(policy, sample.ids, settings, base, recorder) as book:
            if spec.protocol == QUESTION_AGNOSTIC and not spec.measure_loss:  # (the loss needs every key: no reuse)
                result, context_peak, reused = self._contexts.generate(
                    self.engine, json.dumps(CacheSpec.of(policy).record(), sort_keys=True, default=str), sample.ids,
                    policy, settings, recorder=recorder, cancel=self.cancel)
            else:
                result = self.engine.generate(sample.ids, policy, settings, recorder=recorder, cancel=self.cancel)
            book.finish(result)
        if result.stop_reason == "cancelled":
            return None
        return generation_record(sample, base, result, book.run_id, spec.protocol, spec.measure_loss, context_peak, reused)

    def _language_cell(self, policy: Policy, base: dict) -> dict | None:
        options = self.spec.language_options
        if self._text_ids is None:
            self._text_ids = text_ids(self.engine, options)
        recorder = Recorder()
        settings = GenerationSettings(max_new_tokens=0, chunk_size=self.spec.chunk_size, memory_sample_hz=0)
        with self._book(policy, self._text_ids, settings, base, recorder) as book:
            result = evaluate_language(self.engine, self._text_ids, policy, options, self.spec.chunk_size,
                                       cancel=self.cancel, recorder=recorder)
            book.finish(result.run)
        if result.cancelled:
            return None
        headline = result.perplexity if self.spec.task == "perplexity" else result.mean_kl
        return {**base, "subtask": None, "context_tokens": len(self._text_ids), "depth": None, "sample": 0,
                "score": headline, "perplexity": result.perplexity, "kl_mean": result.mean_kl,
                "kl_max": max(result.kl, default=float("nan")), "prefix_tokens": options.prefix_tokens,
                "stride": options.stride, "peak_cache_bytes": result.peak_cache_bytes,
                "seconds": round(result.seconds, 3), "run_id": book.run_id,
                "positions": result.positions,
                "true_logprobs": [round(v, CURVE_DECIMALS) for v in result.true_logprobs],
                "kl": [round(v, CURVE_DECIMALS) for v in result.kl]}

    # -- the run history --------------------------------------------------------------------------

    def _book(self, policy: Policy, ids: list[int], settings: GenerationSettings, base: dict,
              recorder: Recorder) -> RunBook:
        """A cell's row in the history, an ordinary run with its evaluation named in the settings. A
        history that fails to write is off for the rest of the sweep; the store still has every cell."""
        return RunBook(self.history, model=self.engine.loaded.identity, cache=CacheSpec.of(policy),
                       prompt=self.engine.tokenizer.decode(ids) if self.history is not None else "",
                       settings=settings.record() | {"evaluation": {k: base[k] for k in ("task", "budget", "variant")}
                                                     | {"store": str(self.store.path)}},
                       recorder=recorder, on_warning=self._history_failed, provenance=self.provenance)

    def _history_failed(self, message: str) -> None:
        self.history = None


def generation_record(sample: Sample, base: dict, result, run_id: int | None, protocol: str = DEFAULT_PROTOCOL,
                      measure_loss: bool = False, context_peak: int = 0, reused: bool = False) -> dict:
    """A generation cell's record: where the sample sits in the grid, how it was compressed, its scores,
    output and figures. `context_peak`, `reused`: a question-agnostic context restored from its
    compressed cache (core/evaluate/protocols.py)."""
    measured = {"attention_loss": result.attention_loss} if measure_loss else {}
    return {**base, "protocol": protocol, "subtask": sample.subtask, "context_tokens": sample.context_tokens,
            "depth": sample.extra.get("asked_depth"), "needle_depth": sample.depth, "sample": sample.sample,
            **sample.score(result.text), "output": result.text, "expected": sample.expected,
            "peak_cache_bytes": max(result.peak_cache_bytes, context_peak), **measured, "context_reused": reused,
            "seconds": round(result.prefill_seconds + result.decode_seconds, 3), "run_id": run_id}


def describe_cell(cell: Cell) -> str:
    budget = "" if cell.budget is None else f" @ {cell.budget}"
    variant = "".join(f" {k}={v}" for k, v in cell.variant.items())
    if cell.sample is None:
        return f"{cell.policy}{budget}{variant}"
    sample = cell.sample
    where = f"{sample.subtask} " if sample.subtask else ""
    depth = sample.extra.get("asked_depth")
    depth_text = f", depth {depth:g}" if depth is not None else ""
    return f"{cell.policy}{budget}{variant}: {where}{sample.context_tokens} tokens{depth_text}, sample {sample.sample}"


def store_task(task: str) -> str:
    """Perplexity and KL come from the same pass over the text: they share their cells."""
    return "language" if task in LANGUAGE_TASKS else task


def as_task(record: dict, task: str) -> dict:
    """A stored cell as a record of `task` (a language cell's headline is perplexity or mean KL)."""
    if task not in LANGUAGE_TASKS or record.get("task") == task:
        return record
    return {**record, "task": task, "score": record["perplexity"] if task == "perplexity" else record["kl_mean"]}
