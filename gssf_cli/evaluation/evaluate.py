"""Evaluation: retrieval metrics of an embeddings file or of a trained model, and the figures that show them.

An embeddings file (``.npz``) holds one of three layouts (optionally prefixed ``{split}_``, chosen by
``split``):

- cross-modal: ``images`` ``[N, D]`` and ``texts`` ``[kN, D]``, the k texts of image i in rows
  ``k*i .. k*i+k-1`` (k = 5 for COCO/Flickr30K, 1 for CLIP-style pairs);
- label-based, one set against itself: ``features`` ``[N, D]`` and ``labels`` ``[N]``;
- label-based, query set against a gallery: ``queries``, ``query_labels``, ``gallery``, ``gallery_labels``.

The metrics themselves are the pure functions of :mod:`gssf_cli.evaluation.crossmodal` and
:mod:`gssf_cli.evaluation.labels`; this module turns files and models into their inputs, their results into
:class:`EvaluateResult` (which says what was measured: the dataset and the model, see :func:`dataset_identity` and
:func:`model_identity`), results into a results file people can keep (:func:`results_document`,
:func:`write_results`), and samples of the scores into figures.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli import __version__
from gssf_cli.core import metrics as registry
from gssf_cli.core.errors import DivergedError, UserInputError, first_line
from gssf_cli.core.files import writer_id
from gssf_cli.core.stage_configs import EvaluateConfig
from gssf_cli.data.manifest import split_classes

if TYPE_CHECKING:
    import torch

    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling.model import RetrievalModel, SplitScorer

CROSS_MODAL = ("images", "texts")
SELF_LABELS = ("features", "labels")
TWO_SETS = ("queries", "query_labels", "gallery", "gallery_labels")


@dataclass(frozen=True)
class EvaluateResult:
    """One evaluation: ``metrics`` (flat, named as in :mod:`gssf_cli.core.metrics`), cross-modal ``folds``, ``sizes``,
    and what was measured: ``dataset_info`` (:func:`dataset_identity`, :func:`file_identity`) and ``model_info``
    (:func:`model_identity` plus the train run; for an embeddings file, the file). ``run_id``: the evaluate run;
    ``output``: the results file written, if any."""

    task: str
    protocol: str | None
    metrics: dict[str, float]
    folds: list[dict[str, float]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None
    dataset_info: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    shortlist: dict[str, Any] | None = None
    """With ``--shortlist K``: K, that the metrics are approximate, and the exact top-10 items missed
    (:meth:`gssf_cli.evaluation.shortlist.ShortlistReport.to_json`)."""
    intra_modal: dict[str, str | None] | None = None
    """For a cross-modal run: each intra-modal side (``i2i``, ``t2t``) and what said what is relevant (None: nothing
    in the dataset does, so that side is not measured; :mod:`gssf_cli.evaluation.intramodal`)."""

    def to_json(self) -> dict[str, Any]:
        """Flat metrics first (the documented keys), then context: what was measured, sizes, run."""
        out: dict[str, Any] = dict(self.metrics)
        out.update({"task": self.task, "sizes": self.sizes, "seconds": self.seconds, "run_id": self.run_id})
        if self.task == "cross_modal":
            out["protocol"] = self.protocol
            out["folds"] = self.folds
        if self.shortlist is not None:
            out["shortlist"] = self.shortlist
        if self.intra_modal is not None:
            out["intra_modal"] = self.intra_modal
        out.update({"dataset_info": self.dataset_info, "model_info": self.model_info})
        if self.output is not None:
            out["output"] = self.output
        return out


def load_embeddings(path: Path, split: str | None) -> tuple[str, dict[str, np.ndarray]]:
    """Read an embeddings file and name its layout: ``cross_modal``, ``labels`` or ``labels_two_sets``."""
    layout, arrays, _ = _read_embeddings(path, split)
    return layout, arrays


def _read_embeddings(path: Path, split: str | None) -> tuple[str, dict[str, np.ndarray], str | None]:
    """:func:`load_embeddings`, and the split whose keys were read (None: unprefixed keys)."""
    if not path.is_file():
        raise UserInputError(f"embeddings file {path} not found: pass an .npz with images+texts or features+labels")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
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
            return task, {k: arrays[f"{prefix}{k}"] for k in keys}, prefix.removesuffix("_") or None
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
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Metrics of a model on one split, scored by its own metric head (rSum etc., or MAP@R etc.).

    ``step``, if given, is told as each of the two steps starts (encoding the split, then scoring it), with
    what it does: how training shows its validation without this module knowing about a terminal.
    """
    import torch

    from gssf_cli.modeling.model import split_scorer

    split = dataset.split(split_name)
    with torch.no_grad():
        if step is not None and split.task == "cross_modal":
            step(f"encode {split.num_images:,} images, {split.num_pairs:,} texts")
        elif step is not None:
            step(f"encode {split.num_images:,} items")
        scorer = split_scorer(model, split, device)
        check_model_finite(scorer.pooled, split_name)
        if step is not None:
            step("score")
        return _score_split(scorer, dataset, split_name, protocol, ks, memory_budget_bytes)


