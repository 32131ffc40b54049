"""ECCV Caption and CxC: COCO's 5,000-image test split ranked against the positives that COCO's one-caption-one-image
ground truth misses, as ECCV Caption (Chun et al., ECCV 2022) and CxC (Parekh et al., EACL 2021) define them.

The ``eccv_caption`` package (0.1.0, MIT, NAVER Corp.) ships the ground truths and computes the metrics; this is the
one module that imports it (an import contract in pyproject.toml says so), and only when one of these protocols runs,
so ``gssf --help`` never loads it.

**What the package reads.** ``i2t``: ``{COCO image id: [COCO caption ids, best first]}`` for every test image, and
``t2i``: ``{COCO caption id: [COCO image ids, best first]}`` for every test caption. Its ``coco_test_ids.npy`` lists
the 25,000 test caption ids: 5,000 images × 5 captions, each image's captions together, the images in the order of
the Karpathy test split. That is the order of SCAN's ``coco_precomp/testall_*`` files: ``testall_ids.txt`` holds the
image id of each caption line (25,000 lines) and equals the package's caption-to-image map read in that order, line
for line; and the first image (391895) has its captions in the package's order (770337, 771687, 772707, 776154,
781998) in ``testall_caps.txt`` too.

**How a split maps onto it.** A split's image ids (``{split}_ids.txt``, kept by ``gssf prepare --dataset precomp``)
name its images; caption row ``5i + j`` is then the j-th caption of image i in the package's order. The images may
come in any order; each image's 5 captions must be in SCAN's (= the package's) order.

**Rankings.** Each query's list holds its best ``depth`` items, ``depth`` being what the metrics read: R@K the first
K, R-precision and mAP@R the first R (the query's positives: at most 48 for an ECCV image query, 19 for a caption
query). The scores are the model's own (``score_fn``: its metric head, or its interaction over token sets), one row
block of S ``[N, 5N]`` at a time within the memory budget, both directions from one pass. Ties are broken by row (the
lower row first): a list needs some order, and the package has no tie rule. gssf's own R@K, reported beside them,
count ties against the query; with real-valued scores a tie among the top items is rare.

**What is reported** (percent, like gssf's R@K), beside the split's ``coco-5k`` metrics: ``eccv``:
``eccv_{i2t,t2i}_{r1,rprecision,map_at_r}``, over ECCV Caption's queries (1,261 images and 1,332 captions with
machine-and-human-verified positives; two of those images' positives are captions outside the test split, which no
ranking can retrieve: the package's data). ``cxc``: ``cxc_{i2t,t2i}_r{K}`` for each K of ``ks``, over CxC's
image–caption positives (5,000 images, 24,972 captions). CxC also rates image–image and caption–caption similarity
(its SIS and STS judgements); the package ships neither those judgements nor a metric for them, so CxC's i2i and t2t
retrieval are not reported.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import COCO_TRUTHS
from gssf_cli.data.precomp import read_image_ids

if TYPE_CHECKING:
    from torch import Tensor

    from gssf_cli.data.dataset import Dataset
    from gssf_cli.evaluation.ranking import ArrayLike, ScoreFn

PROTOCOLS = COCO_TRUTHS
"""The protocols of this module (the others: :data:`gssf_cli.evaluation.crossmodal.RANKING_PROTOCOLS`)."""
PACKAGE = "eccv_caption==0.1.0"
"""The package and version these protocols are computed by (pinned in pyproject.toml's ``all`` extra)."""
TEST_IMAGES = 5_000
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class CocoIds:
    """The COCO id of each row of a split: ``images`` ``[N]`` and ``captions`` ``[5N]`` (row ``5i + j``: the j-th
    caption of image i in the package's order)."""

    images: NDArray[np.int64]
    captions: NDArray[np.int64]


def _package() -> Any:
    """``eccv_caption``, imported quietly (it warns when the optional ujson and tqdm are missing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import eccv_caption
    except ImportError:
        raise UserInputError(
            f"--protocol eccv and cxc need the eccv_caption package: pip install '{PACKAGE}' (gssf[all] has it)"
        ) from None
    return eccv_caption


def _metrics() -> Any:
    """A fresh ``eccv_caption.Metrics`` (it reads its ground truths, ~2 MB of JSON, in about 0.1 s)."""
    return _package().Metrics()


def coco_test_captions() -> dict[int, list[int]]:
    """Each COCO test image's 5 caption ids, in the package's order (that of ``coco_test_ids.npy``)."""
    metrics = _metrics()
    captions: dict[int, list[int]] = {}
    for caption in metrics.coco_ids.tolist():
        captions.setdefault(int(metrics.coco_gts["t2i"][caption][0]), []).append(int(caption))
    return captions


def split_ids(dataset: Dataset, split_name: str, protocol: str) -> CocoIds:
    """The COCO ids of ``split_name``'s rows, or a one-line :class:`UserInputError` (before anything is embedded):
    a label-based dataset, a split without ids, other than 5 captions per image or 5,000 images, an id twice, or
    an id that is not a COCO test image. Reads only the ids file and the package's ids."""
    where = f"{dataset.folder} ({split_name} split)"
    manifest = dataset.manifest
    if dataset.task != "cross_modal":
        raise UserInputError(
            f"{where}: --protocol {protocol} ranks COCO images against captions; this is labelled data"
        )
    if split_name not in manifest["splits"]:
        raise UserInputError(f"{dataset.folder}: no {split_name!r} split (has {', '.join(manifest['splits'])})")
    name = f"{split_name}_ids.txt"
    if name not in manifest.get("files", {}):
        raise UserInputError(
            f"{where}: no COCO image ids ({name}); --protocol {protocol} ranks COCO's test images by id: prepare a "
            f"SCAN/VSE coco_precomp folder that has {name} (gssf prepare --dataset precomp keeps it)"
        )
    k = int(manifest["captions_per_image"])
    images = int(manifest["splits"][split_name]["images"])
    if k != CAPTIONS_PER_IMAGE:
        raise UserInputError(f"{where}: --protocol {protocol} needs COCO's 5 captions per image, this split has {k}")
    if images != TEST_IMAGES:
        raise UserInputError(
            f"{where}: --protocol {protocol} needs COCO's 5,000-image test split (SCAN's coco_precomp names it "
            f"testall: --split testall), this split has {images:,} images"
        )
    path = dataset.folder / name
    ids = read_image_ids(path, images, k)
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserInputError(f"{path}: image id {int(values[counts > 1][0])} names two images of the split")
    captions_of = coco_test_captions()
    unknown = [int(i) for i in ids if int(i) not in captions_of]
    if unknown:
        raise UserInputError(
            f"{path}: {len(unknown):,} of the split's image ids are not COCO test images (e.g. {unknown[0]}); "
            f"--protocol {protocol} needs the 5,000 images of the Karpathy COCO test split, by their COCO ids"
        )
    captions = np.array([captions_of[int(i)] for i in ids], dtype=np.int64).reshape(-1)
    return CocoIds(ids, captions)


def evaluate_coco(
    protocol: str,
    ids: CocoIds,
    images: ArrayLike,
    texts: ArrayLike,
    *,
    score_fn: ScoreFn | None = None,
    ks: Sequence[int] = (1, 5, 10),
    memory_budget_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """The split's ``coco-5k`` metrics (:func:`gssf_cli.evaluation.crossmodal.evaluate_cross_modal`) and the
    package's ECCV Caption or CxC metrics (:func:`package_metrics`), under ``protocol``: the shape
    ``evaluate_cross_modal`` returns (metrics, ``protocol``, ``folds``). images ``[5000, ·]``, texts ``[25000, ·]``
    in the rows ``ids`` names."""
    from gssf_cli.evaluation import crossmodal

    outcome = crossmodal.evaluate_cross_modal(
        images,
        texts,
        captions_per_image=CAPTIONS_PER_IMAGE,
        protocol="coco-5k",
        score_fn=score_fn,
        ks=ks,
        memory_budget_bytes=memory_budget_bytes,
    )
    folds = outcome.pop("folds")
    outcome.pop("protocol")
    outcome.update(
        package_metrics(protocol, ids, images, texts, score_fn=score_fn, ks=ks, memory_budget_bytes=memory_budget_bytes)
    )
    return {**outcome, "protocol": protocol, "folds": folds}


def package_metrics(
    protocol: str,
    ids: CocoIds,
    images: ArrayLike,
    texts: ArrayLike,
    *,
    score_fn: ScoreFn | None = None,
    ks: Sequence[int] = (1, 5, 10),
    memory_budget_bytes: int = 256 * 2**20,
) -> dict[str, float]:
    """ECCV Caption's R@1, R-precision and mAP@R (``eccv``) or CxC's R@K (``cxc``), both directions, in percent, as
    the package computes them from the rankings of :func:`top_rankings`."""
    from gssf_cli.evaluation.ranking import check_ks

    if protocol not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {protocol!r} here; choose one of {', '.join(PROTOCOLS)}")
    cutoffs = check_ks(ks)
    metrics = _metrics()
    truth = metrics.eccv_gts if protocol == "eccv" else metrics.cxc_gts
    deepest = {direction: max(cutoffs) for direction in ("i2t", "t2i")}
    if protocol == "eccv":
        deepest = {direction: max(len(items) for items in truth[direction].values()) for direction in deepest}
    i2t_rows, t2i_rows = top_rankings(
        images,
        texts,
        score_fn=score_fn,
        depths=(deepest["i2t"], deepest["t2i"]),
        memory_budget_bytes=memory_budget_bytes,
    )
    retrieved = {
        "i2t": dict(zip(ids.images.tolist(), ids.captions[i2t_rows].tolist(), strict=True)),
        "t2i": dict(zip(ids.captions.tolist(), ids.images[t2i_rows].tolist(), strict=True)),
    }
    out: dict[str, float] = {}
    with contextlib.redirect_stderr(io.StringIO()):  # its ECCV loop draws a tqdm bar whenever tqdm is installed
        if protocol == "eccv":
            scores = metrics.eccv_metrics(retrieved, "all")
            for name in ("r1", "rprecision", "map_at_r"):
                for direction in ("i2t", "t2i"):
                    out[f"eccv_{direction}_{name}"] = 100.0 * float(scores[f"eccv_{name}"][direction])
        else:
            for direction in ("i2t", "t2i"):
                for cutoff in cutoffs:
                    recall = metrics.cxc_recalls(retrieved, direction, K=cutoff)[direction]
                    out[f"cxc_{direction}_r{cutoff}"] = 100.0 * float(recall)
    return out


def top_rankings(
    images: ArrayLike,
    texts: ArrayLike,
    *,
    score_fn: ScoreFn | None = None,
    depths: tuple[int, int] = (10, 10),
    memory_budget_bytes: int = 256 * 2**20,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Each image's best ``depths[0]`` text rows ``[N, ·]`` and each text's best ``depths[1]`` image rows
    ``[M, ·]``, best first, ties broken by the lower row; from one pass over image-row blocks of S ``[N, M]``
    (``score_fn(images, texts)``, default inner product), each block a third of the budget (it is transposed once,
    for the texts' side)."""
    import torch

    from gssf_cli.evaluation import ranking

    n, m = int(images.shape[0]), int(texts.shape[0])
    i2t_depth, t2i_depth = min(depths[0], m), min(depths[1], n)
    i2t: list[Tensor] = []
    best = torch.empty(m, 0)
    best_rows = torch.empty(m, 0, dtype=torch.long)
    chunks = ranking.iter_score_chunks(
        images, texts, score_fn=score_fn, memory_budget_bytes=max(1, memory_budget_bytes // 3)
    )
    for start, block in chunks:
        positions = _best_positions(block, i2t_depth)
        i2t.append(_by_score(block.gather(1, positions), positions))
        columns = block.T.contiguous()
        del block
        positions = _best_positions(columns, min(t2i_depth, columns.shape[1]))
        merged = torch.cat([best.to(columns.dtype), columns.gather(1, positions)], dim=1)
        merged_rows = torch.cat([best_rows, start + positions], dim=1)
        del columns
        kept = _best_positions(merged, min(t2i_depth, merged.shape[1]))
        best, best_rows = merged.gather(1, kept), merged_rows.gather(1, kept)
    return torch.cat(i2t).numpy(), _by_score(best, best_rows).numpy()


def _best_positions(values: Tensor, depth: int) -> Tensor:
    """Positions ``[r, depth]`` of the ``depth`` largest values in each row of ``values`` ``[r, c]``, in increasing
    position; of values tied at the cut, the lower positions. ``torch.topk`` picks them; the rows where the value
    after the cut equals the last one kept (a tie that topk may break either way) are picked again by position."""
    import torch

    rows, columns = values.shape
    if depth >= columns:
        return torch.arange(columns).expand(rows, columns)
    top = torch.topk(values, depth + 1, dim=1)
    positions = top.indices[:, :depth]
    cut = (top.values[:, depth - 1] == top.values[:, depth]).nonzero()[:, 0]
    if len(cut):
        tied, threshold = values[cut], top.values[cut, depth - 1 : depth]
        above, at = tied > threshold, tied == threshold
        room = depth - above.sum(dim=1, keepdim=True)
        keep = above | (at & (at.cumsum(dim=1) <= room))
        positions = positions.clone()
        positions[cut] = keep.nonzero()[:, 1].view(len(cut), depth)
    return positions.sort(dim=1).values


def _by_score(values: Tensor, items: Tensor) -> Tensor:
    """``items`` ``[r, d]`` reordered by ``values`` (same shape) descending; equal values keep their order."""
    import torch

    return items.gather(1, torch.sort(values, dim=1, descending=True, stable=True).indices)
