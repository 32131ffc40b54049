"""Allowed names and ranges, written once: the configs and the library both check values against these.

Why a module of its own: ``gssf_cli.core.config`` validates what a user typed, and the library (losses, encoders,
similarity) validates what a Python caller passes. When each wrote its own rule they drifted (a temperature
``> 0`` in one place and ``[0.01, 1]`` in another), so a value passed the up-front check and crashed later.
Both now read the :class:`Range` objects and name tuples below. Standard library only: ``gssf --help``
imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from gssf_cli.core.errors import UserInputError


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of finite numbers: NaN and ±Inf are never inside, whatever the bounds (a
    setting of ``inf`` is always a typo or an overflow, and it turns a run's numbers into NaN)."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value >= self.low if self.low_inclusive else value > self.low)
        below = self.high is None or (value <= self.high if self.high_inclusive else value < self.high)
        return above and below

    def describe(self) -> str:
        """The rule in words, as error messages print it."""
        if self.high is None and self.low is not None:
            if self.low == 0:
                return "must not be negative" if self.low_inclusive else "must be positive"
            return f"must be at least {_number(self.low)}" if self.low_inclusive else f"must exceed {_number(self.low)}"
        if self.low is not None and self.high is not None:
            if not self.low_inclusive and not self.high_inclusive:
                return f"must be between {_number(self.low)} and {_number(self.high)}"
            left = "[" if self.low_inclusive else "("
            right = "]" if self.high_inclusive else ")"
            return f"must be in {left}{_number(self.low)}, {_number(self.high)}{right}"
        return "must be a number"

    def check(self, key: str, value: float) -> float:
        """``value`` if inside; else a one-line :class:`UserInputError` naming ``key``."""
        check_finite(key, value)
        if not self.contains(value):
            raise UserInputError(f"{key}: {self.describe()}, got {value}")
        return value


def check_finite(key: str, value: object) -> None:
    """A float setting must be a finite number: a one-line :class:`UserInputError` naming ``key`` for NaN or ±Inf
    (other values pass; their type and range are checked elsewhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserInputError(f"{key}: must be a finite number, got {value}")


def _number(value: float) -> str:
    """Whole numbers in full (``16,777,216``, never ``1.67772e+07``), others as ``%g``."""
    return f"{int(value):,}" if float(value).is_integer() and abs(value) >= 1e6 else f"{value:g}"


AT_LEAST_ONE = Range(1)
MAX_EMBED_DIM = 2**24
"""The largest embedding size D a config accepts: far above any model's (a dense head of this size would have
2.8 * 10^14 parameters), and small enough that its divisors (the valid block sizes) come from trial division."""
EMBED_DIM = Range(1, MAX_EMBED_DIM)
AT_LEAST_TWO = Range(2)
POSITIVE = Range(0, low_inclusive=False)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, low_inclusive=False, high_inclusive=False)
SHARE = Range(0, 1, high_inclusive=False)
"""A share of items that may be none but not all: [0, 1)."""
TEMPERATURE = Range(0.01, 1.0)
"""InfoNCE's τ and the distillation's learnable τ₂ live here; a learnable one is clamped to it."""
MARGIN = NON_NEGATIVE
"""A hinge margin of 0 is a valid (if unusual) ranking loss."""
OPSET = Range(18, 23)
"""Opsets the dynamo ONNX exporter supports."""

MIN_SPLIT_CLASSES = 2
"""A label-based dev/test split needs at least this many classes: with one, every item is relevant to every
query, so every metric is perfect whatever the model does (and the first epoch is always "best")."""
MIN_CLASS_ITEMS = 2
"""... and at least one class with this many items: a query needs a positive among the other items."""
MIN_SPLIT_IMAGES = 2
"""A cross-modal dev/test split needs at least this many images: with one there is nothing to rank."""

