"""Stage ``train``: learn encoders and a GSSF metric head on a prepared dataset, resumably.

Each epoch: shuffled pairs (a generator seeded by seed and epoch, so a resumed run sees the same batches),
hinge triplet over all negatives during warm-up and hardest negatives after (or InfoNCE), optional
structure-aware distillation, AdamW with gradient clipping, a step decay of the learning rate; then
validation on the dev split with the evaluation functions (rSum, or MAP@R for label-based data) and an
atomic checkpoint. The best epoch is kept. ``resume`` continues a run from its last checkpoint with the
same config and dataset, and ends with the same result as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli.config import TrainConfig, to_dict
from gssf_cli.errors import UserInputError

if TYPE_CHECKING:
    import torch

    from gssf_cli.data.dataset import Dataset
    from gssf_cli.model import RetrievalModel
    from gssf_cli.tracking import StageRun, Tracker

LAST = "checkpoint"
EpochCallback = Callable[[int, dict[str, float], Path], None]
BEST = "best"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    out_dir: str
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    validation_metric: str
    parameters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def validation_metric(task: str) -> str:
    return "rsum" if task == "cross_modal" else "map_at_r"


def lr_at(config: TrainConfig, epoch: int) -> float:
    return config.lr * (config.lr_decay if epoch >= config.lr_decay_epoch else 1.0)


def run(
    config: TrainConfig,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    resume: str | None = None,
    progress: bool = True,
    resume_from: Path | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train per ``config``; with ``resume`` (a run id), continue that run from its last checkpoint.

    For drivers such as Ray Tune: ``resume_from`` continues from a checkpoint folder (one written by this
    function) without a tracked run, and ``on_epoch_end(epoch, metrics, checkpoint_folder)`` is called after
    each epoch's checkpoint is on disk (metrics include ``best_<validation metric>``).
    """
    import torch

    from gssf_cli import checkpoint as ckpt
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.model import build_model, build_objective

    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    dataset = Dataset(config.data)
    if not dataset.has_split("train"):
        raise UserInputError(f"{config.data}: no train split to train on")
    teacher = _load_teacher(config, dataset)
    torch.manual_seed(config.seed)
    model = build_model(dataset, config).to(device)
    objective = build_objective(config).to(device)
    trainable = torch.nn.ModuleDict({"model": model, "objective": objective})
    optimizer = _optimizer(model, objective, config)
    start_epoch, best_value, best_epoch = 0, -math.inf, -1
    history: dict[str, float] = {}
    if resume is not None or resume_from is not None:
        folder = resume_from if resume_from is not None else config.runs_dir / str(resume) / LAST
        saved = ckpt.load(folder)
        _check_resumable(saved.state, config, dataset, resume or str(folder))
        trainable.load_state_dict(saved.model)
        if saved.optimizer is not None:
            optimizer.load_state_dict(saved.optimizer)
        ckpt.restore_rng(saved.rng)
        start_epoch = saved.state["epoch"] + 1
        best_value, best_epoch = saved.state["best_value"], saved.state["best_epoch"]
        history = saved.state.get("last_metrics", {})

    metric_name = validation_metric(dataset.task)
    with contextlib.ExitStack() as stack:
        tracked: StageRun | None = None
        if tracker is not None:
            tracked = stack.enter_context(
                tracker.start_run(
                    "train", run_name=f"train {config.metric}", parent_run_id=parent_run_id, resume_run_id=resume
                )
            )
            if resume is None:
                _log_start(tracked, config, dataset, model)
        if tracked is not None:
            run_id = tracked.run_id
        elif resume_from is not None:
            run_id = resume_from.parent.name
        else:
            run_id = resume or uuid.uuid4().hex
        out_dir = resume_from.parent if resume_from is not None and tracked is None else config.runs_dir / run_id
        started = time.perf_counter()
        for epoch in range(start_epoch, config.epochs):
            stats = _train_epoch(model, objective, optimizer, dataset, teacher, config, epoch, device, progress)
            val = _validate(model, dataset, config, device)
            history = {**stats, **{f"val_{k}": v for k, v in val.items()}}
            value = val.get(metric_name, -stats["loss"])
            improved = value > best_value
            if improved:
                best_value, best_epoch = value, epoch
            state = {
                "epoch": epoch,
                "best_value": best_value,
                "best_epoch": best_epoch,
                "config": to_dict(config),
                "dataset_sha256": dataset.digest,
                "task": dataset.task,
                "last_metrics": history,
            }
            if improved:
                ckpt.save(out_dir / BEST, model, state)
            ckpt.save(out_dir / LAST, trainable, state, optimizer)
            if tracked is not None:
                tracked.log_metrics({**history, f"best_{metric_name}": best_value}, step=epoch)
            if on_epoch_end is not None:
                on_epoch_end(epoch, {**history, f"best_{metric_name}": best_value}, out_dir / LAST)
        seconds = time.perf_counter() - started
        best_state = ckpt.load(out_dir / BEST).state
        final = {k: float(v) for k, v in best_state["last_metrics"].items()}
        parameters = model.parameter_counts()
        if tracked is not None:
            _log_end(tracked, out_dir, model, best_state)
    return TrainResult(
        run_id=run_id,
        out_dir=str(out_dir),
        best_epoch=best_epoch,
        epochs_run=config.epochs - start_epoch,
        metrics=final,
        validation_metric=metric_name,
        parameters=parameters,
        seconds=round(seconds, 2),
    )


