"""Trained runs: find a run's best checkpoint (locally or as an MLflow artifact) and rebuild its model.

Evaluation and export both start from "a run id or ``latest``"; this is the one place that turns that into
(the run, the model with its best weights, the dataset it was trained on). A trained model is also served as
an MLflow pyfunc (:class:`TrainedModel`) from a self-contained folder (:func:`pack_model`): the best weights in
safetensors and JSON only — nothing is pickled — so ``mlflow.pyfunc.load_model`` needs no dataset.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gssf_cli.core.config import default_of, from_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.data.dataset import Dataset, TokenizedCaptions
from gssf_cli.data.text import Vocabulary
from gssf_cli.deploy.serving import Layout, Served
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.model import RetrievalModel, build_model, build_model_for, load_weights
from gssf_cli.tracking.adapter import Tracker


def load_trained(tracker: Tracker, run_ref: str, data: Path | None = None) -> tuple[Any, RetrievalModel, Dataset]:
    """A trained run's best model and its dataset: (run, model, dataset)."""
    run_ = tracker.get_train_run(run_ref)
    tracker.follow(run_)
    run_id = run_.info.run_id
    if run_.data.tags.get("gssf.stage") != "train":
        raise UserInputError(f"run {run_id} is a {run_.data.tags.get('gssf.stage', 'non-gssf')} run, not a train run")
    runs_dir = Path(run_.data.params.get("train.runs_dir", default_of(TrainConfig, "runs_dir")))
    folder = runs_dir / run_id / ckpt.BEST
    ckpt.recover(folder)
    with tempfile.TemporaryDirectory(prefix="gssf-ckpt-") as downloaded:  # the run's copy, when best/ is gone
        if not folder.is_dir():
            try:
                tracker.run_handle(run_id).download_artifacts("checkpoint", Path(downloaded))
                folder = (Path(downloaded) / "checkpoint").rename(Path(downloaded) / ckpt.BEST)
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


VOCAB = "vocab.json"
SERVE_BATCH = 256


def pack_model(checkpoint_folder: Path, dataset: Dataset, into: Path) -> Path:
    """A served model's folder: the checkpoint's weights and state, the dataset's manifest and vocabulary."""
    into.mkdir(parents=True, exist_ok=True)
    for name in (ckpt.MODEL, ckpt.STATE):
        shutil.copyfile(checkpoint_folder / name, into / name)
    shutil.copyfile(dataset.folder / MANIFEST, into / MANIFEST)
    if dataset.vocab is not None:
        shutil.copyfile(dataset.folder / VOCAB, into / VOCAB)
    return into


class TrainedModel(Served):
    """A trained model on the CPU behind :func:`gssf_cli.deploy.serving.predict` (a :class:`gssf_cli.deploy.serving.Retriever`).

    ``layout`` (the dataset's input shapes, from the packed manifest) is what serving checks requests against; a
    model built without one (to compare against, in tests) embeds and scores but serves no request."""

    def __init__(self, model: RetrievalModel, vocab: Vocabulary | None, layout: Layout | None = None) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self._layout = layout

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise UserInputError("this model was built without its input layout; load it with TrainedModel.load")
        return self._layout

    @classmethod
    def load(cls, folder: Path | str) -> TrainedModel:
        """From a :func:`pack_model` folder."""
        folder = Path(folder)
        saved = ckpt.load(folder)
        ckpt.check_state(saved.state, folder / ckpt.STATE, ("config",))
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        model = build_model_for(manifest, from_dict(TrainConfig, dict(saved.state["config"]), "train"))
        load_weights(model, saved.model)
        vocab = Vocabulary.load(folder / VOCAB) if (folder / VOCAB).is_file() else None
        return cls(model, vocab, Layout.of(str(manifest["task"]), manifest["modalities"], model.similarity.dim))

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._batched(len(images), lambda s: self.model.encode_images(torch.from_numpy(images[s])))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        if isinstance(texts, np.ndarray) or self.vocab is None:
            features = np.asarray(texts, dtype=np.float32)
            return self._batched(len(features), lambda s: self.model.encode_texts(torch.from_numpy(features[s])))
        captions = TokenizedCaptions(list(texts), self.vocab)

        def encode(rows: slice) -> torch.Tensor:
            tokens, lengths = captions.batch(np.arange(len(captions))[rows])
            return self.model.encode_texts(tokens, lengths)

        return self._batched(len(captions), encode)

    @torch.no_grad()
    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        return self.model.scores(torch.from_numpy(image_embeddings), torch.from_numpy(text_embeddings)).numpy()

    @torch.no_grad()
    def input_scores(self, images: np.ndarray, texts: Sequence[str] | np.ndarray) -> np.ndarray | None:
        """``[N, M]`` scores from the inputs themselves when the model scores token sets (an interaction model:
        its pooled embeddings cannot give them); None for an embedding model."""
        if self.model.interaction is None or self.vocab is None:
            return None
        captions = TokenizedCaptions(list(texts), self.vocab)
        tokens, lengths = captions.batch(np.arange(len(captions)))
        sets = self.model.encode_tokens(torch.from_numpy(images), tokens, lengths)
        return self.model.token_scores(sets).numpy()

    def _batched(self, rows: int, encode: Any) -> np.ndarray:
        """``[rows, D]`` from ``encode(slice)`` per batch of :data:`SERVE_BATCH` rows."""
        parts = [encode(slice(s, s + SERVE_BATCH)).numpy() for s in range(0, rows, SERVE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, self.model.similarity.dim), np.float32)
