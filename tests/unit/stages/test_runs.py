"""From a run reference (id or ``latest``) to the trained model and its dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import manifest_digest
from gssf_cli.stages import train
from gssf_cli.stages.runs import load_trained
from gssf_cli.tracking.adapter import Tracker
from tests.conftest import tiny_train_config


def test_latest_run_loads_its_best_weights_locally_or_from_mlflow(tiny_syn: Path, workdir: Path) -> None:
    tracker = Tracker()
    result = train.run(tiny_train_config(tiny_syn, epochs=1), tracker)
    run_, model, dataset = load_trained(tracker, "latest")
    assert run_.info.run_id == result.run_id and dataset.digest == manifest_digest(tiny_syn)
    local = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.rmtree(Path(result.out_dir))
    _, from_artifact, _ = load_trained(tracker, result.run_id)
    assert all(torch.equal(local[k], v) for k, v in from_artifact.state_dict().items())


def test_bad_references(tiny_syn: Path, workdir: Path) -> None:
    tracker = Tracker()
    with pytest.raises(UserInputError, match="no train run in any experiment"):
        load_trained(tracker, "latest")
    with pytest.raises(UserInputError, match="unknown run 'nope'"):
        load_trained(tracker, "nope")


def test_a_model_built_without_its_layout_embeds_but_serves_no_request(tiny_syn: Path) -> None:
    """What serving checks a request against comes from the packed dataset manifest (``TrainedModel.load``); a
    model built in code, to compare against, has none, and says so instead of serving unchecked input."""
    import numpy as np

    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling.model import build_model
    from gssf_cli.stages.runs import TrainedModel

    dataset = Dataset(tiny_syn)
    model = TrainedModel(build_model(dataset, tiny_train_config(tiny_syn)), dataset.vocab)
    assert model.encode_texts(["a dog"]).shape[0] == 1
    with pytest.raises(UserInputError, match="built without its input layout"):
        model.predict({"texts": ["a dog"]})
    assert np.isfinite(model.encode_images(np.ones((1, 4, 8), np.float32))).all()