def check_model_finite(pooled: tuple[torch.Tensor, torch.Tensor], split_name: str) -> None:
    """Refuse a model whose embeddings of a split (``images [N, D]``, ``texts [kN, D]``) hold NaN or Inf as a
    diverged model (:class:`DivergedError`): the split was checked when it was read, so the model is at fault."""
    import torch

    for side, rows in zip(("image", "text"), pooled, strict=True):
        if rows.numel() and not bool(torch.isfinite(rows).all()):
            found = f"the model's {side} embeddings of the {split_name} split contain NaN or Inf"
            raise DivergedError(f"{found}: the model diverged in training", found)


def _score_split(
    scorer: SplitScorer,
    dataset: Dataset,
    split_name: str,
    protocol: str,
    ks: tuple[int, ...],
    memory_budget_bytes: int,
    full_map: bool = False,
) -> dict[str, Any]:
    """Metrics of a split under its model's scoring (:class:`~gssf_cli.modeling.model.SplitScorer`)."""
    from gssf_cli.evaluation import crossmodal, ranking
    from gssf_cli.evaluation import labels as label_metrics

    split = dataset.split(split_name)
    try:
        if split.task == "cross_modal":
            return crossmodal.evaluate_cross_modal(
                scorer.images,
                scorer.texts,
                captions_per_image=split.k,
                protocol=protocol,
                score_fn=scorer.score_fn,
                ks=ks,
                memory_budget_bytes=memory_budget_bytes,
            )
        return label_metrics.evaluate_labels(
            scorer.images,
            split.labels,
            score_fn=scorer.score_fn,
            ks=ks,
            memory_budget_bytes=memory_budget_bytes,
            full_map=full_map,
        )
    except ranking.NonFiniteScoresError:
        found = f"the model's scores on the {split_name} split contain NaN or Inf"
        raise DivergedError(f"{found}: the model diverged in training", found) from None
    except ranking.RetrievalInputError as exc:
        raise UserInputError(f"{dataset.folder} ({split_name} split): {exc}") from None


@dataclass(frozen=True)
class Evaluation:
    """An evaluation and what its figures need: the (prepared) arrays, in a layout of :func:`load_embeddings`,
    and the score function ``[Bq, D] x [Bg, D] -> [Bq, Bg]`` (None: inner product)."""

    result: EvaluateResult
    layout: str
    arrays: dict[str, np.ndarray]
    score_fn: Callable[..., Any] | None = None
    score_label: str = "cosine"


