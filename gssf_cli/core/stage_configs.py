"""The stage configs: one frozen dataclass per stage (prepare, train, evaluate, export, tune, pipeline, compare,
index, search), whose field defaults are the only defaults in the project.

Each field is a :func:`~gssf_cli.core.config.setting` (default, help for its flag, allowed range); adding a
setting is one line here plus the code that uses it. Standard library only, so ``gssf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from gssf_cli.core import limits
from gssf_cli.core.config import coerce, load_toml, setting
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import (
    SCAN_SETTINGS,
    Aggregate,
    DatasetKind,
    Device,
    DistillKind,
    EncoderKind,
    GssfAt,
    IndexKind,
    Interaction,
    LossName,
    LrSchedule,
    Pooling,
    Protocol,
    ScoreNorm,
    SimilarityName,
)

RUN_REF = "id, 8+ character prefix, name or 'latest'"
"""What every option naming a run takes (what gssf prints can be passed back): written once for their help."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """How ``gssf prepare`` turns a source into a dataset folder.

    ``source`` is required for ``precomp`` and ``features``; the sizes apply to ``synthetic`` only.
    """

    dataset: DatasetKind = setting(help="Kind of source:")
    out: Path = setting(help="Dataset folder to create, e.g. data/syn.")
    source: Path | None = setting(None, help="Input folder or file (precomp, features).")
    seed: int = setting(0, help="Random seed (generation and splits).")
    force: bool = setting(False, help="Replace an existing output folder.", flag="--force")
    train_images: int = setting(2000, help="synthetic: train images.", within=limits.AT_LEAST_ONE)
    dev_images: int = setting(250, help="synthetic: dev images.", within=limits.AT_LEAST_ONE)
    test_images: int = setting(250, help="synthetic: test images.", within=limits.AT_LEAST_ONE)
    regions: int = setting(12, help="synthetic: regions per image.", within=limits.AT_LEAST_ONE)
    region_dim: int = setting(64, help="synthetic: region feature size.", within=limits.AT_LEAST_ONE)
    concepts: int = setting(
        32,
        help="synthetic: latent concepts (at least 3), each named by a colour and a shape ('red square'); a size "
        "joins past 144, a texture past 576, 'number K' past 2,304.",
        within=limits.AT_LEAST_ONE,
    )
    vocab_size: int = setting(
        400,
        help="synthetic: the most distinct words captions use: 3 synonyms of each colour, shape, ... in use (72 for "
        "24-144 concepts), then filler words (there, is, beside, ...) while they fit, 39 at most.",
    )
    captions_per_image: int = setting(5, help="Captions per image (5 for COCO/F30K).", within=limits.AT_LEAST_ONE)
    min_word_count: int = setting(4, help="precomp: minimum count of a vocabulary word.", within=limits.AT_LEAST_ONE)
    dev_fraction: float = setting(0.1, help="features/digits: share of data for dev.", within=limits.FRACTION)
    test_fraction: float = setting(0.2, help="features: share of data for test.", within=limits.FRACTION)
    caption_noise: float = setting(
        0.0, help="Imbalance: share of caption words replaced by random vocabulary words.", within=limits.SHARE
    )
    caption_insufficiency: float = setting(
        0.0, help="Imbalance: share of content words dropped (each caption keeps one).", within=limits.SHARE
    )
    region_noise: float = setting(
        0.0, help="Imbalance: Gaussian noise on regions, in units of each region's RMS.", within=limits.NON_NEGATIVE
    )
    region_insufficiency: float = setting(
        0.0, help="Imbalance: share of concept regions replaced by clutter.", within=limits.SHARE
    )
    imbalance_splits: tuple[str, ...] = setting(("train",), help="Imbalance: the splits it applies to, e.g. train,dev.")

    def imbalanced(self) -> bool:
        return any((self.caption_noise, self.caption_insufficiency, self.region_noise, self.region_insufficiency))

    def validate(self) -> None:
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise UserInputError("prepare.dev_fraction + prepare.test_fraction: must leave data for training")
        if self.dataset in ("precomp", "features", "imbalance") and self.source is None:
            raise UserInputError(f"--source is required for --dataset {self.dataset}: point it at your data")
        if self.imbalanced() and self.dataset not in ("synthetic", "imbalance"):
            raise UserInputError(
                f"the imbalance options apply to --dataset synthetic, or to an existing image–caption dataset folder "
                f"with --dataset imbalance --source DATA; not to --dataset {self.dataset}"
            )
        if self.dataset == "imbalance" and not self.imbalanced():
            raise UserInputError(
                "--dataset imbalance makes a dataset imbalanced: give --caption-noise, --caption-insufficiency, "
                "--region-noise or --region-insufficiency"
            )
        unknown = sorted(set(self.imbalance_splits) - {"train", "dev", "test"})
        if unknown or not self.imbalance_splits:
            raise UserInputError(
                f"--imbalance-splits: splits among train, dev, test (got {', '.join(unknown) or 'none'})"
            )


EmbeddingMetric = Literal["cosine", "dot"]


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What ``gssf evaluate`` scores and how.

    ``embeddings`` is an ``.npz`` file (see :mod:`gssf_cli.evaluation.evaluate` for its keys); ``run`` is a
    trained run (id or ``latest``) evaluated on its dataset (or ``data``), split ``test`` unless given. ``head``
    scores the ``embeddings`` with a trained run's metric head instead of ``metric``. ``metric``:
    ``cosine`` L2-normalises both sides first, ``dot`` scores raw inner products. ``split`` picks
    ``{split}_images``-style keys when the file holds several splits. ``output`` also writes the results to a
    ``.json`` file that says what was measured (see :func:`gssf_cli.evaluation.evaluate.results_document`), replacing a
    file of that name; it is checked before anything runs (:meth:`check_output`).
    """

    embeddings: Path | None = setting(
        None,
        help=".npz with images+texts (cross-modal), features+labels, or queries/query_labels/gallery/gallery_labels.",
    )
    run: str | None = setting(None, help=f"A trained run ({RUN_REF}): evaluate it on its dataset.")
    head: str | None = setting(
        None,
        help=f"With --embeddings: score them with this trained run's metric head ({RUN_REF}); the arrays are what "
        "its head reads: features for --encoder identity runs (its adapters apply), else its towers' outputs.",
    )
    data: Path | None = setting(None, help="With --run: use this dataset folder instead.")
    protocol: Protocol = setting(
        "all",
        help="Cross-modal protocol (f30k-1k: 1,000 test images; coco-1k: 5 folds of 1,000; coco-5k: 5,000 at once; "
        "eccv, cxc: the COCO 5K test split against ECCV Caption's or CxC's positives, by its COCO ids; all: the split "
        "as it is):",
    )
    split: str | None = setting(None, help="Use {split}_-prefixed keys of the file (default: test if present).")
    ks: tuple[int, ...] = setting((1, 5, 10), help="Cut-offs for R@K, e.g. 1,5,10.", flag="--k")
    metric: EmbeddingMetric = setting("cosine", help="Score of the embeddings (cosine: L2-normalise first):")
    memory_budget_mb: int = setting(256, help="Memory for score chunks, MiB.", within=limits.AT_LEAST_ONE)
    full_map: bool = setting(
        False,
        help="Label-based: also mAP over each query's full ranking (sorts most of every row; MAP@R needs only the top R).",
    )
    shortlist: int | None = setting(
        None,
        help="With --run of an interaction model: rank by the pooled embeddings and re-score each query's top K "
        "with the interaction (approximate; says how many exact top-10 items it missed).",
        within=limits.AT_LEAST_ONE,
    )
    plots: bool = setting(True, help="Log plots to MLflow.")
    output: Path | None = setting(
        None,
        help="Also write the results to this .json file: dataset, model, metrics (with CLIP_benchmark's names).",
    )

    def validate(self) -> None:
        if (self.embeddings is None) == (self.run is None):
            raise UserInputError("give exactly one of --embeddings FILE.npz or --run RUN (a run id or 'latest')")
        if self.data is not None and self.run is None:
            raise UserInputError("--data applies to --run only (it overrides the run's dataset folder)")
        if self.head is not None and self.embeddings is None:
            raise UserInputError(
                "--head RUN scores an --embeddings file with a run's metric head; with --run the run's own head scores"
            )
        if self.shortlist is not None and self.run is None:
            raise UserInputError("--shortlist K re-scores a trained interaction run's top K: give --run RUN")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UserInputError(f"evaluate.ks: cut-offs must be positive integers, got {list(self.ks)}")
        self.check_output()

    def check_output(self) -> None:
        """Refuse an ``output`` that cannot become the results file, without creating anything: it must be named
        ``*.json``, not be a folder, and sit in an existing folder this process may write to (the file is
        written there under a temporary name, then renamed)."""
        import os

        if self.output is None:
            return
        out, folder = self.output, self.output.parent
        if out.suffix.lower() != ".json":
            raise UserInputError(f"--output {out}: the results file must be named *.json")
        if out.is_dir():
            raise UserInputError(f"--output {out}: is a folder; name a file in it, e.g. {out / 'results.json'}")
        if not folder.exists():
            raise UserInputError(f"--output {out}: the folder {folder} does not exist; create it first")
        if not folder.is_dir():
            raise UserInputError(f"--output {out}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserInputError(f"--output {out}: the folder {folder} is not writable; choose another --output")


HEAD_LR_SCALES: dict[str, float] = {"trained": 1.0, "head_only": 100.0}
"""The metric head's default learning-rate multiple, by mode (measured on scikit-learn's digits as two views, 3
seeds, 20 epochs, ``--lr`` 5e-4). With trained towers the head at 1×, 20× or 100× gave the same test rSum
(bdiag d = 64: 343.4 ± 5.6, 346.3 ± 4.2, 346.6 ± 7.1; sample std) and never collapsed, so it keeps the towers' rate. Head-only,
the head is all that learns and it must move far from the identity: at 1× it learned nothing in 20 epochs (best
epoch 1, rSum 15.0 as cosine), at 40× 178.6, at 100× 193.9 ± 3.9 (stable over seeds), at 200× 204.4."""


def _scan_defaults(setting: str) -> str:
    """SCAN's published default of ``setting`` per direction, for a flag's help: ``9 for scan-t2i, 4 for ...``."""
    return ", ".join(f"{getattr(published, setting):g} for {kind}" for kind, published in SCAN_SETTINGS.items())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How ``gssf train`` learns encoders and a metric head.

    Defaults follow the host frameworks (VSE∞/SGRAF): D = 1024, batch 128, AdamW at 5e-4 at their scale (left
    unset, the rate follows the budget's optimizer steps: :func:`gssf_cli.core.limits.auto_lr`), gradient clipping 2.0, hinge margin 0.2 with one warm-up epoch over all negatives.
    Weight decay applies to the metric head only (an unconstrained W could otherwise win the fixed margin
    by growing). ``distill_weight`` > 0 adds structure-aware distillation with the raw input features as
    teachers, or the arrays of ``teacher`` (an .npz with ``images`` [N, Fi] and ``texts`` [kN, Ft] for the
    train split).
    """

    data: Path = setting(help="Dataset folder from `gssf prepare`.")
    metric: SimilarityName = setting("gssf", help="Metric head:")
    block_size: int = setting(64, help="Block size d for bdiag/gssf (divides --embed-dim).", within=limits.AT_LEAST_ONE)
    metric_norm: ScoreNorm = setting("none", help="Score normalisation:")
    interaction: Interaction = setting(
        "none",
        help="How a pair is scored: none (pooled embeddings through the metric head); from the towers' tokens, "
        "with the metric as token similarity: scan-t2i, scan-i2t (SCAN's stacked cross attention), maxsim (late "
        "interaction):",
    )
    gssf_at: GssfAt | None = setting(
        None,
        help="SCAN: where the learned similarity acts, word-vs-attended relevance, attention logits or both "
        "(default relevance):",
    )
    aggregate: Aggregate | None = setting(
        None, help="SCAN: relevances to one pair score by LogSumExp or mean (default lse):"
    )
    lambda_softmax: float | None = setting(
        None,
        help=f"SCAN: attention sharpness λ1 (default {_scan_defaults('lambda_softmax')}).",
        within=limits.POSITIVE,
    )
    lambda_lse: float | None = setting(
        None,
        help=f"SCAN: LogSumExp λ2 (default {_scan_defaults('lambda_lse')}).",
        within=limits.POSITIVE,
    )
    embed_dim: int = setting(1024, help="Embedding size D.", within=limits.EMBED_DIM)
    encoder: EncoderKind = setting(
        "trained",
        help="Encoders: trained (learned with the head); identity (the head alone over the dataset's features); "
        "frozen (the head alone over --encoder-run's encoders):",
    )
    encoder_run: str | None = setting(
        None, help="--encoder frozen: the trained run (id) whose encoders embed the data."
    )
    adapter: bool = setting(
        False, help="Head only: a linear adapter per side (features -> D, starting at the identity) before the head."
    )
    word_dim: int = setting(300, help="Word embedding size.", within=limits.AT_LEAST_ONE)
    pooling: Pooling = setting("mean", help="Region and token pooling:")
    mlp: bool = setting(False, help="2-layer MLP residual on region projections (VSE∞).")
    mlp_layers: int | None = setting(
        None,
        help="Layers of a feature tower (1 = one linear projection; default: by dataset kind).",
        within=limits.AT_LEAST_ONE,
    )
    mlp_hidden: int | None = setting(
        None,
        help="Hidden width of feature-tower MLPs and of --mlp (default: by dataset kind).",
        within=limits.AT_LEAST_ONE,
    )
    gru_layers: int = setting(1, help="Layers of the caption GRU.", within=limits.AT_LEAST_ONE)
    epochs: int = setting(20, help="Epochs (numbered from 1 in output and MLflow).", within=limits.AT_LEAST_ONE)
    batch_size: int = setting(128, help="Pairs per batch (negatives come from the batch).", within=limits.AT_LEAST_TWO)
    lr: float | None = setting(
        None,
        help=f"AdamW learning rate (default: by the budget's optimizer steps S = epochs x ceil(train pairs / "
        f"batch size): {limits.AUTO_LR_SMALL:g} at S <= {limits.AUTO_LR_SMALL_STEPS:,}, {limits.AUTO_LR:g} at "
        f"S >= {limits.AUTO_LR_PAPER_STEPS:,}, log-linear between; {limits.AUTO_LR:g} for label data and "
        "head-only runs).",
        within=limits.POSITIVE,
    )
    head_lr_scale: float | None = setting(
        None,
        help="The metric head (and a head-only run's adapters) learns at this multiple of --lr (default: "
        f"{HEAD_LR_SCALES['trained']:g} with trained towers, {HEAD_LR_SCALES['head_only']:g} head-only).",
        within=limits.POSITIVE,
    )
    lr_schedule: LrSchedule = setting(
        "cosine",
        help="Learning rate over the budget: cosine (to 0 at the last step), step (x --lr-decay after "
        "--lr-decay-epoch), constant:",
    )
    lr_decay_epoch: int | None = setting(
        None,
        help="step schedule: epochs at the full lr, then x --lr-decay (default: half of --epochs).",
        within=limits.NON_NEGATIVE,
    )
    lr_decay: float = setting(0.1, help="step schedule: learning-rate decay factor.", within=limits.NON_NEGATIVE)
    weight_decay: float = setting(1e-4, help="Weight decay of the metric head.", within=limits.NON_NEGATIVE)
    warmup_epochs: int = setting(
        1, help="Epochs 1..N sum over all negatives; hardest negatives from epoch N+1.", within=limits.NON_NEGATIVE
    )
    grad_clip: float = setting(2.0, help="Gradient-norm clipping (0 = off).", within=limits.NON_NEGATIVE)
    loss: LossName = setting("triplet", help="Ranking loss:")
    margin: float = setting(0.2, help="Hinge margin.", within=limits.MARGIN)
    temperature: float = setting(0.05, help="InfoNCE temperature.", within=limits.TEMPERATURE)
    distill_weight: float = setting(
        0.0, help="Structure-aware distillation weight (0 = off).", within=limits.NON_NEGATIVE
    )
    distill_kind: DistillKind = setting("mae", help="Distillation distance:")
    distill_use_metric: bool = setting(
        False, help="Relations from the learned metric.", flag="--distill-use-metric/--distill-use-cosine"
    )
    teacher: Path | None = setting(None, help="Teacher features .npz (images, texts) for the train split.")
    seed: int = setting(0, help="Random seed.")
    device: Device = setting("auto", help="Device:")
    threads: int = setting(
        0,
        help="CPU threads for torch (0 = the cores no other process is busy on; with --workers: per worker, default 1).",
        within=limits.NON_NEGATIVE,
    )
    amp: bool = setting(False, help="Automatic mixed precision (bfloat16; float16 with loss scaling on older GPUs).")
    workers: int = setting(
        1,
        help="Data-parallel workers on Ray Train (DDP): each encodes 1/N of every batch, hardest negatives are mined "
        "over the whole batch.",
        within=limits.AT_LEAST_ONE,
    )
    address: str | None = setting(
        None, help="Run the workers on a running Ray cluster (HOST:6379 or ray://HOST:10001) instead of a local Ray."
    )
    max_failures: int = setting(
        0,
        help="With --workers: restarts of the worker group, from the last checkpoint, after a lost worker "
        "(0: the run ends FAILED and --resume continues it).",
        within=limits.NON_NEGATIVE,
    )
    val_split: str = setting("dev", help="Split that picks the best epoch.")
    runs_dir: Path = setting(Path("runs"), help="Where run folders (checkpoints) are written.")

    def validate(self) -> None:
        if self.max_failures > 0 and self.workers < 2:
            raise UserInputError(
                f"train.max_failures: restarts a group of data-parallel workers; with --workers {self.workers} "
                "there is none (a single-process run resumes with --resume)"
            )
        if self.uses_block_size() and self.embeds_to_embed_dim():
            limits.check_block_size(self.metric, self.embed_dim, self.block_size)
        if (self.encoder == "frozen") != (self.encoder_run is not None):
            raise UserInputError(
                "--encoder frozen and --encoder-run RUN go together: name the run whose encoders to freeze"
            )
        if self.adapter and not self.head_only():
            raise UserInputError("--adapter applies to head-only training (--encoder identity or frozen)")
        self._validate_interaction()
        if self.lr_decay_epoch is not None and self.lr_schedule != "step":
            raise UserInputError(
                f"--lr-decay-epoch applies to --lr-schedule step (the {self.lr_schedule} schedule follows --epochs)"
            )

    def _validate_interaction(self) -> None:
        scan_only = {"--gssf-at": self.gssf_at, "--aggregate": self.aggregate, "--lambda-softmax": self.lambda_softmax,
                     "--lambda-lse": self.lambda_lse}  # fmt: skip
        given = [flag for flag, value in scan_only.items() if value is not None]
        if given and self.interaction not in SCAN_SETTINGS:
            what = "scores every token pair with the metric" if self.interaction == "maxsim" else "has no tokens"
            raise UserInputError(
                f"{given[0]} applies to SCAN (--interaction scan-t2i or scan-i2t), and --interaction "
                f"{self.interaction} {what}: drop {given[0]}"
            )
        if self.interaction != "none" and self.pooling != "mean":
            raise UserInputError(
                f"--pooling {self.pooling} pools the towers' tokens into embeddings, and --interaction "
                f"{self.interaction} scores the tokens themselves: drop --pooling"
            )
        if self.interaction != "none" and self.head_only():
            raise UserInputError(
                f"--interaction {self.interaction} scores the towers' token outputs, and --encoder {self.encoder} "
                "keeps no tokens: train the towers (--encoder trained)"
            )

    def on_ray(self) -> bool:
        """Whether training runs on Ray Train workers (several, or any on a cluster) instead of in this process."""
        return self.workers > 1 or self.address is not None

    def worker_threads(self) -> int:
        """torch threads (and Ray CPUs) of each Ray Train worker."""
        return self.threads or 1

    def head_rate(self) -> float:
        """The metric head's learning-rate multiple: ``head_lr_scale``, else :data:`HEAD_LR_SCALES` of the mode."""
        if self.head_lr_scale is not None:
            return self.head_lr_scale
        return HEAD_LR_SCALES["head_only" if self.head_only() else "trained"]

    def head_only(self) -> bool:
        """Whether only the metric head (and adapters) learn: the towers are the identity or a run's frozen encoders."""
        return self.encoder != "trained"

    def embeds_to_embed_dim(self) -> bool:
        """Whether the embedding size is ``embed_dim`` (else it is the size of the features the head reads)."""
        return not self.head_only() or self.adapter

    def uses_block_size(self) -> bool:
        return self.metric in limits.BLOCK_SIMILARITIES

    def head_block_size(self) -> int | None:
        """The metric head's block size d: ``block_size`` for the block members, None for the others."""
        return self.block_size if self.uses_block_size() else None

    def model_label(self) -> str:
        return limits.model_label(self.metric, self.head_block_size(), self.interaction)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What ``gssf export --onnx`` writes and how strictly it checks it.

    ``out`` defaults to ``exports/<run id>``. Parity passes when every ONNX Runtime output satisfies
    ``|ort - torch| <= atol + rtol * |torch|`` and test-split retrieval agrees (see :mod:`gssf_cli.deploy.bundle`).
    """

    run: str = setting("latest", help=f"The trained run: {RUN_REF}.")
    out: Path | None = setting(None, help="Bundle folder (default exports/<run id>).")
    opset: int = setting(20, help="ONNX opset (dynamo exporter, 18-23).", within=limits.OPSET)
    atol: float = setting(1e-5, help="Parity: absolute tolerance.", within=limits.NON_NEGATIVE)
    rtol: float = setting(1e-4, help="Parity: relative tolerance.", within=limits.NON_NEGATIVE)
    split: str = setting("test", help="Dataset split for the parity check.")
    parity_batch: int = setting(16, help="Largest batch of the per-graph parity checks.", within=limits.AT_LEAST_TWO)
    force: bool = setting(False, help="Replace an existing bundle.", flag="--force")
    register: str | None = setting(
        None, help="Register the bundle, once its gate passed, as a new version of this MLflow registered model."
    )

    def validate(self) -> None:
        if self.register is not None:
            limits.check_registered_name("export.register", self.register)


SchedulerName = Literal["auto", "fifo", "asha"]
"""``auto``: FIFO for a pure grid (every trial runs its whole budget), ASHA when any value is sampled."""
Mode = Literal["max", "min"]


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """How ``gssf tune`` searches train settings with Ray Tune (the search space itself is parsed by
    :mod:`gssf_cli.training.tune_plan`, which needs the base train config to check it).

    ``params`` are ``NAME=SPEC`` strings (``block_size=4,8,16``, ``lr=1e-4:1e-2:log``, ``block_size=divisors``).
    The base train config comes from ``base_config`` (a ``gssf train --config`` TOML), then the ``base``
    ``KEY=VALUE`` overrides, then ``data`` and ``epochs``. ``metric`` is the optimisation target, a validation
    metric such as ``rsum`` or ``map_at_r`` (default: the dataset's validation metric), or ``loss``;
    ``mode`` defaults to what the metric means (``min`` for loss and ranks). ``trials`` is Ray's
    ``num_samples``: every grid point is run once per sample (default 1 for a pure grid, 8 otherwise).
    ``max_concurrent`` 0 lets the CPUs decide. ``address`` joins a running Ray cluster instead of starting a
    local one; ``storage`` is where Ray keeps trial results and checkpoints (a folder, or a URI such as
    ``s3://bucket/path`` that every node of a cluster can reach).
    """

    params: tuple[str, ...] = setting(
        help="Parameter to tune, repeatable: NAME=SPEC, or NAME with --values. SPEC: A,B,C (grid) | LO:HI | "
        "LO:HI:log; block_size also divisors | divisors:LO:HI (of the embedding size; NAME alone = divisors).",
        flag="--param",
    )
    data: Path | None = setting(None, help="Dataset folder from `gssf prepare`.")
    base: tuple[str, ...] = setting(
        (), help="Base train setting KEY=VALUE, repeatable, e.g. --base metric=bdiag.", flag="--base"
    )
    base_config: Path | None = setting(
        None, help="Base train config TOML (as `gssf train --config` reads it) for every trial.", flag="--config"
    )
    epochs: int | None = setting(
        None, help="Epochs per trial (the budget ASHA stops weak trials before).", within=limits.AT_LEAST_ONE
    )
    metric: str | None = setting(
        None, help="Metric to optimise (default: rsum cross-modal, map_at_r label-based; or loss)."
    )
    mode: Mode | None = setting(None, help="Direction (default: what the metric means):")
    trials: int | None = setting(
        None,
        help="Samples: each grid point runs once per sample (default 1 grid, 8 ranges).",
        within=limits.AT_LEAST_ONE,
    )
    scheduler: SchedulerName = setting(
        "auto", help="Scheduler: auto = fifo for a pure grid, asha (stops weak trials early) if any value is sampled:"
    )
    grace_period: int = setting(1, help="ASHA: epochs before a trial may be stopped.", within=limits.AT_LEAST_ONE)
    reduction_factor: int = setting(2, help="ASHA: keep the best 1/N at each rung.", within=limits.AT_LEAST_TWO)
    cpus_per_trial: int = setting(
        1, help="CPUs (and torch threads) per trial (with --workers-per-trial: per worker).", within=limits.AT_LEAST_ONE
    )
    workers_per_trial: int = setting(
        1,
        help="Data-parallel Ray Train workers per trial (as `gssf train --workers`; hardest negatives over the "
        "whole batch).",
        within=limits.AT_LEAST_ONE,
    )
    max_concurrent: int = setting(
        0, help="Trials running at once (0 = as many as the CPUs allow).", within=limits.NON_NEGATIVE
    )
    max_failures: int = setting(1, help="Retries of a crashed trial from its checkpoint.", within=limits.NON_NEGATIVE)
    address: str | None = setting(None, help="Join a running Ray cluster (HOST:6379 or ray://HOST:10001) instead.")
    storage: str = setting(".gssf/ray", help="Ray results and trial checkpoints (a folder, or a URI).")
    seed: int = setting(0, help="Seed of the random search (ranges).")

    def validate(self) -> None:
        if not self.params:
            raise UserInputError("give at least one --param NAME (e.g. --param block_size --values 8,16,32)")
        if not self.storage.strip():
            raise UserInputError("tune.storage: must name a folder or a URI")


PIPELINE_STAGES: tuple[str, ...] = ("prepare", "train", "evaluate", "tune", "export", "index")
PIPELINE_KEYS: tuple[str, ...] = ("name", "stages")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A pipeline file, read once: its name (the MLflow experiment unless ``--experiment``), the stages to run
        (in the fixed order of :data:`PIPELINE_STAGES`), each stage's table of settings as its ``--config`` file
        would hold them, ``retrain`` (``[tune] retrain = true``: train the best trial's config as the final model, with
    the ``[train]`` budget unless ``[tune] retrain_epochs`` says otherwise) and the file's text (logged on the
    parent run).
        Stage configs are built from these tables plus the links between stages by the pipeline stage."""

    path: Path
    name: str
    stages: tuple[str, ...]
    tables: Mapping[str, Mapping[str, Any]]
    retrain: bool = False
    retrain_epochs: int | None = None
    text: str = ""

    def table(self, stage: str) -> dict[str, Any]:
        return dict(self.tables.get(stage, {}))


def load_pipeline(path: Path) -> PipelineConfig:
    """Read and check a pipeline file: unknown stages or keys are one-line errors naming them."""
    if not path.is_file():
        raise UserInputError(f"pipeline file {path} not found (see pipelines/ for examples)")
    values = load_toml(path)
    header = values.pop("pipeline", {})
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: [pipeline] must be a table")
    unknown = sorted(set(values) - set(PIPELINE_STAGES))
    if unknown:
        raise UserInputError(f"{path}: unknown stage [{unknown[0]}] (valid stages: {', '.join(PIPELINE_STAGES)})")
    for key in sorted(set(header) - set(PIPELINE_KEYS)):
        raise UserInputError(f"{path}: pipeline.{key}: unknown key (valid keys: {', '.join(PIPELINE_KEYS)})")
    for stage, table in values.items():
        if not isinstance(table, dict):
            raise UserInputError(f"{path}: [{stage}] must be a table of settings")
    listed = header.get("stages", [s for s in PIPELINE_STAGES if s in values])
    if not isinstance(listed, list) or any(s not in PIPELINE_STAGES for s in listed):
        raise UserInputError(f"{path}: pipeline.stages must list stages among {', '.join(PIPELINE_STAGES)}")
    for stage in listed:
        if stage not in values and stage in ("prepare", "tune"):
            raise UserInputError(f"{path}: pipeline.stages lists {stage} but there is no [{stage}] table")
    tables = {stage: dict(values.get(stage, {})) for stage in PIPELINE_STAGES if stage in listed}
    retrain = coerce(tables.get("tune", {}).pop("retrain", False), bool, "tune.retrain")
    retrain_epochs = coerce(tables.get("tune", {}).pop("retrain_epochs", None), int | None, "tune.retrain_epochs")
    if retrain_epochs is not None:
        limits.AT_LEAST_ONE.check("tune.retrain_epochs", retrain_epochs)
    stages = tuple(s for s in PIPELINE_STAGES if s in listed)
    if "index" in stages and "export" not in stages:
        raise UserInputError(f"{path}: [index] indexes the bundle that [export] writes: add an [export] table")
    for key in ("bundle", "force"):
        if key in tables.get("index", {}):
            raise UserInputError(f"{path}: index.{key}: set by the pipeline (the bundle [export] writes, replaced)")
    name = str(header.get("name", path.stem))
    return PipelineConfig(path, name, stages, tables, retrain, retrain_epochs, path.read_text())


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What ``gssf compare`` tests and how (see :mod:`gssf_cli.evaluation.comparison` for the statistics).

    ``runs`` are the command's arguments: the baseline first, then each run compared with it. Each is a train
    run (id or ``latest``), a ``gssf train --seeds`` run (the group of its train runs) or a comma-separated group
    of them (several seeds of one configuration, whose per-query values are averaged over the group before the
    test). ``names`` label arguments in the tables and the JSON, as ``LABEL=RUNS`` with RUNS an argument as
    given. Every run is measured on the same ``split`` of the same dataset under the same ``protocol``; the
    per-query differences get a paired bootstrap interval (``bootstrap`` resamples, at ``confidence``) and a
    paired sign-flip p-value (``permutations``), both drawn from ``seed``. A difference is significant when
    p < 1 - ``confidence``.
    """

    runs: tuple[str, ...] = setting(
        (), help="Runs to compare, baseline first.", file_only="given as the command's arguments (RUN_A RUN_B ...)"
    )
    names: tuple[str, ...] | None = setting(
        None,
        help="Label an argument in the tables and the JSON: LABEL=RUNS, RUNS as given (repeatable; default: the "
        "seeds run's name, else the first run's name and +N more).",
        flag="--name",
    )
    split: str = setting("test", help="Dataset split every run is measured on.")
    protocol: Protocol = setting(
        "all",
        help="Cross-modal protocol, as for gssf evaluate (f30k-1k, coco-1k: 5 folds of 1,000, coco-5k, all):",
    )
    ks: tuple[int, ...] = setting((1, 5, 10), help="Cut-offs for R@K, e.g. 1,5,10.", flag="--k")
    bootstrap: int = setting(10_000, help="Bootstrap resamples of the test queries.", within=limits.AT_LEAST_ONE)
    permutations: int = setting(
        10_000,
        help="Random sign flips for the p-value (all 2^n, exactly, when fewer; n = units that differ).",
        within=limits.AT_LEAST_ONE,
    )
    confidence: float = setting(
        0.95, help="Confidence of the intervals; significant means p < 1 - confidence.", within=limits.FRACTION
    )
    seed: int = setting(0, help="Seed of the bootstrap and the sign flips.")
    full_map: bool = setting(False, help="Label-based: also compare mAP over the full ranking.")
    memory_budget_mb: int = setting(256, help="Memory for score chunks, MiB.", within=limits.AT_LEAST_ONE)
    plots: bool = setting(True, help="Log a forest plot of the differences to MLflow.")

    def validate(self) -> None:
        if len(self.runs) < 2:
            given = f"got {len(self.runs)}" if self.runs else "got none"
            raise UserInputError(f"give at least two runs to compare, the baseline first ({given})")
        for run in self.runs:
            members = run.split(",")
            if any(not member.strip() for member in members):
                raise UserInputError(f"run {run!r}: an empty run id; a group is run ids joined by commas (A1,A2,A3)")
            if len(members) > 1 and "latest" in (member.strip() for member in members):
                raise UserInputError(f"run {run!r}: 'latest' cannot be part of a group; name the runs by id")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UserInputError(f"compare.ks: cut-offs must be positive integers, got {list(self.ks)}")
        self.labels()

    def groups(self) -> list[tuple[str, ...]]:
        """The runs as groups of run references (a single run is a group of one)."""
        return [_members(run) for run in self.runs]

    def labels(self) -> list[str | None]:
        """Each argument's label from ``names`` (None: not named), checked: every name is ``LABEL=RUNS`` with a
        one-line label and RUNS one of the arguments (its run ids as given, spaces aside), no argument is named
        twice and no label names two arguments."""
        groups = self.groups()
        named: dict[tuple[str, ...], str] = {}
        for name in self.names or ():
            label, equals, runs = name.partition("=")
            label = label.strip()
            example = "e.g. --name gssf=A1,A2,A3"
            if not equals or not runs.strip():
                raise UserInputError(f"--name {name!r}: give LABEL=RUNS, RUNS one of the runs to compare ({example})")
            if not label or not label.isprintable():
                raise UserInputError(f"--name {name!r}: the label must be one line of text ({example})")
            members = _members(runs)
            if members not in groups:
                given = " ".join(self.runs)
                raise UserInputError(f"--name {name!r}: {runs.strip()} is not one of the runs to compare ({given})")
            if members in named:
                raise UserInputError(f"--name: {runs.strip()} is named twice ({named[members]!r} and {label!r})")
            if label in named.values():
                raise UserInputError(f"--name: the label {label!r} is given to two different runs")
            named[members] = label
        return [named.get(group) for group in groups]


def _members(runs: str) -> tuple[str, ...]:
    """A comma-separated group of run references as its members (a single run: one member)."""
    return tuple(member.strip() for member in runs.split(","))


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """What ``gssf index`` builds: a faiss index over a gallery embedded by an exported bundle.

    The gallery is a ``.npy`` array (read memory-mapped, never unpickled) of image-side inputs ``[N, ...]`` in the
    layout of the bundle's image encoder (``[N, F]`` features or ``[N, R, F]`` regions), or with ``embedded`` the
    encoder's outputs ``[N, D]``; each batch of ``batch_size`` rows goes through the image encoder (unless
    ``embedded``) and the metric head on ONNX Runtime, so the index holds ``metric_head(images)`` and a query's
    inner product with a row is the learned score. The index-kind parameters left unset take the defaults of
    :func:`gssf_cli.deploy.search.index_spec`, which depend on the gallery's size.
    """

    bundle: Path | None = setting(None, help="The exported bundle (exports/NAME) whose graphs embed the gallery.")
    gallery: Path | None = setting(None, help="Gallery .npy: image features [N, F] or [N, R, F] (or embeddings).")
    kind: IndexKind = setting("flat", help="faiss index: flat (exact), hnsw, ivfpq (approximate):")
    out: Path | None = setting(None, help="Index folder (default indexes/<bundle folder name>).")
    ids: Path | None = setting(None, help="Text file with one id per gallery row (default: the row numbers).")
    embedded: bool = setting(False, help="The gallery holds image embeddings [N, D]: skip the image encoder.")
    batch_size: int = setting(1024, help="Gallery rows embedded at a time (bounds memory).", within=limits.AT_LEAST_ONE)
    hnsw_m: int | None = setting(
        None, help="hnsw: graph neighbours per node (unset: the measured default).", within=limits.AT_LEAST_TWO
    )
    ef_construction: int | None = setting(
        None, help="hnsw: search depth while building (unset: the measured default).", within=limits.AT_LEAST_ONE
    )
    ef_search: int | None = setting(
        None, help="hnsw: search depth of queries, stored as the index's default.", within=limits.AT_LEAST_ONE
    )
    nlist: int | None = setting(
        None, help="ivfpq: inverted lists (unset: from the gallery size).", within=limits.AT_LEAST_ONE
    )
    pq_m: int | None = setting(
        None, help="ivfpq: sub-quantizers per vector (must divide D).", within=limits.AT_LEAST_ONE
    )
    pq_bits: int | None = setting(
        None, help="ivfpq: bits per code (default 8; fewer for a small gallery).", within=limits.AT_LEAST_ONE
    )
    nprobe: int | None = setting(
        None, help="ivfpq: lists visited per query, stored as the index's default.", within=limits.AT_LEAST_ONE
    )
    refine: int | None = setting(
        None,
        help="ivfpq: re-score refine x k candidates exactly from the stored vectors (0: off), stored as the default.",
        within=limits.NON_NEGATIVE,
    )
    per_word: int | None = setting(
        None,
        help="Token index: regions each query word fetches as candidates, stored as the index's default.",
        within=limits.AT_LEAST_ONE,
    )
    eval: bool = setting(False, help="Measure recall@10 against exact search and the query latency.", flag="--eval")
    eval_queries: Path | None = setting(
        None, help="Queries for --eval: captions (.txt) or vectors (.npy); default: embeddings of gallery rows."
    )
    eval_count: int = setting(1000, help="Queries --eval measures (at most).", within=limits.AT_LEAST_ONE)
    seed: int = setting(
        0, help="Seed of the training sample (ivfpq) and of the --eval queries.", within=limits.NON_NEGATIVE
    )
    force: bool = setting(False, help="Replace an existing index folder.", flag="--force")
    log_model: bool = setting(
        False, help="Also log the index and its bundle as an MLflow model that serves search (mlflow models serve).",
        flag="--log-model",
    )  # fmt: skip
    register: str | None = setting(
        None, help="Register the search model (implies --log-model) as a new version of this MLflow registered model."
    )

    def validate(self) -> None:
        if self.register is not None:
            limits.check_registered_name("index.register", self.register)
        if self.bundle is None:
            raise UserInputError("give the bundle to embed with: --bundle exports/NAME")
        if self.gallery is None:
            raise UserInputError("give the gallery to index: --gallery FILE.npy")
        if self.eval_queries is not None and not self.eval:
            raise UserInputError("--eval-queries needs --eval")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """What ``gssf search`` asks an index: the ``k`` best gallery rows for each query, by the learned score.

    Exactly one source of queries: ``text`` (one caption), ``texts`` (a file, one caption per line) — tokenised
    with the bundle's vocabulary and rule and encoded by its text encoder — or ``vectors`` (a ``.npy`` ``[Q, F]``
    of text-side features for the text encoder, or with ``embedded`` text embeddings ``[Q, D]``).
    """

    index: Path | None = setting(None, help="The index folder (built by gssf index).")
    text: str | None = setting(None, help="One caption to search with.")
    texts: Path | None = setting(None, help="A file of captions, one query per line.")
    vectors: Path | None = setting(None, help="A .npy of query vectors [Q, F] (text-side features).")
    embedded: bool = setting(False, help="--vectors are text embeddings [Q, D]: skip the text encoder.")
    k: int = setting(10, help="Results per query.", within=limits.AT_LEAST_ONE)
    bundle: Path | None = setting(None, help="The bundle, if it moved since the index was built (checked by content).")
    ef_search: int | None = setting(None, help="hnsw: search depth (default: the index's).", within=limits.AT_LEAST_ONE)
    nprobe: int | None = setting(None, help="ivfpq: lists visited (default: the index's).", within=limits.AT_LEAST_ONE)
    refine: int | None = setting(
        None, help="ivfpq: re-score refine x k candidates exactly (0: off; default: the index's).",
        within=limits.NON_NEGATIVE,
    )  # fmt: skip
    per_word: int | None = setting(
        None, help="Token index: regions each query word fetches as candidates (default: the index's).",
        within=limits.AT_LEAST_ONE,
    )  # fmt: skip
    eval: bool = setting(
        False, help="Token index: recall@10 of the answers against exact search of the whole gallery.", flag="--eval"
    )

    def validate(self) -> None:
        if self.index is None:
            raise UserInputError("give the index to search: --index indexes/NAME")
        given = [flag for flag, value in (("--text", self.text), ("--texts", self.texts), ("--vectors", self.vectors))
                 if value is not None]  # fmt: skip
        if len(given) != 1:
            raise UserInputError(
                "give exactly one of --text, --texts, --vectors" + (f" (got {', '.join(given)})" if given else "")
            )
        if self.text is not None and not self.text.strip():
            raise UserInputError("--text: an empty query; give a caption such as --text 'a dog on a beach'")
        if self.embedded and self.vectors is None:
            raise UserInputError("--embedded applies to --vectors only")
