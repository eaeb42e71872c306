"""The training loop of a fine-tune session: LoRA trained with the policy's cache in the loop.

One optimizer step takes `grad_accumulation` examples, each fed through the policy's cache by
`through_cache.example_loss` (or `micro_batch` of them at a time, packed into one forward per chunk
step by `micro_batch.micro_batch_loss`: the same losses and gradients, fewer passes), then clips
the gradient norm and steps AdamW. The learning rate rises linearly over `warmup_steps` and then stays. Validation runs before training, every
`eval_every` steps and at the end, on held-out examples, under the policy and under `full`
(what the adapter does with and without evictions). Checkpoints (adapter, optimizer moments, the
curves so far) are written atomically every `save_every` steps and at the end; `resume` goes on
from the newest one with the same data order, seeds and learning rate, so the curve continues.

Stop (the CancelToken) is checked before each chunk and inside the backward pass: the step in
progress is dropped and the last saved checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvstudio.core.io.atomic import check_writable_folder
from kvstudio.core.runtime.engine import CancelToken, Engine
from kvstudio.core.errors import KVStudioError
from kvstudio.core.recording.memory import MemorySampler, read_system_memory, reset_peak
from kvstudio.core.spec import create_policy
from kvstudio.core.policies.base import Policy
from kvstudio.core.train import lora
from kvstudio.core.train.data import Dataset, DataError
from kvstudio.core.train.micro_batch import micro_batch_loss
from kvstudio.core.train.log import MemoryReading, TrainingLog, TrainStep, Validation
from kvstudio.core.train.through_cache import GRAD_MODES, SavedTensorMeter, StepCancelled, cancel_in_backward, example_loss
from kvstudio.core.recording.snapshots import MemorySnapshotRecording


@dataclass
class FinetuneSettings:
    steps: int = 20
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    grad_accumulation: int = 1
    micro_batch: int = 1  # of a step's examples, fed together (micro_batch.py); the step's gradient is the same
    seed: int = 0
    chunk_size: int = 128
    grad_mode: str = "through"
    eval_every: int = 10  # 0: only before and after training
    save_every: int = 10  # 0: only at the end
    max_grad_norm: float = 1.0  # 0: no clipping
    lora: lora.LoraSettings = field(default_factory=lora.LoraSettings)
    memory_sample_hz: float = 20.0
    snapshot_step: int = 0  # record a memory snapshot of this step (1-based; 0: none)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.learning_rate > 0, f"--lr must be positive, got {self.learning_rate}"),
            (self.warmup_steps >= 0, f"--warmup must be 0 or more, got {self.warmup_steps}"),
            (self.grad_accumulation >= 1, f"--grad-accumulation must be at least 1, got {self.grad_accumulation}"),
            (self.micro_batch >= 1, f"--micro-batch must be at least 1, got {self.micro_batch}"),
            (self.micro_batch <= self.grad_accumulation,
             f"--micro-batch {self.micro_batch} is more than the {self.grad_accumulation} examples of one step: "
             f"raise --grad-accumulation to at least {self.micro_batch}, or lower --micro-batch"),
            (self.chunk_size >= 1, f"--chunk-size must be at least 1, got {self.chunk_size}"),
            (self.grad_mode in GRAD_MODES, f"--grad-mode must be one of {', '.join(GRAD_MODES)}, "
                                           f"got '{self.grad_mode}'"),
            (self.eval_every >= 0, f"--eval-every must be 0 (start and end only) or more, got {self.eval_every}"),
            (self.save_every >= 0, f"--save-every must be 0 (end only) or more, got {self.save_every}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be 0 (off) or more, got {self.max_grad_norm}"),
            (0 <= self.memory_sample_hz <= 1000, f"--memory-sample-hz must be in 0..1000, got {self.memory_sample_hz}"),
        ]
        for ok, message in checks:
            if not ok:
                raise KVStudioError(message)
        self.lora.validate()

    def as_dict(self) -> dict:
        data = asdict(self)
        data["lora"] = lora.settings_dict(self.lora)
        return data


@dataclass
class FinetuneResult:
    status: str  # finished | cancelled
    model: str
    policy: str
    policy_parameters: dict
    data: str
    settings: dict
    steps: list[TrainStep]
    val: list[Validation]
    adapter: str | None  # the newest saved checkpoint folder
    resumed_from_step: int = 0
    seconds: float = 0.0
    peak_bytes_source: str = "autograd_saved"  # or cuda_allocator

    def _val_loss(self, index: int, which: str) -> float | None:
        return getattr(self.val[index], which) if self.val else None

    @property
    def initial_val_loss_policy(self):
        return self._val_loss(0, "loss_policy")

    @property
    def final_val_loss_policy(self):
        return self._val_loss(-1, "loss_policy")

    @property
    def initial_val_loss_full(self):
        return self._val_loss(0, "loss_full")

    @property
    def final_val_loss_full(self):
        return self._val_loss(-1, "loss_full")

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("initial_val_loss_policy", "final_val_loss_policy", "initial_val_loss_full",
                     "final_val_loss_full"):
            data[name] = getattr(self, name)
        return data


def learning_rate(settings: FinetuneSettings, step: int) -> float:
    """Step is 0-based: linear warm-up over `warmup_steps`, then constant."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    return settings.learning_rate