def evaluate_file(config: EvaluateConfig, head: RetrievalModel | None = None) -> Evaluation:
    """Metrics of the embeddings file ``config.embeddings``: cosine or dot, per ``config.metric``; or, with
    ``head`` (a trained model: ``--head RUN``), scored by its metric head, the arrays read as that head reads
    them (:func:`gssf_cli.modeling.model.embed_for_head`: a head-only run's adapters apply)."""
    from gssf_cli.evaluation import coco_protocols, crossmodal, ranking

    assert config.embeddings is not None
    if config.protocol in coco_protocols.PROTOCOLS:
        raise UserInputError(
            f"--protocol {config.protocol} ranks a COCO test split by its COCO ids, which an embeddings file does not "
            f"carry: evaluate a run on a precomp COCO folder (--run RUN --split testall --protocol {config.protocol})"
        )
    layout, arrays, split = _read_embeddings(config.embeddings, config.split)
    prepare: Callable[[np.ndarray, str], np.ndarray] = _normalise if config.metric == "cosine" else _as_float
    score_fn: Callable[..., Any] | None = None
    if head is not None:
        prepare = _head_reader(head, config.embeddings, layout)
        score_fn = head.similarity.scores
    budget = config.memory_budget_mb * 2**20
    started = time.perf_counter()
    folds: list[dict[str, float]] = []
    try:
        if layout == "cross_modal":
            arrays = {"images": prepare(arrays["images"], "images"), "texts": prepare(arrays["texts"], "texts")}
            images, texts = arrays["images"], arrays["texts"]
            k = _captions_per_image(len(images), len(texts))
            outcome = crossmodal.evaluate_cross_modal(
                images,
                texts,
                captions_per_image=k,
                protocol=config.protocol,
                score_fn=score_fn,
                ks=config.ks,
                memory_budget_bytes=budget,
            )
            folds = outcome.pop("folds")
            protocol = outcome.pop("protocol")
            metrics = {key: float(value) for key, value in outcome.items()}
            sizes = {"images": len(images), "texts": len(texts), "captions_per_image": k}
        else:
            protocol = None
            arrays, metrics, sizes = _file_label_metrics(config, layout, arrays, prepare, score_fn)
    except ranking.RetrievalInputError as exc:
        raise UserInputError(f"{config.embeddings}: {exc}") from None
    seconds = round(time.perf_counter() - started, 3)
    task = "cross_modal" if layout == "cross_modal" else "labels"
    score = config.metric if head is None else "learned metric"
    dataset_info, model_info = file_identity(config.embeddings, split, layout, protocol, sizes, score)
    if head is not None:
        model_info = {**model_identity(head), "source": "head", "embeddings": config.embeddings.as_posix()}
        model_info["embeddings_sha256"] = dataset_info["sha256"]
    result = EvaluateResult(
        task, protocol, metrics, folds, sizes, seconds, dataset_info=dataset_info, model_info=model_info
    )
    return Evaluation(result, layout, arrays, score_fn, score)


def _file_label_metrics(
    config: EvaluateConfig,
    layout: str,
    arrays: dict[str, np.ndarray],
    prepare: Callable[[np.ndarray, str], np.ndarray],
    score_fn: Callable[..., Any] | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, int]]:
    """Label-based metrics of a file's arrays (``labels``: the items against themselves; else queries against a
    gallery), each embedding array read by ``prepare``: the arrays as read, the metrics, the sizes."""
    from gssf_cli.evaluation import labels as label_metrics

    if layout == "labels":
        arrays = {"features": prepare(arrays["features"], "features"), "labels": arrays["labels"]}
        queries, gallery = arrays["features"], None
        query_labels, gallery_labels = arrays["labels"], None
    else:
        arrays = {
            **arrays,
            "queries": prepare(arrays["queries"], "queries"),
            "gallery": prepare(arrays["gallery"], "gallery"),
        }
        queries, gallery = arrays["queries"], arrays["gallery"]
        query_labels, gallery_labels = arrays["query_labels"], arrays["gallery_labels"]
    metrics = label_metrics.evaluate_labels(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        score_fn=score_fn,
        ks=config.ks,
        memory_budget_bytes=config.memory_budget_mb * 2**20,
        full_map=config.full_map,
    )
    sizes = {"queries": len(queries), "gallery": len(gallery if gallery is not None else queries)}
    return arrays, metrics, sizes


def _head_reader(head: RetrievalModel, path: Path, layout: str) -> Callable[[np.ndarray, str], np.ndarray]:
    """How ``--head`` prepares each array of a file: checked like any embeddings, then read as the head reads
    them (on the head's query side for images and queries). A file of the other task is refused."""
    from gssf_cli.modeling.model import embed_for_head

    task = "cross_modal" if layout == "cross_modal" else "labels"
    if task != head.task:
        what = "images and texts" if task == "cross_modal" else "features and labels"
        raise UserInputError(f"{path}: holds {what}, but the --head run is a {head.task} model; give its kind of file")

    def read(x: np.ndarray, name: str) -> np.ndarray:
        return embed_for_head(head, _as_float(x, name), "text" if name == "texts" else "image", f"{path}:{name}")

    return read