def saved_config(run_id: str, runs_dir: Any = None) -> dict[str, Any]:
    """The config a run was started with, read from its last checkpoint (to resume it)."""
    import json

    state_file = Path(runs_dir or "runs") / run_id / LAST / "state.json"
    if not state_file.is_file():
        raise UserInputError(f"run {run_id} has no local checkpoint at {state_file.parent}; cannot resume it here")
    config: dict[str, Any] = json.loads(state_file.read_text())["config"]
    return config


def _optimizer(model: RetrievalModel, objective: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on the metric head only (keeps W from winning the fixed margin by growing)."""
    import torch

    groups = [
        {"params": list(model.encoder.parameters()), "weight_decay": 0.0},
        {"params": list(model.similarity.parameters()), "weight_decay": config.weight_decay},
        {"params": list(objective.parameters()), "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _check_resumable(state: dict[str, Any], config: TrainConfig, dataset: Dataset, run_id: str) -> None:
    saved = state.get("config", {})
    current = to_dict(config)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
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


def _load_teacher(config: TrainConfig, dataset: Dataset) -> dict[str, Any] | None:
    """Teacher features from ``config.teacher`` (.npz with images [N, Fi], texts [kN, Ft]) or None (raw inputs)."""
    if config.distill_weight == 0 or config.teacher is None:
        return None
    import numpy as np

    from gssf_cli.stages.evaluate import load_embeddings

    task, arrays = load_embeddings(config.teacher, None)
    train = dataset.split("train")
    if task != "cross_modal" and dataset.task == "cross_modal":
        raise UserInputError(f"{config.teacher}: a teacher file needs images and texts arrays")
    images = np.asarray(arrays["images"], dtype=np.float32)
    texts = np.asarray(arrays["texts"], dtype=np.float32)
    if len(images) != train.num_images or len(texts) != train.num_pairs:
        raise UserInputError(
            f"{config.teacher}: {len(images)} images / {len(texts)} texts, but the train split has "
            f"{train.num_images} images / {train.num_pairs} texts"
        )
    return {"images": images, "texts": texts}


def _teacher_features(
    batch_pairs: Any, batch: Any, split: Any, teacher: dict[str, Any] | None, vocab_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen intra-modal teachers for a batch: given arrays, or the raw inputs (mean regions; bag of words)."""
    import torch

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


def _train_epoch(
    model: RetrievalModel,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    teacher: dict[str, Any] | None,
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from gssf_cli.console import stderr

    split = dataset.split("train")
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    batches = split.pair_batches(config.batch_size, generator)
    lr = lr_at(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    hardest = epoch >= config.warmup_epochs
    vocab_size = len(dataset.vocab) if dataset.vocab is not None else None
    model.train()
    total_loss, seen, started = 0.0, 0, time.perf_counter()
    columns = (
        TextColumn(f"epoch {epoch + 1}/{config.epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, disable=not progress, transient=True) as bar:
        task = bar.add_task("train", total=len(batches), loss=0.0, rate=0.0)
        for pairs in batches:
            batch = split.training_batch(pairs, generator)
            images = model.encode_images(batch.images.to(device))
            lengths = None if batch.lengths is None else batch.lengths.to(device)
            texts = model.encode_texts(batch.texts.to(device), lengths)
            scores = model.scores(images, texts)
            distill = None
            if config.distill_weight > 0:
                t_img, t_txt = _teacher_features(pairs, batch, split, teacher, vocab_size)
                student = scores if config.distill_use_metric else images @ texts.T
                distill = (student, t_img.to(device), t_txt.to(device))
            parts = objective(scores, batch.ids.to(device), hardest=hardest, distill_inputs=distill)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            total_loss += float(parts["loss"].detach()) * len(pairs)
            seen += len(pairs)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=1, loss=total_loss / seen, rate=rate)
    return {"loss": total_loss / seen, "lr": lr, "samples_per_s": seen / max(time.perf_counter() - started, 1e-9)}


def _validate(model: RetrievalModel, dataset: Dataset, config: TrainConfig, device: torch.device) -> dict[str, float]:
    if not dataset.has_split(config.val_split):
        return {}
    from gssf_cli.stages.evaluate import evaluate_model

    metrics = evaluate_model(model, dataset, config.val_split, device)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, float)}


def _log_start(run_: StageRun, config: TrainConfig, dataset: Dataset, model: RetrievalModel) -> None:
    run_.log_config("train", to_dict(config))
    run_.log_dataset(
        dataset.name, dataset.folder, dataset.digest, context="training", tags={"kind": dataset.manifest["kind"]}
    )
    run_.log_params({f"params_{k}": v for k, v in model.parameter_counts().items()})
    run_.set_tags({"gssf.metric": config.metric, "gssf.task": dataset.task})


def _log_end(run_: StageRun, out_dir: Path, model: RetrievalModel, best_state: dict[str, Any]) -> None:
    """Best checkpoint and config as artifacts; a heatmap of the learned W ⊙ U for learned metrics."""
    from gssf_cli.config import dump_toml

    run_.log_artifacts(out_dir / BEST, "checkpoint")
    run_.log_text(dump_toml({"train": best_state["config"]}), "config/train_resolved.toml")
    run_.log_metrics(
        {f"final_{k}": v for k, v in best_state["last_metrics"].items()} | {"best_epoch": best_state["best_epoch"]}
    )
    if model.similarity.num_parameters() > 0:
        from gssf_cli import plots

        fig = plots.metric_heatmap(model.similarity.effective_matrix().detach().cpu().numpy(), model.similarity.name)
        run_.log_figure(fig, "plots/metric_heatmap.png")
        plots.close(fig)