def example_order(n_examples: int, seed: int, index: int) -> int:
    """Which training example the index-th draw takes: a fresh seeded shuffle every epoch, so a
    resumed session draws what the uninterrupted one would have."""
    epoch, within = divmod(index, n_examples)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[within]


class FinetuneSession:
    """Runs one session on an Engine's model. Not thread-safe: the caller's thread runs it."""

    def __init__(self, engine: Engine, policy: Policy, dataset: Dataset, settings: FinetuneSettings,
                 out_dir: str | Path, log: TrainingLog | None = None, cancel: CancelToken | None = None,
                 resume: bool = False, snapshot_path: str | Path | None = None):
        settings.validate()
        self.engine, self.loaded = engine, engine.loaded
        self.policy, self.dataset, self.settings = policy, dataset, settings
        self.out_dir = Path(out_dir).expanduser()
        self.log = log or TrainingLog()
        self.cancel = cancel or CancelToken()
        self.resume = resume
        self.snapshot_path = snapshot_path
        self.snapshot = None  # the recorded snapshot dict, when one was asked for
        self.full = create_policy("full")
        self.steps: list[TrainStep] = []
        self.val: list[Validation] = []
        self.last_checkpoint: lora.Checkpoint | None = None
        self.meter: SavedTensorMeter | None = None
        self._check_inputs()

    def _check_inputs(self) -> None:
        # The output folder may not exist yet (it is made at the first save); its parent must.
        check_writable_folder(self.out_dir / "x" if self.out_dir.exists() else self.out_dir, DataError)
        if not self.dataset.train:
            raise DataError("no training examples")
        longest, chunk = self.dataset.longest, self.settings.chunk_size
        if longest <= chunk and self.policy.name != "full":
            raise DataError(f"every training sequence ({longest} tokens at most) fits in one chunk of {chunk}: "
                            f"the policy would never evict during training; lower --chunk-size below {longest} "
                            "or raise --seq-len")

    # -- the session ------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        started = time.perf_counter()
        try:
            start_step = self._prepare()
        except BaseException:
            lora.detach(self.loaded)
            raise
        status = "finished"
        interval = 1 / self.settings.memory_sample_hz if self.settings.memory_sample_hz else 0
        try:
            with MemorySampler(interval, self._read_memory):
                try:
                    self._loop(start_step)
                except StepCancelled:  # from a step or a validation: what was saved stays as it was
                    status = "cancelled"
        except (torch.OutOfMemoryError, MemoryError) as error:
            raise KVStudioError(f"out of memory in fine-tune step {self.log.step + 1}: lower --seq-len, "
                                "--chunk-size or the budget, or use --grad-mode truncated; "
                                f"{self.kept_text()}") from error
        finally:
            self._zero_grad()
            for handle in self._hooks:
                handle.remove()
            # A session never leaves its adapter in the model: generation goes on with the base
            # model until an adapter is applied from its folder (kvstudio run --adapter, the studio).
            lora.detach(self.loaded)
            self.log.enter("done")
        if status == "cancelled":
            self.log.status(f"stopped during step {self.log.step + 1}; {self.kept_text()}")
        return FinetuneResult(
            status=status, model=self.loaded.name, policy=self.policy.describe(),
            policy_parameters=self.policy.config.as_dict(), data=self.dataset.description,
            settings=self.settings.as_dict(), steps=list(self.steps), val=list(self.val),
            adapter=str(self.last_checkpoint.folder) if self.last_checkpoint else None,
            resumed_from_step=start_step, seconds=time.perf_counter() - started,
            peak_bytes_source="cuda_allocator" if self.loaded.device.type == "cuda" else "autograd_saved")

    def _loop(self, start_step: int) -> None:
        settings = self.settings
        if start_step == 0 or not self.val:
            self._validate(start_step)
        for step in range(start_step, settings.steps):
            if self.cancel.cancelled:
                raise StepCancelled()
            self._train_step(step)
            done = step + 1
            if settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
                self._validate(done)
            if settings.save_every and done % settings.save_every == 0:
                self._save(done)
        if not self.val or self.val[-1].step != settings.steps:
            self._validate(settings.steps)
        if self.last_checkpoint is None or self.last_checkpoint.step != settings.steps:
            self._save(settings.steps)

    def kept_text(self) -> str:
        """What a stopped session leaves behind, in words (for its messages and its history row)."""
        if self.last_checkpoint is None:
            return "no adapter was saved yet"
        return f"the adapter saved at step {self.last_checkpoint.step} is intact in {self.last_checkpoint.folder}"

    def _prepare(self) -> int:
        """Attach a fresh adapter, or the newest checkpoint when resuming; returns the first step."""
        self._resumed_steps: list = []
        self._hooks: list = []
        start_step, optimizer_tensors = 0, {}
        if self.resume:
            checkpoint = lora.resolve(self.out_dir)
            state, optimizer_tensors = lora.read_state(checkpoint)
            peft_model, _, _ = lora.load_adapter(self.loaded, checkpoint, trainable=True)
            start_step = int(state["step"])
            if start_step >= self.settings.steps:
                lora.detach(self.loaded)
                raise KVStudioError(f"the session in {self.out_dir} already ran {start_step} steps: give --steps "
                                    f"above {start_step} to go on")
            self.steps = [TrainStep(**s) for s in state.get("steps", [])]
            self.val = [Validation(**v) for v in state.get("val", [])]
            self._resumed_steps = list(self.steps)
            self.last_checkpoint = lora.Checkpoint(start_step, checkpoint)
            self.log.status(f"resumed from step {start_step} ({checkpoint})")
            for event in self.steps + self.val:
                self.log.record(event)
        else:
            torch.manual_seed(self.settings.seed)  # the same LoRA initialisation for the same seed
            peft_model = lora.attach(self.loaded, self.settings.lora)
        self.peft_model = peft_model
        self.parameters = [(name, p) for name, p in self.loaded.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([p for _, p in self.parameters], lr=self.settings.learning_rate,
                                           weight_decay=0.0)
        self._load_optimizer(optimizer_tensors)
        self.meter = SavedTensorMeter(self.loaded.model.parameters())
        self._hooks = cancel_in_backward([p for _, p in self.parameters], self.cancel)
        self.log.step = start_step
        return start_step

    def _train_step(self, step: int) -> None:
        settings, log = self.settings, self.log
        model = self.loaded.model
        model.train()
        lr = learning_rate(settings, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(settings.seed * 7919 + step)  # LoRA dropout draws the same on resume
        reset_peak(self.loaded.device)
        self.meter.peak = 0
        recording = self._snapshot_recording(step + 1)
        started = time.perf_counter()
        loss = forward_s = backward_s = 0.0
        tokens = evictions = 0
        with recording:
            examples = [self.dataset.train[example_order(len(self.dataset.train), settings.seed,
                                                         step * settings.grad_accumulation + k)]
                        for k in range(settings.grad_accumulation)]
            for first in range(0, len(examples), settings.micro_batch):
                group = examples[first:first + settings.micro_batch]
                try:
                    parts, forward, backward = self._losses(group)
                except StepCancelled:
                    self._zero_grad()
                    raise
                loss += sum(part.loss for part in parts) / settings.grad_accumulation
                tokens += sum(part.tokens for part in parts)
                evictions += sum(part.evictions for part in parts)
                forward_s += forward
                backward_s += backward
            log.enter("optimizer")
            optimizer_started = time.perf_counter()
            grad_norm = self._clip()
            self.optimizer.step()
            self._zero_grad()
            optimizer_s = time.perf_counter() - optimizer_started
        if not isinstance(recording, contextlib.nullcontext):
            recording.save(self.snapshot_path)
            self.snapshot = recording.snapshot
        seconds = time.perf_counter() - started
        if self.loaded.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.loaded.device)
        else:
            peak = self.meter.peak
        log.step = step + 1
        record = TrainStep(step + 1, loss, grad_norm, lr, seconds, int(peak), tokens,
                           tokens / seconds if seconds > 0 else 0.0, evictions, forward_s, backward_s, optimizer_s)
        self.steps.append(record)
        log.record(record)

    def _losses(self, examples: list) -> tuple[list, float, float]:
        """The examples' losses, their gradients accumulated (scaled to the step's mean): one at a time,
        or as one micro-batch. (losses, forward seconds, backward seconds)."""
        settings = self.settings
        scale = 1 / settings.grad_accumulation
        if len(examples) == 1:
            part = example_loss(self.engine, examples[0], self.policy, settings.chunk_size, settings.grad_mode,
                                backward=True, scale=scale, cancel=self.cancel, meter=self.meter,
                                on_phase=self.log.enter)
            return [part], part.forward_seconds, part.backward_seconds
        batch = micro_batch_loss(self.engine, examples, self.policy, settings.chunk_size, settings.grad_mode,
                                 backward=True, scale=scale, cancel=self.cancel, meter=self.meter,
                                 on_phase=self.log.enter)
        return batch.examples, batch.forward_seconds, batch.backward_seconds

    def _snapshot_recording(self, step: int):
        if self.snapshot_path and step == self.settings.snapshot_step:
            self.log.status(f"recording a memory snapshot of step {step}")
            return MemorySnapshotRecording(self.loaded.device)
        return contextlib.nullcontext()

    def _clip(self) -> float:
        params = [p for _, p in self.parameters if p.grad is not None]
        if not params:
            return 0.0
        limit = self.settings.max_grad_norm or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    def _zero_grad(self) -> None:
        if hasattr(self, "optimizer"):
            self.optimizer.zero_grad(set_to_none=True)

    # -- validation -------------------------------------------------------------------------------

    def _validate(self, step: int) -> Validation:
        self.log.enter("validation")
        self.loaded.model.eval()
        losses = {}
        examples = self.dataset.validation
        for name, policy in (("policy", self.policy), ("full", self.full)):
            # Said as it starts: a validation feeds every example twice, chunk by chunk, and takes a while.
            self.log.status(f"validating at step {step}: {len(examples)} examples of up to "
                            f"{max((len(e.ids) for e in examples), default=0)} tokens under "
                            f"{'the policy' if name == 'policy' else 'the full cache'}, in chunks of "
                            f"{self.settings.chunk_size}…")
            total = weight = 0.0
            size = self.settings.micro_batch  # examples fed together, as in training
            for first in range(0, len(examples), size):
                if self.cancel.cancelled:
                    raise StepCancelled()
                for part in self._validation_losses(examples[first:first + size], policy):
                    total += part.loss * part.targets
                    weight += part.targets
            losses[name] = total / weight
        record = Validation(step, losses["policy"], losses["full"])
        self.val.append(record)
        self.log.record(record)
        return record

    def _validation_losses(self, examples: list, policy) -> list:
        """The examples' losses without gradients: one at a time, or as one micro-batch (the same losses,
        to the packed products' rounding)."""
        chunk = self.settings.chunk_size
        if len(examples) == 1:
            return [example_loss(self.engine, examples[0], policy, chunk, backward=False, cancel=self.cancel)]
        return micro_batch_loss(self.engine, examples, policy, chunk, backward=False, cancel=self.cancel).examples

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        self.log.enter("saving")
        info = {"model": lora.fingerprint(self.loaded), "policy": self.policy.name,
                "policy_parameters": self.policy.config.as_dict(), "step": step, "data": self.dataset.description,
                "settings": self.settings.as_dict()}
        state = {"step": step, "steps": [asdict(s) for s in self.steps], "val": [asdict(v) for v in self.val]}
        self.last_checkpoint = lora.save_checkpoint(self.peft_model, self.out_dir, step, info, state,
                                                    self._optimizer_tensors())
        self.log.status(f"saved the adapter at step {step}: {self.last_checkpoint.folder}")

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, parameter in self.parameters:
            for key, value in self.optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}::{key}"] = value
        return tensors

    def _load_optimizer(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        device = self.loaded.device
        for name, parameter in self.parameters:
            state = {key.split("::", 1)[1]: value for key, value in tensors.items() if key.split("::", 1)[0] == name}
            if state:
                # AdamW keeps `step` on the CPU unless capturable; the moments live with the parameter.
                self.optimizer.state[parameter] = {k: (v if k == "step" else v.to(device)) for k, v in state.items()}

    def _read_memory(self) -> None:
        system = read_system_memory(self.loaded.device)
        self.log.record(MemoryReading(self.log.now(), self.log.phase, system.process_bytes, system.cuda_allocated,
                                      self.meter.current if self.meter else 0))

