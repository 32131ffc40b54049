"""A model that diverges is reported as divergence — the epoch and the setting to lower — never as bad data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from gssf_cli.core.errors import DivergedError
from gssf_cli.evaluation.evaluate import check_model_finite
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]


def test_a_diverged_run_stops_with_the_epoch_and_the_rate(gssf: Gssf, workdir: Path) -> None:
    """``--lr 1e30`` used to end in "data/syn (dev split): images contains NaN or Inf", on clean data: the head's
    scores (or the loss, or the embeddings) went NaN, and the run says so."""
    assert gssf(*tiny_synthetic_args("data/syn")).exit_code == 0
    result = gssf(
        "train", "--data", "data/syn", "--epochs", "2", "--lr", "1e30", "--embed-dim", "8", "--block-size", "4"
    )
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("gssf: error: train diverged ") and "epoch 1" in line and "lower --lr" in line, line
    assert "data/syn" not in line


def test_nan_embeddings_are_the_models_fault() -> None:
    finite = torch.ones(3, 4)
    check_model_finite((finite, finite), "dev")
    broken = finite.clone()
    broken[1, 2] = float("inf")
    with pytest.raises(DivergedError, match="the model's text embeddings of the dev split contain NaN or Inf: the "
                       "model diverged in training") as caught:  # fmt: skip
        check_model_finite((finite, broken), "dev")
    assert caught.value.detail == "the model's text embeddings of the dev split contain NaN or Inf"


def test_a_nan_loss_names_its_epoch_and_batch(workdir: Path) -> None:
    from gssf_cli.core.stage_configs import PrepareConfig
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.stages import prepare
    from gssf_cli.training.loop import fit
    from tests.conftest import tiny_train_config

    prepare.run(PrepareConfig(dataset="synthetic", out=Path("d"), train_images=16, dev_images=4, test_images=4,
                              regions=2, region_dim=4, concepts=3, vocab_size=20))  # fmt: skip
    config = tiny_train_config(Path("d"), epochs=1, batch_size=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gssf_cli.training.batch_step.BatchStep.__call__",
                      lambda self, *a, **k: {"loss": torch.tensor(float("nan"), requires_grad=True),
                                             "struct": 0.0})  # fmt: skip
        with pytest.raises(DivergedError, match=r"^train diverged at epoch 1 \(batch 1 of \d+\): the loss is nan; "
                           r"lower --lr \(the learning rate there was "):  # fmt: skip
            fit(config, Dataset(Path("d")), Path("run"))
