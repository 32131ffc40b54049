"""Stage ``evaluate``: retrieval metrics for embeddings, as an MLflow evaluation run with plots.

An embeddings file (``.npz``) holds one of three layouts (optionally prefixed ``{split}_``, chosen by
``--split``):

- cross-modal: ``images`` ``[N, D]`` and ``texts`` ``[kN, D]``, the k texts of image i in rows
  ``k*i .. k*i+k-1`` (k = 5 for COCO/Flickr30K, 1 for CLIP-style pairs);
- label-based, one set against itself: ``features`` ``[N, D]`` and ``labels`` ``[N]``;
- label-based, query set against a gallery: ``queries``, ``query_labels``, ``gallery``, ``gallery_labels``.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli.config import EvaluateConfig, to_dict
from gssf_cli.errors import UserInputError

if TYPE_CHECKING:
    import torch

    from gssf_cli.data.dataset import Dataset
    from gssf_cli.model import RetrievalModel
    from gssf_cli.tracking import StageRun, Tracker

CROSS_MODAL = ("images", "texts")
SELF_LABELS = ("features", "labels")
TWO_SETS = ("queries", "query_labels", "gallery", "gallery_labels")
CURVE_KS = (1, 2, 5, 10, 20, 50, 100)
PLOT_SAMPLE = 2000


@dataclass(frozen=True)
class EvaluateResult:
    task: str
    protocol: str | None
    metrics: dict[str, float]
    folds: list[dict[str, float]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Flat metrics first (the documented keys), then context."""
        out: dict[str, Any] = dict(self.metrics)
        out.update({"task": self.task, "sizes": self.sizes, "seconds": self.seconds, "run_id": self.run_id})
        if self.task == "cross_modal":
            out["protocol"] = self.protocol
            out["folds"] = self.folds
        return out


def load_embeddings(path: Path, split: str | None) -> tuple[str, dict[str, np.ndarray]]:
    """Read an embeddings file and name its layout: ``cross_modal``, ``labels`` or ``labels_two_sets``."""
    if not path.is_file():
        raise UserInputError(f"embeddings file {path} not found: pass an .npz with images+texts or features+labels")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    prefix = f"{split}_" if split else ""
    if not split and not any(k in arrays for k in (*CROSS_MODAL, *SELF_LABELS, *TWO_SETS)):
        splits = sorted({k.split("_", 1)[0] for k in arrays if "_" in k})
        if "test" in splits:
            prefix = "test_"
    for task, keys in (("cross_modal", CROSS_MODAL), ("labels_two_sets", TWO_SETS), ("labels", SELF_LABELS)):
        if any(f"{prefix}{k}" in arrays for k in keys[:1]):
            missing = [f"{prefix}{k}" for k in keys if f"{prefix}{k}" not in arrays]
            if missing:
                raise UserInputError(f"{path}: {', '.join(missing)} missing (needed beside {prefix}{keys[0]})")
            return task, {k: arrays[f"{prefix}{k}"] for k in keys}
    raise UserInputError(
        f"{path}: found keys {sorted(arrays)}; expected {prefix}images+{prefix}texts, "
        f"{prefix}features+{prefix}labels, or queries/query_labels/gallery/gallery_labels"
    )


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    x = _as_float(x, name)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserInputError(f"{name}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros; cosine is undefined")
    return x / norms


