"""Training: encoders and a GSSF metric head on a prepared dataset, resumable, with validation every epoch.

Each epoch: shuffled pairs (a generator seeded by seed and epoch, so a resumed run sees the same batches),
hinge triplet over all negatives during warm-up and hardest negatives after (or InfoNCE), optional
structure-aware distillation, AdamW with gradient clipping, a step decay of the learning rate; then
validation on ``val_split`` with the evaluation functions (rSum, or MAP@R for label-based data) and an
atomic checkpoint. The best epoch is kept. Resuming from a checkpoint folder continues with the same config
and dataset and ends with the same result as an uninterrupted run (on CPU).

Epochs are numbered from 1 everywhere (epoch 1 is the first): the ``epoch`` given to callbacks and progress,
:attr:`FitResult.best_epoch`, the checkpoint's ``best_epoch``, and the step of per-epoch metrics in MLflow.

A validation split must be able to tell epochs apart: one that cannot rank (one class, one image: see
:mod:`gssf_cli.data.rankable`) is refused up front, and a run whose validation metric sat at its best possible
value at every epoch (so the "best epoch" would just be the first) stops with an error
(:func:`cannot_choose_best`). The per-epoch validation values live in the checkpoint state, so a resumed run
judges its whole history.

Why a class and a function: :class:`Trainer` builds everything and runs every check up front (dataset split,
teacher file, block size, resume compatibility), so a caller that tracks the run — the ``train`` stage — can
refuse bad input before it opens an MLflow run; :func:`fit` is the one-call form (Ray trials, scripts).
Nothing here knows about MLflow or the terminal: progress and per-epoch results leave through callbacks
(:data:`EpochCallback`) and a :class:`Progress` object (the CLI's terminal bars and lines; none in Ray trials).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gssf_cli.core import limits, stop
from gssf_cli.core import metrics as registry
from gssf_cli.core.config import default_of, from_dict, to_dict
from gssf_cli.core.cores import free_cores
from gssf_cli.core.errors import DivergedError, UserInputError
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.data.dataset import Dataset, Split
from gssf_cli.data.rankable import split_problem
from gssf_cli.evaluation.evaluate import evaluate_model, load_embeddings
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.distributed import Shard
from gssf_cli.modeling.model import (
    EmbeddedDataset,
    RetrievalModel,
    build_model,
    build_objective,
    load_frozen_towers,
    resolve_config,
    resolve_values,
)
from gssf_cli.training.batch_step import BatchStep

EpochCallback = Callable[[int, dict[str, float], Path], None]
"""``(epoch, metrics, last_checkpoint_folder)`` after each epoch's checkpoint is on disk; ``epoch`` counts from
1 (the first epoch is 1, the last ``config.epochs``); metrics include ``best_<validation metric>``."""


@dataclass(frozen=True)
class EpochSummary:
    """One finished epoch, for a person to read: ``epoch`` of ``epochs`` (counted from 1), the metrics the
    :data:`EpochCallback` gets (``loss``, ``lr``, ``val_<metric>``..., ``best_<metric>``), the metric that picks the
    best epoch (``validation_metric``; when the dataset has no validation split the loss picks it and
    ``metrics`` has no ``val_`` entries), whether this epoch is the new best, and its wall time in seconds
    (training, validation and checkpoint)."""

    epoch: int
    epochs: int
    metrics: dict[str, float]
    validation_metric: str
    improved: bool
    seconds: float


class Progress(Protocol):
    """Where the trainer reports what it is doing (in the CLI: bars and one kept line per epoch on the terminal;
    nothing in Ray trials). Why a protocol: the library must not know about the terminal."""

    def epoch(self, label: str, batches: int) -> AbstractContextManager[Callable[[float, float], None]]:
        """A context for one epoch's training; the function it yields is called after every batch with
        ``(mean loss so far, samples per second)``."""
        ...

    def validation(self, label: str, steps: int) -> AbstractContextManager[Callable[[str], None]]:
        """A context for one validation (encoding the validation split, then scoring it) of ``steps`` steps; the
        function it yields is called as each step starts, with what the step does."""
        ...

    def epoch_done(self, summary: EpochSummary) -> None:
        """Called once per epoch, after its checkpoint is written and before the :data:`EpochCallback`."""
        ...


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` ends with: ``best_epoch`` counts from 1 (the epoch whose weights are in ``best/``);
    ``epochs_run`` is how many epochs this call ran (fewer than ``config.epochs`` when it resumed)."""

    out_dir: Path
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    validation_metric: str
    parameters: dict[str, int]
    seconds: float
    best_state: dict[str, Any] = field(repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def budget_steps(config: TrainConfig, manifest: dict[str, Any]) -> int:
    """The optimizer steps of ``config``'s budget on the dataset of ``manifest``: epochs × batches of train pairs."""
    counts = manifest["splits"]["train"]
    pairs = counts["captions"] if manifest["task"] == "cross_modal" else counts["items"]
    return limits.optimizer_steps(config.epochs, pairs, config.batch_size)


def resolve_lr(config: TrainConfig, manifest: dict[str, Any], resume_from: Path | None = None) -> TrainConfig:
    """``config`` with the learning rate it trains at: ``lr`` when given; left unset (auto), the rate a resumed run
    (``resume_from``, its checkpoint folder) started with, never recomputed (a later rule must not change a run
    midway), else :func:`~gssf_cli.core.limits.auto_lr` of the budget's optimizer steps (:func:`budget_steps`)."""
    if config.lr is not None:
        return config
    lr = saved_lr(resume_from) if resume_from is not None else None
    if lr is None:
        paired = manifest["task"] == "cross_modal"
        lr = limits.auto_lr(budget_steps(config, manifest), paired=paired, head_only=config.head_only())
    return replace(config, lr=lr)


def resolve_lr_values(values: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """Saved config ``values`` with the learning rate :func:`resolve_lr` gives them (a run's ``config.json`` is
    written before the trainer resolves it); values that no longer make a config are returned as they are."""
    if values.get("lr") is not None:
        return values
    try:
        return to_dict(resolve_lr(from_dict(TrainConfig, dict(values), "train"), manifest))
    except UserInputError:
        return values


def saved_lr(resume_from: Path) -> float | None:
    """The learning rate a run resumed from the checkpoint folder ``resume_from`` trained at: its checkpoint's, else
    (killed before its first) its ``config.json``'s; None when neither says (a damaged one is refused later)."""
    with contextlib.suppress(UserInputError, OSError):
        started = (
            ckpt.saved_state(resume_from) if ckpt.recover(resume_from) else ckpt.read_run_config(resume_from.parent)
        )
        config = started.get("config") if isinstance(started, dict) else None
        lr = config.get("lr") if isinstance(config, dict) else None
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            return float(lr)
    return None


def learning_rate(config: TrainConfig) -> float:
    """``config.lr``, which :func:`resolve_lr` has set by the time a trainer uses it; a config built by hand and
    never resolved (a benchmark's optimizer) trains at :data:`~gssf_cli.core.limits.AUTO_LR`."""
    return config.lr if config.lr is not None else limits.AUTO_LR


def lr_at(config: TrainConfig, epoch: int, done: float = 0.0) -> float:
    """The learning rate at fraction ``done`` ∈ [0, 1) of epoch ``epoch`` (counted from 1), by ``lr_schedule``.

    Every schedule is defined by the budget (``epochs``), so a longer run decays later instead of spending most of
    its epochs at a rate fixed for a 30-epoch recipe: ``cosine`` (default) follows half a cosine from ``lr`` at the
    first step to 0 at the end of the last epoch, updated every batch; ``step`` is VSE's recipe, ``lr`` for epochs
    1 .. ``lr_decay_epoch`` (default half the epochs) and ``lr * lr_decay`` after; ``constant`` keeps ``lr``.
    """
    lr = learning_rate(config)
    if config.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1 + done) / config.epochs))
    if config.lr_schedule == "step":
        return lr * (config.lr_decay if epoch > step_decay_epoch(config) else 1.0)
    return lr