def evaluate_trained(model: RetrievalModel, dataset: Dataset, config: EvaluateConfig) -> Evaluation:
    """Embed a split (``test`` unless ``config.split``) with a trained model and score it as the model scores:
    its metric head over pooled embeddings, or its interaction over token sets — exactly, every pair, unless
    ``config.shortlist`` K asks to re-score only each query's top K by the pooled embeddings
    (:mod:`gssf_cli.evaluation.shortlist`; the result then says what it missed)."""
    import torch

    from gssf_cli.evaluation import coco_protocols
    from gssf_cli.modeling.model import split_scorer

    split_name = config.split or "test"
    coco = None
    if config.protocol in coco_protocols.PROTOCOLS:
        if config.shortlist is not None:
            raise UserInputError(f"--protocol {config.protocol} ranks every pair exactly: drop --shortlist")
        coco = coco_protocols.split_ids(dataset, split_name, config.protocol)
    split = dataset.split(split_name)
    started = time.perf_counter()
    budget = config.memory_budget_mb * 2**20
    shortlist = None
    with torch.no_grad():
        scorer = split_scorer(model, split, torch.device("cpu"))
        if config.shortlist is not None:
            from gssf_cli.evaluation.shortlist import shortlist_metrics

            images, texts = scorer.pooled
            outcome, report = shortlist_metrics(
                images, texts, scorer.score_fn, k=config.shortlist, captions_per_image=split.k,
                protocol=config.protocol, ks=config.ks,
            )  # fmt: skip
            shortlist = report.to_json()
        elif coco is not None:
            outcome = coco_protocols.evaluate_coco(
                config.protocol, coco, scorer.images, scorer.texts, score_fn=scorer.score_fn, ks=config.ks,
                memory_budget_bytes=budget,
            )  # fmt: skip
        else:
            outcome = dict(
                _score_split(scorer, dataset, split_name, config.protocol, config.ks, budget, config.full_map)
            )
    intra_sources = None
    if dataset.task == "cross_modal":
        from gssf_cli.evaluation.intramodal import split_intra_modal

        pooled_images, pooled_texts = (side.numpy() for side in scorer.pooled)
        intra, _, intra_sources = split_intra_modal(dataset.folder, split_name, pooled_images, pooled_texts, split.k)
        outcome.update(intra)
    seconds = round(time.perf_counter() - started, 3)
    folds = outcome.pop("folds", []) if dataset.task == "cross_modal" else []
    protocol = outcome.pop("protocol", None)
    metrics = {k: float(v) for k, v in outcome.items()}
    if dataset.task == "cross_modal":
        sizes = {"images": split.num_images, "texts": split.num_pairs}
        arrays = {"images": scorer.images.numpy(), "texts": scorer.texts.numpy()}
    else:
        sizes = {"queries": split.num_images, "gallery": split.num_images}
        arrays = {"features": scorer.images.numpy(), "labels": split.labels}
    dataset_info = dataset_identity(dataset, split_name, protocol, sizes)
    result = EvaluateResult(
        dataset.task,
        protocol,
        metrics,
        folds,
        sizes,
        seconds,
        dataset_info=dataset_info,
        model_info=model_identity(model),
        shortlist=shortlist,
        intra_modal=intra_sources,
    )
    label = "learned metric" if model.interaction is None else f"{model.interaction.kind} interaction"
    return Evaluation(result, dataset.task, arrays, scorer.score_fn, label)


def dataset_identity(
    dataset: Dataset, split_name: str, protocol: str | None, sizes: Mapping[str, int]
) -> dict[str, Any]:
    """What a trained model was measured on: the dataset's name, kind and folder, the sha256 of its manifest
    (which lists every file's checksum, so it names the content), the split (and whether its classes were seen in
    training), the protocol and the sizes."""
    return {
        "name": dataset.name,
        "kind": dataset.manifest.get("kind"),
        "folder": str(dataset.folder),
        "manifest_sha256": dataset.digest,
        "split": split_name,
        "classes": split_classes(dataset.manifest, split_name),
        "protocol": protocol,
        "sizes": dict(sizes),
    }


def model_identity(model: RetrievalModel) -> dict[str, Any]:
    """The evaluated model as built: its metric head (name, block size d or None, embedding size D, score
    normalisation), its encoders (``trained``, or a head-only run's ``identity`` / ``frozen``, and whether it has
    adapters) and its parameter counts. The stage adds the train run it came from and its best epoch."""
    from gssf_cli.modeling.encoders import encoder_kind

    similarity = model.similarity
    encoder, adapter = encoder_kind(model.encoder)
    interaction = model.interaction
    return {
        "interaction": interaction.settings() if interaction is not None else {"kind": "none"},
        "metric_head": similarity.name,
        "block_size": similarity.block_size,
        "embed_dim": similarity.dim,
        "metric_norm": similarity.norm,
        "encoder": encoder,
        "adapter": adapter,
        "parameters": model.parameter_counts(),
    }