def evaluate_model(
    model: RetrievalModel,
    dataset: Dataset,
    split_name: str,
    device: torch.device,
    protocol: str = "all",
    ks: tuple[int, ...] = (1, 5, 10),
    memory_budget_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """Metrics of a model on one split, scored by its own metric head (rSum etc., or MAP@R etc.)."""
    import torch

    from gssf_cli import retrieval
    from gssf_cli.model import embed_split

    split = dataset.split(split_name)
    with torch.no_grad():
        images, texts = embed_split(model, split, device)
        try:
            if split.task == "cross_modal":
                return retrieval.evaluate_cross_modal(
                    images,
                    texts,
                    captions_per_image=split.k,
                    protocol=protocol,
                    score_fn=model.similarity.scores,
                    ks=ks,
                    memory_budget_bytes=memory_budget_bytes,
                )
            return retrieval.evaluate_labels(
                images, split.labels, score_fn=model.similarity.scores, ks=ks, memory_budget_bytes=memory_budget_bytes
            )
        except retrieval.RetrievalInputError as exc:
            raise UserInputError(f"{dataset.folder} ({split_name} split): {exc}") from None


def run(config: EvaluateConfig, tracker: Tracker | None = None, parent_run_id: str | None = None) -> EvaluateResult:
    """Evaluate embeddings or a trained run; metrics, config and plots go to an ``evaluate`` run."""
    from gssf_cli import retrieval

    if tracker is not None:
        _ = tracker.experiment_id
    if config.run is not None:
        if tracker is None:
            raise UserInputError("--run needs a tracking store to find the run")
        return _run_trained(config, tracker, parent_run_id)
    assert config.embeddings is not None
    task, arrays = load_embeddings(config.embeddings, config.split)
    prepare = _normalise if config.metric == "cosine" else _as_float
    budget = config.memory_budget_mb * 2**20
    started = time.perf_counter()
    folds: list[dict[str, float]] = []
    try:
        if task == "cross_modal":
            images, texts = prepare(arrays["images"], "images"), prepare(arrays["texts"], "texts")
            k = _captions_per_image(len(images), len(texts))
            outcome = retrieval.evaluate_cross_modal(
                images, texts, captions_per_image=k, protocol=config.protocol, ks=config.ks, memory_budget_bytes=budget
            )
            folds = outcome.pop("folds")
            protocol = outcome.pop("protocol")
            metrics = {key: float(value) for key, value in outcome.items()}
            sizes = {"images": len(images), "texts": len(texts), "captions_per_image": k}
        else:
            protocol = None
            if task == "labels":
                queries, gallery = prepare(arrays["features"], "features"), None
                query_labels, gallery_labels = arrays["labels"], None
            else:
                queries, gallery = prepare(arrays["queries"], "queries"), prepare(arrays["gallery"], "gallery")
                query_labels, gallery_labels = arrays["query_labels"], arrays["gallery_labels"]
            metrics = retrieval.evaluate_labels(
                queries, query_labels, gallery, gallery_labels, ks=config.ks, memory_budget_bytes=budget
            )
            sizes = {"queries": len(queries), "gallery": len(gallery if gallery is not None else queries)}
    except retrieval.RetrievalInputError as exc:
        raise UserInputError(f"{config.embeddings}: {exc}") from None
    seconds = round(time.perf_counter() - started, 3)
    task_name = "cross_modal" if task == "cross_modal" else "labels"
    result = EvaluateResult(task_name, protocol, metrics, folds, sizes, seconds)
    if tracker is None:
        return result
    with tracker.start_run(
        "evaluate", run_name=f"evaluate {config.embeddings.name}", parent_run_id=parent_run_id
    ) as run_:
        run_.log_config("evaluate", to_dict(config))
        run_.log_metrics({**metrics, "seconds": seconds})
        for index, fold in enumerate(folds if len(folds) > 1 else []):
            run_.log_metrics({f"fold_{key}": value for key, value in fold.items()}, step=index)
        run_.log_dict(result.to_json(), "evaluation.json")
        if config.plots:
            _log_plots(run_, task, arrays, prepare, config)
    return EvaluateResult(**{**asdict(result), "run_id": run_.run_id})


def _run_trained(config: EvaluateConfig, tracker: Tracker, parent_run_id: str | None) -> EvaluateResult:
    """Embed the run's test split with its best checkpoint and score with its own metric head."""
    import torch

    from gssf_cli.model import embed_split
    from gssf_cli.runs import load_trained

    train_run, model, dataset = load_trained(tracker, config.run or "latest", config.data)
    split_name = config.split or "test"
    started = time.perf_counter()
    budget = config.memory_budget_mb * 2**20
    outcome = dict(evaluate_model(model, dataset, split_name, torch.device("cpu"), config.protocol, config.ks, budget))
    seconds = round(time.perf_counter() - started, 3)
    split = dataset.split(split_name)
    folds = outcome.pop("folds", []) if dataset.task == "cross_modal" else []
    protocol = outcome.pop("protocol", None)
    metrics = {k: float(v) for k, v in outcome.items()}
    sizes = (
        {"images": split.num_images, "texts": split.num_pairs}
        if dataset.task == "cross_modal"
        else {"queries": split.num_images, "gallery": split.num_images}
    )
    result = EvaluateResult(dataset.task, protocol, metrics, folds, sizes, seconds)
    with tracker.start_run(
        "evaluate",
        run_name=f"evaluate {train_run.info.run_name}",
        parent_run_id=parent_run_id,
        tags={"gssf.source_run": train_run.info.run_id},
    ) as run_:
        run_.log_config("evaluate", to_dict(config))
        run_.log_dataset(dataset.name, dataset.folder, dataset.digest, context=split_name)
        run_.log_metrics({**metrics, "seconds": seconds})
        run_.log_dict(result.to_json(), "evaluation.json")
        tracker.run_handle(train_run.info.run_id).log_metrics({f"{split_name}_{k}": v for k, v in metrics.items()})
        if config.plots:
            with torch.no_grad():
                images, texts = embed_split(model, split, torch.device("cpu"))
            arrays = (
                {"images": images.numpy(), "texts": texts.numpy()}
                if dataset.task == "cross_modal"
                else {"features": images.numpy(), "labels": split.labels}
            )
            task = "cross_modal" if dataset.task == "cross_modal" else "labels"
            _log_plots(run_, task, arrays, _identity, config, model.similarity.scores)
    return EvaluateResult(**{**asdict(result), "run_id": run_.run_id})


def _identity(x: np.ndarray, name: str) -> np.ndarray:
    return x


def _as_float(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UserInputError(f"{name}: expected a 2-D array [N, D], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise UserInputError(f"{name}: contains NaN or Inf; clean the embeddings first")
    return x


def _captions_per_image(n_images: int, n_texts: int) -> int:
    if n_images == 0 or n_texts % n_images:
        raise UserInputError(
            f"{n_texts} texts for {n_images} images: texts must hold k rows per image in image order (k = 5 for COCO)"
        )
    return n_texts // n_images


def _log_plots(
    run_: StageRun,
    task: str,
    arrays: dict[str, np.ndarray],
    prepare: Any,
    config: EvaluateConfig,
    score_fn: Any = None,
) -> None:
    """Score distributions (positives vs negatives) and the R@K curve, on a bounded sample of queries.

    ``score_fn`` (torch, ``[Bq, D] x [Bg, D] -> [Bq, Bg]``) is the metric being evaluated; inner product
    when None.
    """
    import torch

    from gssf_cli import plots, retrieval

    def score(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        q_t, g_t = torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(g))
        with torch.no_grad():
            return (score_fn(q_t, g_t) if score_fn is not None else q_t @ g_t.T).numpy()

    rng = np.random.default_rng(0)
    budget = config.memory_budget_mb * 2**20
    if task == "cross_modal":
        images, texts = prepare(arrays["images"], "images"), prepare(arrays["texts"], "texts")
        k = len(texts) // len(images)
        pick = np.sort(rng.choice(len(images), size=min(PLOT_SAMPLE // 4, len(images)), replace=False))
        own = (pick[:, None] * k + np.arange(k)).ravel()
        others = rng.choice(len(texts), size=min(PLOT_SAMPLE, len(texts)), replace=False)
        columns = np.union1d(own, others)
        block = score(images[pick], texts[columns])
        same = (columns[None, :] // k) == pick[:, None]
        positives, negatives = block[same], block[~same]
        ranks = retrieval.cross_modal_ranks(
            images, texts, captions_per_image=k, score_fn=score_fn, memory_budget_bytes=budget
        )
        i2t, t2i = ranks.i2t.numpy(), ranks.t2i.numpy()
        curves = {
            "image→text": {c: 100.0 * float(np.mean(i2t < c)) for c in CURVE_KS if c <= len(texts)},
            "text→image": {c: 100.0 * float(np.mean(t2i < c)) for c in CURVE_KS if c <= len(images)},
        }
        ylabel = "R@K (%)"
    else:
        feats = prepare(arrays["features" if task == "labels" else "queries"], "features")
        labels = np.asarray(arrays["labels" if task == "labels" else "query_labels"])
        gallery = feats if task == "labels" else prepare(arrays["gallery"], "gallery")
        gallery_labels = labels if task == "labels" else np.asarray(arrays["gallery_labels"])
        rows = np.sort(rng.choice(len(feats), size=min(PLOT_SAMPLE // 4, len(feats)), replace=False))
        cols = np.sort(rng.choice(len(gallery), size=min(PLOT_SAMPLE, len(gallery)), replace=False))
        block = score(feats[rows], gallery[cols])
        same = labels[rows][:, None] == gallery_labels[cols][None, :]
        if task == "labels":
            same &= rows[:, None] != cols[None, :]
            valid = rows[:, None] != cols[None, :]
        else:
            valid = np.ones_like(same)
        positives, negatives = block[same], block[valid & ~same]
        curve = retrieval.evaluate_labels(
            feats,
            labels,
            None if task == "labels" else gallery,
            None if task == "labels" else gallery_labels,
            score_fn=score_fn,
            ks=[c for c in CURVE_KS if c <= len(gallery) - 1],
            memory_budget_bytes=budget,
        )
        curves = {"hit rate": {c: 100.0 * curve[f"r_at_{c}"] for c in CURVE_KS if f"r_at_{c}" in curve}}
        ylabel = "R@K: queries with a relevant item in the top K (%)"
    if len(positives) and len(negatives):
        fig = plots.score_distributions(
            positives, negatives, f"{config.metric if score_fn is None else 'learned metric'} scores"
        )
        run_.log_figure(fig, "plots/score_distributions.png")
        plots.close(fig)
    fig = plots.recall_curve(curves, "retrieval quality against K", ylabel)
    run_.log_figure(fig, "plots/recall_at_k.png")
    plots.close(fig)
