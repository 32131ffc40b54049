"""Trained runs: find a run's best checkpoint (locally or as an MLflow artifact) and rebuild its model.

Evaluation and export both start from "a run id or ``latest``"; this is the one place that turns that into
(the run, the model with its best weights, the dataset it was trained on).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gssf_cli import checkpoint as ckpt
from gssf_cli.config import TrainConfig, default_of, from_dict
from gssf_cli.data.dataset import Dataset
from gssf_cli.errors import UserInputError
from gssf_cli.model import RetrievalModel, build_model, load_weights
from gssf_cli.tracking import Tracker


def load_trained(tracker: Tracker, run_ref: str, data: Path | None = None) -> tuple[Any, RetrievalModel, Dataset]:
    """A trained run's best model and its dataset: (run, model, dataset)."""
    run_ = tracker.get_run(run_ref, stage="train")
    tracker.follow(run_)
    run_id = run_.info.run_id
    if run_.data.tags.get("gssf.stage") != "train":
        raise UserInputError(f"run {run_id} is a {run_.data.tags.get('gssf.stage', 'non-gssf')} run, not a train run")
    runs_dir = Path(run_.data.params.get("train.runs_dir", default_of(TrainConfig, "runs_dir")))
    folder = runs_dir / run_id / ckpt.BEST
    ckpt.recover(folder)
    if not folder.is_dir():
        try:
            folder = Path(tempfile.mkdtemp(prefix="gssf-ckpt-")) / ckpt.BEST
            tracker.run_handle(run_id).download_artifacts("checkpoint", folder.parent)
            (folder.parent / "checkpoint").rename(folder)
        except Exception:
            raise UserInputError(
                f"run {run_id} has no checkpoint (not in {runs_dir / run_id} nor as an artifact)"
            ) from None
    saved = ckpt.load(folder)
    ckpt.check_state(saved.state, folder / ckpt.STATE, ("config", "dataset_sha256"))
    values = dict(saved.state["config"])
    if data is not None:
        values["data"] = str(data)
    config = from_dict(TrainConfig, values, "train")
    dataset = Dataset(config.data)
    if data is None and dataset.digest != saved.state["dataset_sha256"]:
        raise UserInputError(f"{config.data} changed since run {run_id} trained on it; pass --data to use it anyway")
    model = build_model(dataset, config)
    load_weights(model, saved.model)
    return run_, model, dataset