SimilarityName = Literal["cosine", "diag", "bdiag", "dense", "gssf"]
SIMILARITY_NAMES: tuple[str, ...] = get_args(SimilarityName)
BLOCK_SIMILARITIES: tuple[str, ...] = ("bdiag", "gssf")
"""Members of the family with a block size (it must divide the embedding size)."""
ScoreNorm = Literal["none", "frobenius", "spectral"]
NORM_NAMES: tuple[str, ...] = get_args(ScoreNorm)
LossName = Literal["triplet", "infonce"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
DistillKind = Literal["mae", "mse"]
DISTILL_KINDS: tuple[str, ...] = get_args(DistillKind)
Pooling = Literal["mean", "max", "attention"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
Device = Literal["auto", "cpu", "cuda"]
EncoderKind = Literal["trained", "identity", "frozen"]
ENCODER_KINDS: tuple[str, ...] = get_args(EncoderKind)
"""``trained``: towers learned with the head; ``identity`` and ``frozen``: the head alone (plus optional adapters)
over the dataset's features or over a trained run's frozen encoders."""
LrSchedule = Literal["cosine", "step", "constant"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
DatasetKind = Literal["synthetic", "digits", "precomp", "features", "imbalance"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)
IndexKind = Literal["flat", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)
"""faiss index kinds of ``gssf index`` (built by :mod:`gssf_cli.deploy.search`, whose registry a test keeps equal)."""
Protocol = Literal["all", "f30k-1k", "coco-1k", "coco-5k", "eccv", "cxc"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
"""Cross-modal evaluation protocols (see :func:`gssf_cli.evaluation.crossmodal.evaluate_cross_modal`; ``eccv`` and
``cxc``, the COCO 5K test split against ECCV Caption's and CxC's extra positives, by
:mod:`gssf_cli.evaluation.coco_protocols`)."""
COCO_TRUTHS: tuple[str, ...] = ("eccv", "cxc")
"""Protocols that judge a COCO 5K test split by other ground truths than COCO's (through ``eccv_caption``)."""
Task = Literal["cross_modal", "labels"]
TASKS: tuple[str, ...] = get_args(Task)
ImageKind = Literal["regions", "global", "features"]
"""An image tower's input: regions ``[B, R, F]``, one global feature ``[B, F]``, or a feature tower's ``[B, F]``."""
IMAGE_KINDS: tuple[str, ...] = get_args(ImageKind)
TextKind = Literal["captions", "features"]
TEXT_KINDS: tuple[str, ...] = get_args(TextKind)
Interaction = Literal["none", "scan-t2i", "scan-i2t", "maxsim"]
INTERACTIONS: tuple[str, ...] = get_args(Interaction)
"""How a pair is scored: ``none``, pooled embeddings through the metric head (the embedding-based family);
otherwise from the towers' token outputs (the interaction-based family): SCAN's stacked cross attention, text to
image or image to text, or late interaction (``maxsim``)."""
GssfAt = Literal["relevance", "attention", "both"]
GSSF_AT: tuple[str, ...] = get_args(GssfAt)
"""Where SCAN's learned token similarity acts: the word-vs-attended relevance, the attention logits, or both."""
Aggregate = Literal["lse", "mean"]
AGGREGATES: tuple[str, ...] = get_args(Aggregate)


@dataclass(frozen=True)
class ScanSettings:
    """SCAN's published settings of one direction: attention sharpness λ₁ (``lambda_softmax``), LogSumExp λ₂
    (``lambda_lse``) and the aggregate. From the SCAN authors' README (kuanghuei/SCAN, "Arguments used to train
    Flickr30K models": t-i LSE ``--lambda_lse=6 --lambda_softmax=9``, i-t LSE ``--lambda_lse=5
    --lambda_softmax=4``; both ``--agg_func=LogSumExp``, ``--raw_feature_norm clipped_l2norm``)."""

    lambda_softmax: float
    lambda_lse: float
    aggregate: str = "lse"


SCAN_SETTINGS: dict[str, ScanSettings] = {
    "scan-t2i": ScanSettings(lambda_softmax=9.0, lambda_lse=6.0),
    "scan-i2t": ScanSettings(lambda_softmax=4.0, lambda_lse=5.0),
}
"""The defaults of ``--lambda-softmax``, ``--lambda-lse`` and ``--aggregate`` by SCAN direction: the one place
they are written."""
TOKEN_BLOCK_ELEMENTS = 2**20
"""Token pairs (images × regions × captions × words) one block of interaction scores holds, in torch and on ONNX
Runtime alike: the bound on the working set. Measured at 200 images × 36 regions against 1,000 captions × 12
words, D = 1024 (2 cores): 2^20 was the fastest of 2^19–2^22, both for the bare GEMM and for SCAN over it."""


def token_block_shape(
    images: int, regions: int, captions: int, words: int, budget: int = TOKEN_BLOCK_ELEMENTS
) -> tuple[int, int]:
    """Images and captions per block of interaction scores: about as many region rows as word columns in its GEMM
    (``√budget`` each; a skinny ``[bi·R, D] × [D, L]`` block runs far below the GEMM's speed), within ``budget``
    token pairs (one pair at least), the spare going to the side that has more."""
    side = math.isqrt(budget)
    per_image = max(1, budget // max(1, regions * words))
    captions_per_block = max(1, min(captions, side // max(1, words), per_image))
    images_per_block = max(1, min(images, per_image // captions_per_block))
    captions_per_block = max(1, min(captions, per_image // images_per_block))
    return images_per_block, captions_per_block


def valid_block_sizes(dim: int) -> list[int]:
    """The divisors of ``dim`` in increasing order: the block sizes ``bdiag``/``gssf`` accept.

    Plain trial division up to sqrt(dim): at most :data:`MAX_EMBED_DIM` (2^24) costs 4,096 steps.
    """
    small = [k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0]
    return sorted({*small, *(dim // k for k in small)})


MAX_LISTED_SIZES = 32
"""An error message lists at most this many valid block sizes (10^30 has 961)."""


def check_block_size(name: str, dim: int, block_size: int | None) -> int:
    def sizes() -> str:  # listed only in an error message: valid sizes need a factorisation
        found = valid_block_sizes(dim)
        if len(found) <= MAX_LISTED_SIZES:
            return ", ".join(map(str, found))
        return ", ".join(map(str, found[: MAX_LISTED_SIZES - 1])) + f", …, {dim} ({len(found)} in all)"

    if block_size is None:
        raise UserInputError(f"similarity {name!r} needs a block size; valid block sizes: {sizes()}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UserInputError(f"block size must be a positive integer, got {block_size!r}; valid block sizes: {sizes()}")
    if dim % block_size:
        raise UserInputError(
            f"block size {block_size} does not divide the embedding size {dim}; valid block sizes: {sizes()}"
        )
    return block_size


REGISTERED_NAME_FORBIDDEN = ("/", ":")
MAX_REGISTERED_NAME = 256


def check_registered_name(key: str, name: str) -> None:
    """A Model Registry name MLflow accepts (not blank, no ``/`` or ``:``, not path-like), checked before any run."""
    if not name.strip():
        raise UserInputError(f"{key}: a registered model name cannot be blank")
    if any(c in name for c in REGISTERED_NAME_FORBIDDEN) or name != name.strip() or ".." in name:
        raise UserInputError(f"{key}: {name!r} is not a valid registered model name (no '/', ':', '..' or edge spaces)")
    if len(name) > MAX_REGISTERED_NAME:
        raise UserInputError(f"{key}: a registered model name has at most {MAX_REGISTERED_NAME} characters")


def model_label(metric: str, block_size: int | None, interaction: str = "none") -> str:
    """What a run or model name says of a model: the interaction if any, the metric and its block size
    (``gssf-d64``, ``cosine``, ``scan-t2i-gssf-d64``)."""
    head = f"{metric}-d{block_size}" if block_size else metric
    return head if interaction == "none" else f"{interaction}-{head}"


AUTO_LR = 5e-4
"""``--lr`` left unset (auto) at the paper's scale: the host frameworks' AdamW rate (VSE∞/SGRAF), for budgets of
:data:`AUTO_LR_PAPER_STEPS` optimizer steps or more (F30K's precomp recipe, 25 epochs of 145,000 pairs in batches
of 128, has 28,325); also the rate of every run :func:`auto_lr` does not scale."""
AUTO_LR_PAPER_STEPS = 20_000
AUTO_LR_SMALL = 2e-3
"""``--lr`` left unset for a budget of :data:`AUTO_LR_SMALL_STEPS` optimizer steps or fewer: four times the paper's
rate (see :func:`auto_lr` for what chose it)."""
AUTO_LR_SMALL_STEPS = 500


def optimizer_steps(epochs: int, pairs: int, batch_size: int) -> int:
    """The optimizer steps of a budget: ``epochs`` × ⌈``pairs`` / ``batch_size``⌉ (batches of training pairs)."""
    return epochs * math.ceil(pairs / batch_size)


def auto_lr(steps: int, *, paired: bool = True, head_only: bool = False) -> float:
    """The learning rate of a run that leaves ``--lr`` unset, from the ``steps`` of its budget
    (:func:`optimizer_steps`): :data:`AUTO_LR` (5e-4) at :data:`AUTO_LR_PAPER_STEPS` (20,000) steps or more,
    :data:`AUTO_LR_SMALL` (2e-3) at :data:`AUTO_LR_SMALL_STEPS` (500) or fewer, log-linear in the steps between
    (``2e-3 · (500 / steps)^0.376``: 1.87e-3 at 600 steps, 1.02e-3 at 3,000); never rising with the steps. Runs it
    does not scale keep :data:`AUTO_LR`: label data (``paired`` False) and ``head_only`` runs.

    Why: 5e-4 suits the paper's tens of thousands of steps and starves a run of a few hundred. Under the cosine
    schedule a run averages half its rate, so at 5e-4 its weights move a quarter as far per step as a hand-written
    Adam at a constant 1e-3; at 2e-3 as far. Test rSum at 5e-4 / 2e-3 / 4e-3 (D = 64, cosine head): digit halves,
    200 steps 313 / 350 / 364, 600 steps 362 / 371 / 374; two opposite digit quadrants, harder, 200 steps 78 / 103
    / 101 (at 3e-3), 600 steps 100 / 109 / 99. Synthetic captions through a GRU, 640 steps: 199 at 5e-4, 360 at
    1.85e-3; SCAN over them, 240 steps: 277 / 559. A rate near 2e-3 gains much on each, and past it the harder
    problem loses. Label data (digits, unseen test classes, 255 steps: MAP@R 0.53 / 0.46 / 0.40) and a head alone
    (digit halves, the head at 100x the rate, 200 steps: rSum 68 / 61 / 63) lose with a higher rate: they keep 5e-4.
    """
    if steps < 1:
        raise ValueError(f"a budget has at least one optimizer step, got {steps}")
    if not paired or head_only or steps >= AUTO_LR_PAPER_STEPS:
        return AUTO_LR
    if steps <= AUTO_LR_SMALL_STEPS:
        return AUTO_LR_SMALL
    share = math.log(steps / AUTO_LR_SMALL_STEPS) / math.log(AUTO_LR_PAPER_STEPS / AUTO_LR_SMALL_STEPS)
    return AUTO_LR_SMALL * (AUTO_LR / AUTO_LR_SMALL) ** share
