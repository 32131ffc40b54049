"""The metric registry: every metric the evaluation functions report is registered, with its direction."""

from __future__ import annotations

import numpy as np
import pytest

from gssf_cli import metrics, retrieval
from gssf_cli.errors import UserInputError


def test_every_reported_metric_is_registered() -> None:
    rng = np.random.default_rng(0)
    cross = retrieval.evaluate_cross_modal(scores=rng.normal(size=(4, 8)), captions_per_image=2)
    labels = retrieval.evaluate_labels(None, [0, 0, 1, 1], scores=rng.normal(size=(4, 4)))
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
