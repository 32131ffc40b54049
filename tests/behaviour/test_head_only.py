"""Head-only training (``--encoder identity`` / ``--encoder frozen``): the metric head (and optional adapters) over
a ``features`` dataset or over a trained run's frozen towers — tracked, resumable, tuneable, exportable, and
``gssf evaluate --embeddings FILE --head RUN``.

One working directory (tracking store, datasets, runs) serves the module: a paired features dataset whose two
sides are noisy views of one latent (CLIP-like: already aligned, so cosine is a fair start), and the runs the
tests share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.core.config import default_of, from_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.data.dataset import Dataset
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.model import build_model, embed_split, head_dim
from gssf_cli.modeling.similarity import head_parameters
from gssf_cli.tracking.adapter import Tracker
from gssf_cli.training.loop import Trainer, fit

ENV = {"COLUMNS": "120", "NO_COLOR": "1"}
F = 16
HEAD = ["--metric", "gssf", "--block-size", "4", "--batch-size", "32", "--lr", "0.003", "--device", "cpu"]


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


def _ok(*args: str) -> dict[str, Any]:
    result = _cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def _one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("gssf: error: "), result.stderr
    return lines[0]


def _write_views(path: Path, n: int = 240, dims: tuple[int, int] = (F, F), seed: int = 0) -> Path:
    """Paired features: two noisy linear views of one latent per pair (the same map, so they are aligned)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    mix = rng.normal(size=(6, max(dims)))
    images = latent @ mix[:, : dims[0]] + 0.4 * rng.normal(size=(n, dims[0]))
    texts = latent @ mix[:, : dims[1]] + 0.4 * rng.normal(size=(n, dims[1]))
    np.savez(path, images=images.astype(np.float32), texts=texts.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def headdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("head_only")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        _ok("prepare", "--dataset", "features", "--source", str(_write_views(folder / "views.npz")), "--out", "data/f")
        yield folder


@pytest.fixture(scope="module")
def identity_run(headdir: Path) -> dict[str, Any]:
    """A tracked head-only run over the features themselves, with adapters."""
    return _ok("train", "--data", "data/f", "--encoder", "identity", "--adapter", "--embed-dim", "16", "--epochs", "2",
               *HEAD)  # fmt: skip


def test_identity_run_trains_only_a_head_and_is_tracked(identity_run: dict[str, Any]) -> None:
    run = Tracker().client.get_run(identity_run["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.encoder"] == "identity" and params["train.adapter"] == "true"
    adapters = 2 * (F * 16 + 16)
    assert int(params["params_total"]) == adapters + 16 + 16 * 4 == int(params["params_trainable"])
    assert identity_run["metrics"]["val_rsum"] > 0
    state = ckpt.saved_state(Path(identity_run["out_dir"]) / ckpt.BEST)
    assert state["config"]["encoder"] == "identity" and "mlp_layers" not in state["config"]


def test_identity_without_adapter_reads_the_feature_size(headdir: Path) -> None:
    """``--embed-dim`` is not needed: D is the feature size, and the block size is checked against it."""
    config = from_dict(TrainConfig, {"data": Path("data/f"), "encoder": "identity", "block_size": 8}, "train")
    trainer = Trainer(config, Dataset(Path("data/f")))
    assert trainer.config.embed_dim == F == trainer.model.similarity.dim
    assert trainer.model.parameter_counts()["total"] == F + F * 8
    with pytest.raises(UserInputError, match=r"--encoder identity: the head reads the feature size, D = 16; block "
                       r"size 5 does not divide the embedding size 16; valid block sizes: 1, 2, 4, 8, 16"):  # fmt: skip
        Trainer(from_dict(TrainConfig, {"data": Path("data/f"), "encoder": "identity", "block_size": 5}, "train"),
                Dataset(Path("data/f")))  # fmt: skip


@pytest.mark.parametrize("feature_dim", [F, 8])
def test_adapters_start_at_the_identity_so_first_scores_are_cosine(headdir: Path, feature_dim: int) -> None:
    """With F = D the adapter is the identity; with F < D it is [I; 0]: either way the untrained model's scores
    are the cosine of the raw features."""
    from gssf_cli.modeling.model import build_model_for

    manifest = {
        "kind": "features",
        "task": "cross_modal",
        "modalities": {
            "image": {"type": "features", "shape": [feature_dim]},
            "text": {"type": "features", "shape": [feature_dim]},
        },
    }
    values = {"data": Path("d"), "encoder": "identity", "adapter": True, "embed_dim": F, "block_size": 4}
    model = build_model_for(manifest, from_dict(TrainConfig, values, "train"))
    x, y = torch.randn(5, feature_dim), torch.randn(7, feature_dim)
    cosine = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    with torch.no_grad():
        scores = model.scores(model.encode_images(x), model.encode_texts(y))
    torch.testing.assert_close(scores, cosine, atol=1e-6, rtol=0)


class Interrupted(Exception):
    pass


def _resume_matches(config: TrainConfig, out: Path) -> None:
    whole = fit(config, Dataset(config.data), out / "whole")

    def stop_after_first(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(config.data), out / "cut", on_epoch_end=stop_after_first)
    resumed = fit(config, Dataset(config.data), out / "cut", resume_from=out / "cut" / ckpt.LAST)
    assert resumed.epochs_run == 1 and resumed.best_epoch == whole.best_epoch
    drop = {"samples_per_s"}
    assert {k: v for k, v in resumed.metrics.items() if k not in drop} == pytest.approx(
        {k: v for k, v in whole.metrics.items() if k not in drop}
    )
    a, b = ckpt.load(out / "whole" / ckpt.LAST).model, ckpt.load(out / "cut" / ckpt.LAST).model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained_run(headdir: Path) -> Path:
    """A run whose towers (2-layer feature MLPs) were trained, untracked, in runs/towers."""
    values = {"data": Path("data/f"), "embed_dim": 8, "block_size": 4, "epochs": 1, "batch_size": 32,
              "mlp_hidden": 12, "device": "cpu"}  # fmt: skip
    fit(from_dict(TrainConfig, values, "train"), Dataset(Path("data/f")), Path("runs/towers"))
    return Path("runs/towers")


def _frozen(**overrides: Any) -> TrainConfig:
    values = {"data": Path("data/f"), "encoder": "frozen", "encoder_run": "towers", "adapter": True,
              "block_size": 4, "epochs": 2, "batch_size": 32, "lr": 0.003, "device": "cpu", **overrides}  # fmt: skip
    return from_dict(TrainConfig, values, "train")


def test_resume_equals_uninterrupted(headdir: Path, trained_run: Path) -> None:
    identity = {"data": Path("data/f"), "encoder": "identity", "adapter": True, "embed_dim": 8, "block_size": 4,
                "epochs": 2, "batch_size": 32, "lr": 0.003, "device": "cpu"}  # fmt: skip
    _resume_matches(from_dict(TrainConfig, identity, "train"), headdir / "resume_identity")
    _resume_matches(_frozen(), headdir / "resume_frozen")


def test_frozen_towers_do_not_learn_and_the_checkpoint_stands_alone(headdir: Path, trained_run: Path) -> None:
    original = ckpt.load(trained_run / ckpt.BEST).model
    trainer = Trainer(_frozen(), Dataset(Path("data/f")))
    assert (trainer.config.embed_dim, trainer.config.mlp_layers, trainer.config.mlp_hidden) == (8, 2, 12)
    counts = trainer.model.parameter_counts()
    assert counts["trainable"] == 2 * (8 * 8 + 8) + 8 + 8 * 4 < counts["total"]
    result = trainer.fit(headdir / "runs" / "frozen")
    saved = ckpt.load(result.out_dir / ckpt.BEST).model
    towers = {k: v for k, v in original.items() if k.startswith("encoder.")}
    for key, value in towers.items():
        side, rest = key.removeprefix("encoder.").split(".", 1)
        assert torch.equal(saved[f"encoder.{side}.tower.{rest}"], value), key
    assert not torch.equal(saved["encoder.image.adapter.weight"], torch.eye(8)), "the adapters learn"
    assert not torch.equal(saved["similarity.diagonal"], torch.ones(8)), "the head learns"

    # Rebuilt from its own checkpoint (the frozen run gone), the model embeds raw features as in training.
    config = from_dict(TrainConfig, ckpt.saved_state(result.out_dir / ckpt.BEST)["config"], "train")
    moved = trained_run.with_name("gone")
    trained_run.rename(moved)
    try:
        model = build_model(Dataset(Path("data/f")), config)
        from gssf_cli.modeling.model import load_weights

        load_weights(model, saved)
        images, texts = embed_split(model, Dataset(Path("data/f")).split("dev"), torch.device("cpu"))
        assert images.shape[1] == texts.shape[1] == 8
    finally:
        moved.rename(trained_run)


def test_frozen_refusals(headdir: Path, trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="keeps run towers's towers as they are"):
        Trainer(_frozen(mlp_layers=3), Dataset(Path("data/f")))
    with pytest.raises(UserInputError, match="--encoder-run nope: no checkpoint at runs/nope/best"):
        Trainer(_frozen(encoder_run="nope"), Dataset(Path("data/f")))
    _ok(
        "prepare", "--dataset", "features", "--source", str(_write_views(tmp_path / "o.npz", seed=1)), "--out", "data/o"
    )
    with pytest.raises(UserInputError, match="was trained on another dataset than data/o"):
        Trainer(_frozen(data=Path("data/o")), Dataset(Path("data/o")))


def test_tune_over_block_size_on_a_head_only_base(headdir: Path) -> None:
    bad = _cli("tune", "--data", "data/f", "--param", "block_size", "--values", "4,5", "--base", "encoder=identity")
    assert "--encoder identity: the head reads the feature size, D = 16; block size 5 does not divide" in _one_line(bad)
    tune = _ok("tune", "--data", "data/f", "--param", "block_size", "--values", "4,8", "--base", "encoder=identity",
               "--base", "batch_size=32", "--epochs", "1")  # fmt: skip
    assert sorted(t["values"]["block_size"] for t in tune["trials"]) == [4, 8]
    assert all(t["status"] == "FINISHED" and t["error"] is None for t in tune["trials"])
    metric = default_of(TrainConfig, "metric")
    sizes = {t["values"]["block_size"]: t["head_params"] for t in tune["trials"]}
    assert sizes == {d: head_parameters(metric, F, d) for d in (4, 8)}, "head sizes are of the real D, the features'"
    children = Tracker().child_runs(tune["run_id"])
    assert {c.data.params["train.encoder"] for c in children} == {"identity"}
    assert head_dim(from_dict(TrainConfig, {"data": "data/f", "encoder": "identity", "block_size": 4}, "train")) == F


def test_export_of_a_head_only_run_passes_parity(identity_run: dict[str, Any]) -> None:
    bundle = _ok("export", "--onnx", "--run", identity_run["run_id"], "--out", "exports/identity")
    assert bundle["passed"] and set(bundle["graphs"]) == {"image_encoder", "text_encoder", "metric_head"}
    manifest = json.loads(Path("exports/identity/manifest.json").read_text())
    assert manifest["encoders"]["kind"] == "identity" and manifest["encoders"]["adapter"] is True
    assert "holds just the metric head and the adapters" in manifest["encoders"]["note"]


def test_evaluate_embeddings_with_a_head_equals_evaluate_run(identity_run: dict[str, Any]) -> None:
    test = np.load("data/f/test_ims.npy"), np.load("data/f/test_txts.npy")
    np.savez("test_views.npz", images=test[0], texts=test[1])
    by_run = _ok("evaluate", "--run", identity_run["run_id"])
    by_head = _ok("evaluate", "--embeddings", "test_views.npz", "--head", identity_run["run_id"])
    keys = [k for k, v in by_run.items() if isinstance(v, float) and k != "seconds"]
    assert keys and {k: by_head[k] for k in keys} == pytest.approx({k: by_run[k] for k in keys})
    assert by_head["model_info"]["train_run_id"] == identity_run["run_id"]
    assert by_head["model_info"]["source"] == "head" and by_head["model_info"]["encoder"] == "identity"


def test_bad_head_only_input_exits_2_and_leaves_no_run(headdir: Path, identity_run: dict[str, Any]) -> None:
    np.savez("narrow.npz", images=np.ones((4, 5), np.float32), texts=np.ones((4, 5), np.float32))
    _ok("prepare", "--dataset", "features", "--source", str(_write_views(headdir / "wide.npz", n=40, dims=(16, 12))),
        "--out", "data/w")  # fmt: skip
    from tests.conftest import tiny_synthetic_args

    assert _cli(*tiny_synthetic_args("data/syn")).exit_code == 0
    runs_before = len(Tracker().client.search_runs([Tracker().experiment_id]))
    cases = [
        (["train", "--data", "data/syn", "--encoder", "identity"], "--encoder identity reads feature vectors, but this "
         "dataset's images are regions and texts are captions: train a run on it, then train a head over its towers "
         "with --encoder frozen --encoder-run RUN"),
        (["train", "--data", "data/w", "--encoder", "identity"], "image features have 16 channels and text features "
         "12, but the head reads one size; add --adapter"),
        (["evaluate", "--embeddings", "narrow.npz", "--head", identity_run["run_id"]], "narrow.npz:images: rows of 5 "
         "values, but the head reads 16 (the features of its dataset)"),
        (["evaluate", "--embeddings", "narrow.npz", "--head", "nope"], "unknown run 'nope'"),
        (["evaluate", "--run", identity_run["run_id"], "--head", identity_run["run_id"]], "--head RUN scores an "
         "--embeddings file"),
        (["train", "--data", "data/f", "--encoder", "identity", "--mlp-layers", "2"], "--mlp-layers shapes trained "
         "towers, and --encoder identity trains none"),
    ]  # fmt: skip
    for args, message in cases:
        assert message in _one_line(_cli(*args)), args
    assert len(Tracker().client.search_runs([Tracker().experiment_id])) == runs_before


def test_a_tracked_frozen_run_exports_its_towers_with_parity(trained_run: Path) -> None:
    """The bundle of a head over frozen towers deploys end to end: the towers are in its encoder graphs."""
    frozen = _ok("train", "--data", "data/f", "--encoder", "frozen", "--encoder-run", "towers", "--epochs", "1", *HEAD)
    params = Tracker().client.get_run(frozen["run_id"]).data.params
    assert params["train.encoder"] == "frozen" and params["train.encoder_run"] == "towers"
    assert frozen["parameters"]["trainable"] == 8 + 8 * 4 < frozen["parameters"]["total"]
    bundle = _ok("export", "--onnx", "--run", frozen["run_id"], "--out", "exports/frozen")
    assert bundle["passed"]
    manifest = json.loads(Path("exports/frozen/manifest.json").read_text())
    assert manifest["encoders"]["kind"] == "frozen" and "deploys end to end" in manifest["encoders"]["note"]
