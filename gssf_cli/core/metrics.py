"""The metric registry: every metric gssf reports, its task, whether higher is better, and its unit.

Why one registry: tuning picks an optimisation direction, training picks the validation metric that chooses the
best epoch, export compares metrics across runtimes, the pipeline and the console pick headline numbers. Each
used to spell its own list (and guess the direction from a name's ending); they all read this table now.
Cut-off metrics (``i2t_r{K}``, ``r_at_{K}``) exist for any K: :func:`get` resolves them by pattern.
Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import Task


@dataclass(frozen=True)
class Metric:
    """``task``: ``cross_modal``, ``labels`` or ``training`` (the loss, any task). ``best_possible``: the value
    a perfect ranking gets (None where there is none, or where it depends on the other metrics: rsum, see
    :func:`best_possible`)."""

    name: str
    task: str
    higher_is_better: bool
    unit: str
    description: str
    best_possible: float | None = None

    @property
    def mode(self) -> str:
        """Ray Tune's and MLflow's word for the direction."""
        return "max" if self.higher_is_better else "min"


PERCENT, FRACTION, FIRST_RANK = 100.0, 1.0, 1.0
"""Best possible values: recalls and mAP in %, label-based metrics as fractions, ranks (1 = first)."""

_TABLE: tuple[Metric, ...] = (
    Metric("rsum", "cross_modal", True, "% (sum)", "sum of i2t and t2i R@K"),
    Metric("i2t_r1", "cross_modal", True, "%", "image→text recall at 1", PERCENT),
    Metric("i2t_r5", "cross_modal", True, "%", "image→text recall at 5", PERCENT),
    Metric("i2t_r10", "cross_modal", True, "%", "image→text recall at 10", PERCENT),
    Metric("t2i_r1", "cross_modal", True, "%", "text→image recall at 1", PERCENT),
    Metric("t2i_r5", "cross_modal", True, "%", "text→image recall at 5", PERCENT),
    Metric("t2i_r10", "cross_modal", True, "%", "text→image recall at 10", PERCENT),
    Metric("i2t_map", "cross_modal", True, "%", "image→text mean average precision", PERCENT),
    Metric("i2t_medr", "cross_modal", False, "rank", "image→text median rank of the first match", FIRST_RANK),
    Metric("t2i_medr", "cross_modal", False, "rank", "text→image median rank of the match", FIRST_RANK),
    Metric("i2t_meanr", "cross_modal", False, "rank", "image→text mean rank of the first match", FIRST_RANK),
    Metric("t2i_meanr", "cross_modal", False, "rank", "text→image mean rank of the match", FIRST_RANK),
    # ECCV Caption and CxC (`gssf evaluate --protocol eccv|cxc`, gssf_cli.evaluation.coco_protocols): task "coco_test",
    # not "cross_modal", so that no validation or tune metric can name them (training never ranks by COCO ids).
    Metric("eccv_i2t_r1", "coco_test", True, "%", "ECCV Caption image→text recall at 1", PERCENT),
    Metric("eccv_t2i_r1", "coco_test", True, "%", "ECCV Caption text→image recall at 1", PERCENT),
    Metric("eccv_i2t_rprecision", "coco_test", True, "%", "ECCV Caption image→text R-precision", PERCENT),
    Metric("eccv_t2i_rprecision", "coco_test", True, "%", "ECCV Caption text→image R-precision", PERCENT),
    Metric("eccv_i2t_map_at_r", "coco_test", True, "%", "ECCV Caption image→text mAP@R", PERCENT),
    Metric("eccv_t2i_map_at_r", "coco_test", True, "%", "ECCV Caption text→image mAP@R", PERCENT),
    Metric("cxc_i2t_r1", "coco_test", True, "%", "CxC image→text recall at 1", PERCENT),
    Metric("cxc_i2t_r5", "coco_test", True, "%", "CxC image→text recall at 5", PERCENT),
    Metric("cxc_i2t_r10", "coco_test", True, "%", "CxC image→text recall at 10", PERCENT),
    Metric("cxc_t2i_r1", "coco_test", True, "%", "CxC text→image recall at 1", PERCENT),
    Metric("cxc_t2i_r5", "coco_test", True, "%", "CxC text→image recall at 5", PERCENT),
    Metric("cxc_t2i_r10", "coco_test", True, "%", "CxC text→image recall at 10", PERCENT),
    # Intra-modal retrieval (gssf_cli.evaluation.intramodal), beside cross-modal metrics where the dataset says what
    # is relevant: task "intra_modal", so that no validation or tune metric names them.
    Metric("i2i_r1", "intra_modal", True, "%", "image→image recall at 1 (a relevant item in the top 1)", PERCENT),
    Metric("i2i_r5", "intra_modal", True, "%", "image→image recall at 5 (a relevant item in the top 5)", PERCENT),
    Metric("i2i_r10", "intra_modal", True, "%", "image→image recall at 10 (a relevant item in the top 10)", PERCENT),
    Metric("i2i_map_at_r", "intra_modal", True, "%", "image→image MAP@R (R = relevant items of the query)", PERCENT),
    Metric("t2t_r1", "intra_modal", True, "%", "text→text recall at 1 (a relevant item in the top 1)", PERCENT),
    Metric("t2t_r5", "intra_modal", True, "%", "text→text recall at 5 (a relevant item in the top 5)", PERCENT),
    Metric("t2t_r10", "intra_modal", True, "%", "text→text recall at 10 (a relevant item in the top 10)", PERCENT),
    Metric("t2t_map_at_r", "intra_modal", True, "%", "text→text MAP@R (R = relevant items of the query)", PERCENT),
    Metric("map_at_r", "labels", True, "fraction", "MAP@R (R = relevant items of the query)", FRACTION),
    Metric("map", "labels", True, "fraction", "mean average precision over the full ranking", FRACTION),
    Metric("precision_at_1", "labels", True, "fraction", "precision at 1", FRACTION),
    Metric("r_precision", "labels", True, "fraction", "R-precision", FRACTION),
    Metric("r_at_1", "labels", True, "fraction", "queries with a relevant item in the top 1", FRACTION),
    Metric("r_at_5", "labels", True, "fraction", "queries with a relevant item in the top 5", FRACTION),
    Metric("r_at_10", "labels", True, "fraction", "queries with a relevant item in the top 10", FRACTION),
    Metric("loss", "training", False, "", "training loss (mean per pair over the epoch)"),
)
REGISTRY: dict[str, Metric] = {m.name: m for m in _TABLE}

VALIDATION: dict[str, str] = {"cross_modal": "rsum", "labels": "map_at_r"}
"""The metric that picks the best epoch, per task (the first of the task's metrics)."""
HEADLINE: dict[str, tuple[str, ...]] = {
    "cross_modal": ("rsum", "i2t_r1", "t2i_r1"),
    "labels": ("map_at_r", "precision_at_1"),
}
"""What a summary (the pipeline table) shows of an evaluation."""
RECALL_CUTOFFS: dict[str, tuple[str, ...]] = {
    "cross_modal": ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"),
    "labels": ("r_at_1", "r_at_5", "r_at_10"),
}
"""The top-K metrics of a task."""
RANKING: dict[str, str] = {"cross_modal": "i2t_map", "labels": "map_at_r"}
"""The ranking-quality metric reported beside the cut-offs."""
RANK_METRICS: dict[str, tuple[str, ...]] = {
    "cross_modal": (*RECALL_CUTOFFS["cross_modal"], "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "i2t_map"),
    "labels": (*RECALL_CUTOFFS["labels"], "precision_at_1", "r_precision", "map_at_r"),
}
"""Every metric a task's rankings alone decide: two scorers that rank alike agree on all of them exactly, so the ONNX
parity gate demands that (a score drift that reorders one relevant item moves at least one of them)."""

_CUTOFF = re.compile(r"^(?:(i2t|t2i)_r|r_at_)(\d+)$")


def get(name: str) -> Metric:
    """The registry entry for ``name``; cut-off metrics resolve for any K."""
    if name in REGISTRY:
        return REGISTRY[name]
    match = _CUTOFF.match(name)
    if match and int(match.group(2)) >= 1:
        k = match.group(2)
        if match.group(1):
            direction = "image→text" if match.group(1) == "i2t" else "text→image"
            return Metric(name, "cross_modal", True, "%", f"{direction} recall at {k}", PERCENT)
        return Metric(name, "labels", True, "fraction", f"queries with a relevant item in the top {k}", FRACTION)
    raise KeyError(name)


def best_possible(name: str, reported: Iterable[str]) -> float | None:
    """The value of ``name`` under a perfect ranking, given the names of the metrics reported with it (rsum's
    depends on the cut-offs: 100 per ``i2t_r{K}``/``t2i_r{K}`` it sums); None where there is no ceiling."""
    name = name.removeprefix("val_")
    if name == "rsum":
        cutoffs = [m for n in reported if (m := _CUTOFF.match(n.removeprefix("val_"))) is not None and m.group(1)]
        return PERCENT * len(cutoffs) if cutoffs else None
    return get(name).best_possible


def for_task(task: Task | str) -> tuple[str, ...]:
    """The registered metrics of a task, its validation metric first."""
    names = [m.name for m in _TABLE if m.task == task]
    return tuple(sorted(names, key=lambda n: n != VALIDATION[task]))


def validation_metric(task: str) -> str:
    return VALIDATION[task]


def mode(name: str) -> str:
    """``max`` or ``min`` for a metric name (an optional ``val_`` prefix is ignored)."""
    return get(name.removeprefix("val_")).mode


def resolve(name: str | None, task: str) -> Metric:
    """A metric a user named for ``task`` (``None``: the validation metric; ``loss`` always allowed)."""
    chosen = (name or VALIDATION[task]).strip().removeprefix("val_")
    metric = REGISTRY.get(chosen)
    if metric is None or metric.task not in (task, "training"):
        choices = ", ".join((*for_task(task), "loss"))
        raise UserInputError(
            f"--metric {chosen}: not a validation metric of {task.replace('_', '-')} data; choose from {choices}"
        )
    return metric