def file_identity(
    path: Path, split: str | None, layout: str, protocol: str | None, sizes: Mapping[str, int], score: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What an embeddings file evaluation measured, as ``(dataset_info, model_info)``: the file is both the data
    and the model's output, so both name it by path and sha256; the dataset side adds the split whose keys were
    read, the layout, protocol and sizes, the model side the score (``cosine`` or ``dot``)."""
    from gssf_cli.core.files import sha256_file

    digest = sha256_file(path)
    dataset_info = {
        "name": path.stem,
        "kind": "embeddings",
        "path": str(path),
        "sha256": digest,
        "split": split,
        "layout": layout,
        "protocol": protocol,
        "sizes": dict(sizes),
    }
    return dataset_info, {"source": "embeddings", "path": str(path), "sha256": digest, "score": score}


CLIP_BENCHMARK_NAMES: dict[str, str] = {"t2i": "image_retrieval_recall", "i2t": "text_retrieval_recall"}
"""CLIP_benchmark's name for each of our recall directions (see :func:`clip_benchmark_aliases`)."""


def clip_benchmark_aliases(metrics: Mapping[str, float]) -> dict[str, float]:
    """Our cross-modal recalls under CLIP_benchmark's names and in its unit (a fraction in [0, 1], not %).

    CLIP_benchmark (``clip_benchmark/metrics/zeroshot_retrieval.py``) scores ``texts @ images.T`` and names a
    recall after what is *retrieved*: ``image_retrieval_recall@K`` is, for each text query, whether its image is
    among the top K images — our text→image ``t2i_rK`` / 100; ``text_retrieval_recall@K`` is, for each image
    query, whether any of its captions is among the top K texts — our image→text ``i2t_rK`` / 100. Both are the
    mean over queries of a 0/1 hit, as ours are (ties aside: CLIP_benchmark takes ``torch.topk``'s order, we count
    an item as ranked below every item that scores higher).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        direction, _, k = key.partition("_r")
        if direction in CLIP_BENCHMARK_NAMES and k.isdigit() and registry.get(key).unit == "%":
            out[f"{CLIP_BENCHMARK_NAMES[direction]}@{k}"] = value / registry.PERCENT
    return out


RESULTS_FORMAT = "gssf-evaluate-results/1"
"""Names the layout of :func:`results_document` (a reader checks it before trusting the keys)."""


def results_document(result: EvaluateResult, now: datetime.datetime | None = None) -> dict[str, Any]:
    """The results file of ``gssf evaluate --output``: what was measured, the metrics, by what and when.

    Shaped like CLIP_benchmark's results files, whose ``dataset``, ``model``, ``pretrained``, ``task`` and
    ``metrics`` keys it keeps with the same types (``clip_benchmark build`` tables them): ``dataset`` is the
    dataset's (or file's) name, ``model`` the metric head with its block size (``bdiag-d8``; ``embeddings-cosine``
    for a file), ``pretrained`` the train run id (the file's name), ``task`` ours (``cross_modal`` or ``labels``),
    ``metrics`` ours (the ``--json`` keys) plus :func:`clip_benchmark_aliases`. The identities in full are
    ``dataset_info`` and ``model_info`` (the same objects as in ``--json``); then the folds of a multi-fold
    protocol, the gssf version, the time (UTC), the evaluate run id and the seconds the evaluation took.
    """
    from gssf_cli.core.limits import model_label

    model_info = result.model_info
    if model_info.get("source") == "embeddings":
        model, pretrained = f"embeddings-{model_info.get('score')}", Path(str(model_info.get("path"))).name
    else:
        interaction = str(model_info.get("interaction", {}).get("kind", "none"))
        model = model_label(str(model_info.get("metric_head")), model_info.get("block_size"), interaction)
        pretrained = str(model_info.get("train_run_id"))
    when = now or datetime.datetime.now(datetime.UTC)
    return {
        "dataset": result.dataset_info.get("name"),
        "model": model,
        "pretrained": pretrained,
        "task": result.task,
        "metrics": {**result.metrics, **clip_benchmark_aliases(result.metrics)},
        "dataset_info": result.dataset_info,
        "model_info": model_info,
        "folds": result.folds if len(result.folds) > 1 else [],
        "format": RESULTS_FORMAT,
        "gssf_version": __version__,
        "created": when.isoformat(timespec="seconds"),
        "evaluate_run_id": result.run_id,
        "seconds": result.seconds,
    }


def write_results(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` as JSON at ``path`` atomically: into a temporary file in the same folder, then one
    rename, so that a reader never sees half a file and a failure leaves no file (and an earlier one as it was)."""
    tmp = path.with_name(f".{path.name}.tmp-{writer_id()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(document, indent=2, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserInputError(f"--output {path}: cannot write the results file ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
