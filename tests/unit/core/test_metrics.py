"""The metric registry: every metric the evaluation functions report is registered, with its direction."""

from __future__ import annotations

import numpy as np
import pytest

from gssf_cli.core import metrics
from gssf_cli.core.errors import UserInputError
from gssf_cli.evaluation import crossmodal
from gssf_cli.evaluation import labels as label_metrics


def test_every_reported_metric_is_registered() -> None:
    rng = np.random.default_rng(0)
    cross = crossmodal.evaluate_cross_modal(scores=rng.normal(size=(4, 8)), captions_per_image=2)
    labels = label_metrics.evaluate_labels(None, [0, 0, 1, 1], scores=rng.normal(size=(4, 4)))
    for name, value in {**cross, **labels}.items():
        if isinstance(value, float):
            assert metrics.get(name).task in ("cross_modal", "labels"), name
    for task in ("cross_modal", "labels"):
        assert metrics.validation_metric(task) == metrics.for_task(task)[0]
        assert set(metrics.HEADLINE[task]) <= set(metrics.for_task(task))


@pytest.mark.parametrize(
    ("name", "mode"),
    [("rsum", "max"), ("val_rsum", "max"), ("i2t_medr", "min"), ("t2i_meanr", "min"), ("loss", "min"),
     ("map_at_r", "max"), ("r_at_20", "max"), ("i2t_r50", "max")],
)  # fmt: skip
def test_direction_comes_from_the_registry(name: str, mode: str) -> None:
    assert metrics.mode(name) == mode


def test_resolve_checks_the_task() -> None:
    assert metrics.resolve(None, "labels").name == "map_at_r"
    assert metrics.resolve("loss", "cross_modal").name == "loss"
    with pytest.raises(UserInputError, match="not a validation metric of cross-modal data"):
        metrics.resolve("map_at_r", "cross_modal")


def test_a_perfect_ranking_reaches_every_best_possible_value() -> None:
    k = 2
    perfect = np.repeat(np.eye(4), k, axis=1) + np.random.default_rng(1).uniform(0, 0.1, size=(4, 4 * k))
    cross = crossmodal.evaluate_cross_modal(scores=perfect, captions_per_image=k, ks=(1, 2))
    labels = label_metrics.evaluate_labels(None, [0, 0, 1, 1], scores=np.kron(np.eye(2), np.ones((2, 2))))
    for reported in (cross, labels):
        for name, value in reported.items():
            if isinstance(value, float):
                assert value == pytest.approx(metrics.best_possible(name, reported)), name
    assert metrics.best_possible("rsum", cross) == 400.0
    assert metrics.best_possible("val_rsum", ["val_i2t_r1", "val_t2i_r1"]) == 200.0
    assert metrics.best_possible("rsum", []) is None and metrics.best_possible("loss", []) is None
    assert metrics.best_possible("r_at_20", []) == 1.0 and metrics.best_possible("t2i_r50", []) == 100.0