def step_decay_epoch(config: TrainConfig) -> int:
    """The last epoch at the full rate under the ``step`` schedule: ``lr_decay_epoch``, else half the budget."""
    return config.lr_decay_epoch if config.lr_decay_epoch is not None else config.epochs // 2


def uses_hardest_negatives(config: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` (counted from 1) mines the hardest negatives: after ``warmup_epochs`` epochs over all."""
    return epoch > config.warmup_epochs


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``--amp`` on ``device`` (None: full precision): bfloat16 where the device has it (CPUs,
    Ampere and later GPUs: float32's range, so no loss scaling), else float16 with a gradient scaler."""
    if not config.amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Trainer:
    """A model, its objective and optimizer, ready to train (or resume) per ``config`` on ``dataset``.

    As one worker of a data-parallel group (``shard``, in a process group set up by Ray Train or ``torchrun``) it
    trains on its rows of every global batch (:class:`BatchStep` under DistributedDataParallel); only the primary
    worker validates, writes checkpoints and calls back. ``device`` overrides ``config.device`` (a worker's own GPU).
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        *,
        resume_from: Path | None = None,
        progress: Progress | None = None,
        shard: Shard | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.progress = progress
        self.shard = shard or Shard()
        self.device = device or resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        elif shard is None and self.device.type == "cpu":  # a Ray Train worker has its own (worker_threads)
            torch.set_num_threads(free_cores())  # a core that another process holds would stall every GEMM
        if not dataset.has_split("train"):
            raise UserInputError(f"{config.data}: no train split to train on")
        # What the dataset (and a frozen run) implies, written into the config that the checkpoints hold: the tower
        # shape, a head-only run's embedding size, a frozen run's tower settings (and checks of all of them).
        config = resolve_config(config, dataset.manifest, dataset.digest)
        # An unset --lr becomes a number here, once (a resumed run keeps its own): what checkpoints and MLflow record.
        self.lr_auto = config.lr is None
        config = resolve_lr(config, dataset.manifest, resume_from)
        self.config, self.dataset = config, dataset
        check_validation_split(config, dataset)
        self.teacher = load_teacher(config, dataset)
        torch.manual_seed(config.seed)
        self.model = build_model(dataset, config).to(self.device)
        if config.encoder == "frozen":
            # Only the head (and adapters) learn: the towers' parameters have requires_grad off, so they get no
            # gradient and AdamW skips them. Each split is embedded by the frozen towers once, not every batch.
            load_frozen_towers(self.model, config)
            self.dataset = EmbeddedDataset(dataset, self.model, self.device)
        self.objective = build_objective(config).to(self.device)
        self.trainable = torch.nn.ModuleDict({"model": self.model, "objective": self.objective})
        self.optimizer = make_optimizer(self.model, self.objective, config)
        self.amp = amp_dtype(config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.step = self._batch_step()
        self.metric_name = registry.validation_metric(dataset.task)
        # Completed epochs (the next one is epochs_done + 1) and the best so far (best_epoch 0: none yet).
        self.epochs_done, self.best_value, self.best_epoch = 0, -math.inf, 0
        self.val_history: list[float] = []  # the validation metric at every epoch so far (in the checkpoint state)
        self.resumed_metrics: dict[str, float] = {}  # what the resumed checkpoint's epoch reported (on_epoch_end)
        if resume_from is not None:
            # A run killed before its first checkpoint has only the config it started with: it starts again.
            started = None if ckpt.recover(resume_from) else ckpt.read_run_config(resume_from.parent)
            if started is not None:
                values = resolve_values(started.get("config", {}), dataset.manifest)
                started = {**started, "config": resolve_lr_values(values, dataset.manifest)}
                check_resumable(started, config, dataset, str(resume_from.parent.name))
            else:
                self.load_checkpoint(resume_from)

    def _batch_step(self) -> torch.nn.Module:
        step = BatchStep(self.model, self.objective, self.shard, self.amp, self.config.distill_use_metric)
        if self.shard.world == 1 or self.optimizer is None:
            return step
        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(step, device_ids=ids)

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from the checkpoint ``folder`` (a run's ``checkpoint/``): weights, optimizer, random state,
        epochs done and the best so far."""
        saved = ckpt.load(folder)
        ckpt.check_state(saved.state, folder / ckpt.STATE)
        check_resumable(saved.state, self.config, self.dataset, str(folder.parent.name))
        self.trainable.load_state_dict(saved.model)
        if saved.optimizer is not None and self.optimizer is not None:
            load_optimizer_state(self.optimizer, saved.optimizer)
        ckpt.restore_rng(saved.rng)
        self.epochs_done = saved.state["epochs_done"]
        self.best_value, self.best_epoch = saved.state["best_value"], saved.state["best_epoch"]
        self.val_history = [float(v) for v in saved.state.get("val_history", [])]
        last = {k: float(v) for k, v in saved.state.get("last_metrics", {}).items()}
        self.resumed_metrics = {**last, f"best_{self.metric_name}": float(self.best_value)} if last else {}

    def fit(self, out_dir: Path, on_epoch_end: EpochCallback | None = None) -> FitResult:
        """Train the remaining epochs, writing ``out_dir/best`` and ``out_dir/checkpoint`` every epoch (and, first,
        ``out_dir/config.json``: the config and dataset, so that a kill before the first checkpoint can resume)."""
        config = self.config
        started = time.perf_counter()
        primary = self.shard.primary
        if primary:
            ckpt.write_run_config(out_dir, to_dict(config), self.dataset.digest)
            for name in (ckpt.BEST, ckpt.LAST):
                ckpt.recover(out_dir / name)  # and the leftovers of saves a kill interrupted go
        first = self.epochs_done + 1
        for epoch in range(first, config.epochs + 1):
            epoch_started = time.perf_counter()
            stats = self._train_epoch(epoch)
            # Every worker validates (the same split, the same weights), so none waits in the next epoch's first
            # collective while another validates: the group's timeout never has to cover a validation.
            val = self._validate()
            if not primary:
                self.epochs_done = epoch
                continue
            history = {**stats, **{f"val_{k}": v for k, v in val.items()}}
            value = val.get(self.metric_name, -stats["loss"])
            if self.metric_name in val:
                self.val_history.append(value)
            improved = value > self.best_value
            if improved:
                self.best_value, self.best_epoch = value, epoch
            state = {
                **ckpt.epoch_fields(epoch),
                "best_value": self.best_value,
                "best_epoch": self.best_epoch,
                "config": to_dict(config),
                "dataset_sha256": self.dataset.digest,
                "task": self.dataset.task,
                "last_metrics": history,
                "val_history": list(self.val_history),
            }
            if improved:
                ckpt.save(out_dir / ckpt.BEST, self.model, state)
            ckpt.save(out_dir / ckpt.LAST, self.trainable, state, self.optimizer)
            self.epochs_done = epoch
            reported = {**history, f"best_{self.metric_name}": self.best_value}
            if self.progress is not None:
                seconds = time.perf_counter() - epoch_started
                summary = EpochSummary(epoch, config.epochs, reported, self.metric_name, improved, seconds)
                self.progress.epoch_done(summary)
            if on_epoch_end is not None:
                on_epoch_end(epoch, reported, out_dir / ckpt.LAST)
            if self.metric_name in val:
                self._check_can_choose_best(val)
        return self.result(out_dir, config.epochs - first + 1, time.perf_counter() - started)

    def result(self, out_dir: Path, epochs_run: int, seconds: float) -> FitResult:
        """What a finished run in ``out_dir`` ends with (its best checkpoint's state); on a worker that is not the
        primary, which writes nothing, an empty result."""
        best_state = ckpt.saved_state(out_dir / ckpt.BEST) if self.shard.primary else {"last_metrics": {}}
        return FitResult(
            out_dir=out_dir,
            best_epoch=self.best_epoch,
            epochs_run=epochs_run,
            metrics={k: float(v) for k, v in best_state["last_metrics"].items()},
            validation_metric=self.metric_name,
            parameters=self.model.parameter_counts(),
            seconds=round(seconds, 2),
            best_state=best_state,
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """Train epoch number ``epoch`` (counted from 1); its loss, lr and throughput."""
        config, model, shard = self.config, self.model, self.shard
        split = self.dataset.split("train")
        # Seeded by the 0-based index, as before epochs were numbered from 1: the same batches as older versions.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch - 1)
        batches = split.pair_batches(config.batch_size, generator)
        first_lr = lr_at(config, epoch)
        hardest = uses_hardest_negatives(config, epoch)
        vocab_size = len(self.dataset.vocab) if self.dataset.vocab is not None else None
        model.train()
        total_loss, total_struct, seen, started = 0.0, 0.0, 0, time.perf_counter()
        with self._epoch_progress(f"epoch {epoch}/{config.epochs}", len(batches)) as advance:
            for index, pairs in enumerate(batches):
                stop.raise_if_requested()
                self._set_lr(lr_at(config, epoch, index / len(batches)))
                rows = shard.rows(len(pairs))
                batch = split.training_batch(pairs, generator, rows)
                teachers = None
                if config.distill_weight > 0:
                    local = teacher_features(pairs[rows], batch, split, self.teacher, vocab_size)
                    teachers = (self._to_device(local[0]), self._to_device(local[1]))
                lengths = None if batch.lengths is None else self._to_device(batch.lengths)
                images, texts, ids = (self._to_device(t) for t in (batch.images, batch.texts, batch.ids))
                parts = self.step(images, texts, lengths, ids, hardest, teachers)
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(parts["loss"]).backward()
                    if config.grad_clip > 0:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                loss = float(parts["loss"].detach())
                if not math.isfinite(loss):
                    raise DivergedError(
                        f"train diverged at epoch {epoch} (batch {index + 1} of {len(batches)}): the loss is {loss}; "
                        f"lower --lr (the learning rate there was {lr_at(config, epoch, index / len(batches)):.3g})"
                    )
                total_loss += loss * len(pairs)
                total_struct += float(parts["struct"]) * len(pairs)
                seen += len(pairs)
                advance(total_loss / seen, seen / max(time.perf_counter() - started, 1e-9))
        stats = {
            "loss": total_loss / seen,
            "lr": first_lr,
            "samples_per_s": seen / max(time.perf_counter() - started, 1e-9),
        }
        distillation = getattr(self.objective, "distillation", None)
        if distillation is not None:
            stats |= {
                "distill_struct": total_struct / seen,
                "distill_lambda": distillation.lam,
                "distill_tau": distillation.tau,
            }
        return stats

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device: through pinned memory, without waiting, to a GPU."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _set_lr(self, lr: float) -> None:
        """Every group at ``lr`` times its own scale (:data:`OBJECTIVE_LR_SCALE` for the objective's scalars)."""
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _epoch_progress(self, label: str, batches: int) -> AbstractContextManager[Callable[[float, float], None]]:
        if self.progress is None:
            return _silent()
        return self.progress.epoch(label, batches)

    def _check_can_choose_best(self, val: dict[str, float]) -> None:
        best = registry.best_possible(self.metric_name, val)
        if cannot_choose_best(self.val_history, best):
            split = self.config.val_split
            raise UserInputError(
                f"{self.config.data} ({split} split): {self.metric_name} was {self.val_history[0]:g}, its best "
                f"possible value, at all {len(self.val_history)} epochs so far, so this split cannot choose a best "
                f"epoch; validate on a larger or harder split with --val-split, or prepare a bigger {split} split"
            )

    def _validate(self) -> dict[str, float]:
        """The validation metrics of the current weights on ``val_split`` (none when the dataset lacks it)."""
        split = self.config.val_split
        if not self.dataset.has_split(split):
            return {}
        try:
            if self.progress is None:
                metrics = evaluate_model(self.model, self.dataset, split, self.device)
            else:
                with self.progress.validation(f"validate on {split}", VALIDATION_STEPS) as step:
                    metrics = evaluate_model(self.model, self.dataset, split, self.device, step=step)
        except DivergedError as exc:
            epoch = self.epochs_done + 1
            raise DivergedError(
                f"train diverged by epoch {epoch}: {exc.detail}; lower --lr (the learning rate was {lr_at(self.config, epoch):.3g})"
            ) from None
        return {k: float(v) for k, v in metrics.items() if isinstance(v, float)}


VALIDATION_STEPS = 2
"""What a validation reports to :meth:`Progress.validation`: encoding the split, then scoring it."""


def fit(
    config: TrainConfig,
    dataset: Dataset,
    out_dir: Path,
    *,
    resume_from: Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Train per ``config`` into ``out_dir`` (continuing from the checkpoint folder ``resume_from`` if given)."""
    return Trainer(config, dataset, resume_from=resume_from, progress=progress).fit(out_dir, on_epoch_end)


@contextlib.contextmanager
def _silent() -> Iterator[Callable[[float, float], None]]:
    yield lambda loss, rate: None


def check_validation_split(config: TrainConfig, dataset: Dataset) -> None:
    """Refuse a validation split that cannot rank (an older dataset folder may have one)."""
    if not dataset.has_split(config.val_split):
        return
    problem = split_problem(dataset.folder, dataset.manifest, config.val_split)
    if problem is not None:
        raise UserInputError(
            f"{config.data}: the {config.val_split} split {problem}, so it cannot choose a best epoch; "
            "validate on another split with --val-split, or prepare the dataset again"
        )


def cannot_choose_best(history: Sequence[float], best_possible: float | None) -> bool:
    """True when the validation metric was the same at every epoch (at least two) and that value is the
    metric's best possible: every epoch ties at perfect, so "best" would just be the first. A constant but
    imperfect value is not refused (tiny splits can tie by chance)."""
    if best_possible is None or len(history) < 2:
        return False
    first = history[0]
    return all(_same(v, first) for v in history) and _same(first, best_possible)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def make_optimizer(
    model: RetrievalModel, objective: torch.nn.Module, config: TrainConfig, *, fused: bool = True
) -> torch.optim.Optimizer | None:
    """AdamW; weight decay on the metric head only (keeps W from winning the fixed margin by growing). None when
    nothing learns (a cosine head over identity towers: the baseline a head-only comparison needs as a run).

    ``fused`` picks torch's one-kernel AdamW over its per-tensor loop: the same update up to float rounding
    (~1e-8 after several steps), and at the default sizes (13 M parameters) the optimizer step drops from
    ~40 ms to ~9 ms on a 2-core CPU (``benchmarks/bench_train_profile.py``). ``fused=False`` is the reference.
    """
    towers = config.head_rate() if config.head_only() else 1.0  # head-only: the towers are adapters
    groups = [
        {"params": [p for p in model.encoder.parameters() if p.requires_grad], "weight_decay": 0.0, "lr_scale": towers},
        {
            "params": list(model.similarity.parameters()),
            "weight_decay": config.weight_decay,
            "lr_scale": config.head_rate(),
        },
        {"params": list(objective.parameters()), "weight_decay": 0.0, "lr_scale": OBJECTIVE_LR_SCALE},
    ]
    learned = [g for g in groups if g["params"]]
    return torch.optim.AdamW(learned, lr=learning_rate(config), fused=fused) if learned else None


OBJECTIVE_LR_SCALE = 20.0
"""The objective's own scalars (distillation's λ and τ₂, a learnable InfoNCE temperature) learn at this multiple of
the schedule's rate. Why: Adam moves a parameter by about the learning rate per step whatever its gradient, so at
5e-4 λ's logit would need ~3,400 steps to go from λ = 0.5 to 0.85 — more than a 20-epoch run of a 2,000-pair
dataset has; at 20× it gets there in ~170."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer ``state`` but keep ``optimizer``'s kernel choice (``fused``, ``foreach``).

    ``load_state_dict`` takes every group setting from the checkpoint, so a checkpoint written before AdamW was
    fused would switch a resumed run back to the slow per-tensor loop; the kernel changes rounding, not the update.
    The choice goes into the groups before loading, because loading places each ``step`` count by it (a fused
    kernel wants it on the parameter's device). A different number of groups is left for ``load_state_dict`` to
    refuse.
    """
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    groups = [{**saved, **kernel} for saved, kernel in zip(state["param_groups"], kernels, strict=False)]
    optimizer.load_state_dict({**state, "param_groups": groups})


PLACEMENT = ("workers", "address", "device", "threads", "max_failures")
"""Settings that say where a run trains, not what it learns: a run may resume with other values (a run trained on a
GPU resumes on a CPU; the data-parallel step is the single-process one), equal up to float rounding."""


def check_resumable(state: dict[str, Any], config: TrainConfig, dataset: Dataset, run_id: str) -> None:
    """A checkpoint continues only with the config and dataset it was started with."""
    current = to_dict(config)
    saved = dict(state.get("config", {}))
    for key in set(current) - set(saved):
        with contextlib.suppress(KeyError):  # a setting newer than the checkpoint: it trained at the default
            saved[key] = default_of(TrainConfig, key)
    changed = sorted(k for k in set(saved) | set(current) if k not in PLACEMENT and saved.get(k) != current.get(k))
    if changed:
        key = changed[0]
        raise UserInputError(
            f"cannot resume run {run_id} with a different config: {key} was {saved.get(key)!r}, "
            f"now {current.get(key)!r}; drop the flag or start a new run"
        )
    if state.get("dataset_sha256") != dataset.digest:
        raise UserInputError(
            f"cannot resume run {run_id} on a different dataset: {dataset.folder} changed since the run started"
        )


def load_teacher(config: TrainConfig, dataset: Dataset) -> dict[str, np.ndarray] | None:
    """Teacher features from ``config.teacher`` (.npz with images [N, Fi], texts [kN, Ft]) or None (raw inputs)."""
    if config.distill_weight == 0 or config.teacher is None:
        return None
    task, arrays = load_embeddings(config.teacher, None)
    train = dataset.split("train")
    if task != "cross_modal" and dataset.task == "cross_modal":
        raise UserInputError(f"{config.teacher}: a teacher file needs images and texts arrays")
    from gssf_cli.core.files import check_finite

    for name in ("images", "texts"):
        array = arrays[name]
        if array.ndim != 2 or array.dtype.kind not in "fiu":
            raise UserInputError(
                f"{config.teacher}:{name}: expected a 2-D array of numbers, got {array.dtype} shape {list(array.shape)}"
            )
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf, refused just below
        images = np.asarray(arrays["images"], dtype=np.float32)
        texts = np.asarray(arrays["texts"], dtype=np.float32)
    check_finite(images, f"{config.teacher}:images")
    check_finite(texts, f"{config.teacher}:texts")
    if len(images) != train.num_images or len(texts) != train.num_pairs:
        raise UserInputError(
            f"{config.teacher}: {len(images)} images / {len(texts)} texts, but the train split has "
            f"{train.num_images} images / {train.num_pairs} texts"
        )
    return {"images": images, "texts": texts}


def teacher_features(
    batch_pairs: np.ndarray, batch: Any, split: Split, teacher: dict[str, np.ndarray] | None, vocab_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen intra-modal teachers for a batch: given arrays, or the raw inputs (mean regions ``[B, F]``; a bag
    of words ``[B, V]`` without the special tokens)."""
    if teacher is not None:
        rows = batch_pairs // split.k
        return torch.from_numpy(teacher["images"][rows]), torch.from_numpy(teacher["texts"][batch_pairs])
    images = batch.images.mean(dim=1) if batch.images.dim() == 3 else batch.images
    if batch.lengths is None:
        return images, batch.texts
    assert vocab_size is not None
    bag = torch.zeros(batch.texts.shape[0], vocab_size)
    valid = (torch.arange(batch.texts.shape[1])[None, :] < batch.lengths[:, None]).float()
    bag.scatter_add_(1, batch.texts, valid)
    bag[:, :4] = 0
    return images, bag
