"""Bad input to any command exits 2 with one readable line and leaves nothing behind: no file, no folder, no
MLflow run. Every case here must fail in the up-front checks, before any training or Ray start (which keeps
the table fast): a case that trains first is a bug in the checks, not a slow test.

Cases that need a dataset or a trained run copy a template (a tiny synthetic dataset, a prepare run and a
one-epoch train run in a SQLite store), built once per session.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from tests.conftest import tiny_synthetic_args
from tests.factories import write_feature_folder, write_feature_npz, write_precomp

Gssf = Callable[..., Result]
Setup = Callable[[Path], list[str]]
DATA = "data/syn"
TRAIN = ["train", "--data", DATA, "--epochs", "1", "--embed-dim", "16", "--block-size", "4", "--word-dim", "8",
         "--batch-size", "16", "--device", "cpu"]  # fmt: skip
TUNE = ["tune", "--data", DATA, "--epochs", "1", "--base", "embed_dim=16", "--base", "word_dim=8",
        "--base", "metric=bdiag"]  # fmt: skip
CPUS = os.cpu_count() or 1
CLOSED_PORT = 9
"""The discard port: nothing listens there on a test machine, so a connection is refused at once."""
_SILENT = socket.create_server(("127.0.0.1", 0))
SILENT_PORT = _SILENT.getsockname()[1]
"""A port that accepts connections and never answers (a web server or a proxy would answer, but not in gRPC)."""
NOT_UTF8 = 'lr = 0.001\nname = "caf\xe9"\n'.encode("latin-1")


# ---------------------------------------------------------------------------------------------------------
# The template: a dataset, a prepare run and a trained run, built once


@dataclass(frozen=True)
class Template:
    folder: Path
    train_run: str
    prepare_run: str


_TEMPLATE: list[Template] = []


@pytest.fixture(scope="session")
def _template_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Template]:
    def build() -> Template:
        if not _TEMPLATE:
            folder = tmp_path_factory.mktemp("bad-input-template")
            runner = CliRunner()
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(folder)
                for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
                    patch.delenv(name, raising=False)
                ids = []
                for args in ([*tiny_synthetic_args(DATA), "--json"], [*TRAIN, "--json"]):
                    result = runner.invoke(app, args, env={"COLUMNS": "120", "NO_COLOR": "1"})
                    assert result.exit_code == 0, result.stderr
                    ids.append(json.loads(result.stdout)["run_id"])
            _TEMPLATE.append(Template(folder, train_run=ids[1], prepare_run=ids[0]))
        return _TEMPLATE[0]

    return build


_BUILD: list[Callable[[], Template]] = []


@pytest.fixture(autouse=True)
def _template_available(_template_factory: Callable[[], Template]) -> None:
    _BUILD[:] = [_template_factory]


def _copy_template(w: Path) -> Template:
    """Copy the template's dataset, tracking store and run folders into ``w``."""
    template = _BUILD[0]()
    shutil.copytree(template.folder, w, dirs_exist_ok=True)
    return template


def _run(w: Path) -> str:
    return _copy_template(w).train_run


def _dataset(w: Path) -> Path:
    _copy_template(w)
    return w / DATA


def _rewrite_manifest(folder: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Record the dataset's files as they are now (so that checksums pass), after ``edit`` of its fields."""
    from gssf_cli.data.manifest import write_manifest

    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("files", "format_version", "created_by"):
        manifest.pop(key)
    if edit is not None:
        edit(manifest)
    (folder / "manifest.json").unlink()
    write_manifest(folder, manifest)


def _edit_manifest(w: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = _dataset(w) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _pipeline(w: Path, extra: str = "", prepare_out: str = "data/pp") -> list[str]:
    (w / "p.toml").write_text(
        f'[prepare]\ndataset = "synthetic"\nout = "{prepare_out}"\ntrain_images = 40\ndev_images = 10\n'
        "test_images = 10\nregions = 4\nregion_dim = 8\nconcepts = 6\nvocab_size = 30\n\n"
        '[train]\nembed_dim = 16\nword_dim = 8\nblock_size = 4\nepochs = 1\nbatch_size = 16\ndevice = "cpu"\n'
        f"{extra}"
    )
    return ["run", "p.toml"]


# ---------------------------------------------------------------------------------------------------------
# prepare


def _precomp(workdir: Path, **kwargs: object) -> Path:
    return write_precomp(workdir / "src", **kwargs)  # type: ignore[arg-type]


def _imbalance(*flags: str, dataset: str = "synthetic") -> Setup:
    return lambda w: ["prepare", "--dataset", dataset, "--out", "data/x", *flags]


def _region_insufficiency_without_a_record(w: Path) -> list[str]:
    """A precomp dataset knows no concept regions: region insufficiency cannot know what to replace."""
    from gssf_cli.core.stage_configs import PrepareConfig
    from gssf_cli.stages import prepare

    prepare.run(PrepareConfig(dataset="precomp", source=_precomp(w), out=w / "data/p"))
    return [
        "prepare",
        "--dataset",
        "imbalance",
        "--source",
        "data/p",
        "--region-insufficiency",
        "0.5",
        "--out",
        "data/x",
    ]


def _missing_source(w: Path) -> list[str]:
    return ["prepare", "--dataset", "precomp", "--source", "nowhere", "--out", "data/x"]


def _wrong_shape(w: Path) -> list[str]:
    src = _precomp(w)
    np.save(src / "dev_ims.npy", np.zeros((3, 2, 2, 2), dtype=np.float32))
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _wrong_dtype(w: Path) -> list[str]:
    src = _precomp(w)
    np.save(src / "dev_ims.npy", np.zeros((3, 3, 6), dtype=np.int32))
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _caption_count(w: Path) -> list[str]:
    src = _precomp(w)
    lines = (src / "test_caps.txt").read_text().splitlines()
    (src / "test_caps.txt").write_text("\n".join(lines[:-2]) + "\n")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _nan(w: Path) -> list[str]:
    src = _precomp(w)
    ims = np.load(src / "train_ims.npy")
    ims[5, 1, 2] = np.nan
    np.save(src / "train_ims.npy", ims)
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _inf(w: Path) -> list[str]:
    src = write_feature_folder(w / "src")
    texts = np.load(src / "dev_texts.npy")
    texts[0, 0] = np.inf
    np.save(src / "dev_texts.npy", texts)
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _inf_in_npz(w: Path) -> list[str]:
    write_feature_npz(w / "f.npz", paired=False)
    with np.load(w / "f.npz") as npz:
        arrays = dict(npz)
    arrays["features"][7, 1] = -np.inf
    np.savez(w / "f.npz", **arrays)
    return ["prepare", "--dataset", "features", "--source", "f.npz", "--out", "data/x"]


def _object_array(w: Path) -> list[str]:
    src = write_feature_folder(w / "src")
    np.save(src / "train_images.npy", np.array([[1.0], "x"], dtype=object), allow_pickle=True)
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _empty_split(w: Path) -> list[str]:
    src = _precomp(w)
    np.save(src / "dev_ims.npy", np.zeros((0, 3, 6), dtype=np.float32))
    (src / "dev_caps.txt").write_text("")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _non_utf8(w: Path) -> list[str]:
    src = _precomp(w)
    (src / "train_caps.txt").write_bytes((src / "train_caps.txt").read_bytes() + "café\n".encode("latin-1"))
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _empty_caption(w: Path) -> list[str]:
    src = _precomp(w)
    lines = (src / "dev_caps.txt").read_text().splitlines()
    lines[4] = "   "
    (src / "dev_caps.txt").write_text("\n".join(lines) + "\n")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _missing_captions(w: Path) -> list[str]:
    src = _precomp(w)
    (src / "dev_caps.txt").unlink()
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _corrupt_npy(w: Path) -> list[str]:
    src = _precomp(w)
    (src / "train_ims.npy").write_bytes(b"\x93NUMPY garbage")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _labels_mismatch(w: Path) -> list[str]:
    src = write_feature_folder(w / "src", paired=False)
    np.save(src / "test_labels.npy", np.zeros(5, dtype=np.int64))
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _labels_not_integer(w: Path) -> list[str]:
    src = write_feature_folder(w / "src", paired=False)
    np.save(src / "train_labels.npy", np.zeros(12, dtype=np.float32))
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _texts_not_multiple(w: Path) -> list[str]:
    src = write_feature_folder(w / "src")
    np.save(src / "train_texts.npy", np.zeros((13, 7), dtype=np.float32))
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _output_exists(w: Path) -> list[str]:
    (w / "data" / "x").mkdir(parents=True)
    (w / "data" / "x" / "keep.txt").write_text("mine")
    return [*tiny_synthetic_args("data/x")]


def _unwritable_output(w: Path) -> list[str]:
    (w / "data").write_text("a file where a folder should be")
    return [*tiny_synthetic_args("data/x")]


def _output_below_a_file(w: Path) -> list[str]:
    (w / "f").write_text("a file")
    return [*tiny_synthetic_args("f/deeper/x")]


def _unknown_kind(w: Path) -> list[str]:
    return ["prepare", "--dataset", "imagenet", "--out", "data/x"]


def _unknown_config_key(w: Path) -> list[str]:
    (w / "p.toml").write_text('dataset = "digits"\nout = "data/x"\nsplit_seed = 3\n')
    return ["prepare", "--config", "p.toml"]


def _prepare_config_not_utf8(w: Path) -> list[str]:
    (w / "p.toml").write_bytes(b'dataset = "digits"\nout = "data/\xe9"\n')
    return ["prepare", "--config", "p.toml"]


def _prepare_config_is_a_folder(w: Path) -> list[str]:
    (w / "p.toml").mkdir()
    return ["prepare", "--config", "p.toml"]


def _bad_tracking_uri(w: Path) -> list[str]:
    return ["--tracking-uri", "nosuchscheme://x", *tiny_synthetic_args("data/x")]


def _too_many_images(w: Path) -> list[str]:
    return [*tiny_synthetic_args("data/x"), "--train-images", "1000000000000"]


def _fraction_inf(w: Path) -> list[str]:
    return ["prepare", "--dataset", "digits", "--out", "data/x", "--dev-fraction", "inf"]


def _fraction_nan(w: Path) -> list[str]:
    (w / "p.toml").write_text('dataset = "digits"\nout = "data/x"\ntest_fraction = nan\n')
    return ["prepare", "--config", "p.toml"]


def _too_few_words(w: Path) -> list[str]:
    return [*tiny_synthetic_args("data/x"), "--vocab-size", "10"]


def _zero_regions(w: Path) -> list[str]:
    return [*tiny_synthetic_args("data/x"), "--regions", "0"]


# ---------------------------------------------------------------------------------------------------------
# train


def _train_with(*extra: str) -> Setup:
    def setup(w: Path) -> list[str]:
        _dataset(w)
        return [*TRAIN, *extra]

    return setup


def _train_config(text: str | bytes) -> Setup:
    def setup(w: Path) -> list[str]:
        _dataset(w)
        path = w / "t.toml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return [*TRAIN, "--config", "t.toml"]

    return setup


def _manifest_without(key: str) -> Setup:
    def setup(w: Path) -> list[str]:
        _edit_manifest(w, lambda m: m.pop(key))
        return TRAIN

    return setup


def _manifest_not_an_object(w: Path) -> list[str]:
    (_dataset(w) / "manifest.json").write_text("[1, 2]")
    return TRAIN


def _manifest_not_json(w: Path) -> list[str]:
    (_dataset(w) / "manifest.json").write_text('{"format_version": 1,')
    return TRAIN


def _manifest_bad_task(w: Path) -> list[str]:
    _edit_manifest(w, lambda m: m.update(task="images"))
    return TRAIN


def _manifest_bad_counts(w: Path) -> list[str]:
    _edit_manifest(w, lambda m: m["splits"]["dev"].update(images="ten"))
    return TRAIN


def _dataset_object_array(w: Path) -> list[str]:
    folder = _dataset(w)
    regions = np.empty(40, dtype=object)
    regions[:] = [np.zeros((4, 8))] * 40
    np.save(folder / "train_ims.npy", regions, allow_pickle=True)
    _rewrite_manifest(folder)
    return TRAIN


def _dataset_empty_dev(counted: bool) -> Setup:
    """An empty dev split, its manifest counting it (0 images) or still listing the old count."""

    def setup(w: Path) -> list[str]:
        folder = _dataset(w)
        np.save(folder / "dev_ims.npy", np.zeros((0, 4, 8), dtype=np.float32))
        (folder / "dev_caps.txt").write_text("")
        empty = {"images": 0, "captions": 0}
        _rewrite_manifest(folder, (lambda m: m["splits"].update(dev=empty)) if counted else None)
        return TRAIN

    return setup


def _dataset_integer_regions(w: Path) -> list[str]:
    folder = _dataset(w)
    np.save(folder / "train_ims.npy", np.zeros((40, 4, 8), dtype=np.int64))
    _rewrite_manifest(folder)
    return TRAIN


def _dataset_wrong_feature_size(w: Path) -> list[str]:
    folder = _dataset(w)
    np.save(folder / "test_ims.npy", np.zeros((10, 4, 9), dtype=np.float32))
    _rewrite_manifest(folder)
    return TRAIN


def _dataset_missing_captions(w: Path) -> list[str]:
    folder = _dataset(w)
    (folder / "dev_caps.txt").unlink()
    _rewrite_manifest(folder)
    return TRAIN


def _dataset_changed(w: Path) -> list[str]:
    folder = _dataset(w)
    (folder / "test_caps.txt").write_text((folder / "test_caps.txt").read_text().replace("w", "v", 1))
    return TRAIN


def _labelled_dataset_with_float_labels(w: Path) -> list[str]:
    from gssf_cli.core.stage_configs import PrepareConfig
    from gssf_cli.stages import prepare

    write_feature_npz(w / "f.npz", paired=False)
    prepare.run(PrepareConfig(dataset="features", source=w / "f.npz", out=w / "data" / "lab"))
    np.save(w / "data" / "lab" / "dev_labels.npy", np.load(w / "data" / "lab" / "dev_labels.npy").astype(np.float32))
    _rewrite_manifest(w / "data" / "lab")
    return ["train", "--data", "data/lab", "--epochs", "1", "--device", "cpu"]


def _teacher(images: np.ndarray, texts: np.ndarray | None = None) -> Setup:
    def setup(w: Path) -> list[str]:
        _dataset(w)
        np.savez(w / "t.npz", images=images, texts=np.zeros((200, 3), np.float32) if texts is None else texts)
        return [*TRAIN, "--distill-weight", "1", "--teacher", "t.npz"]

    return setup


def _teacher_nan() -> Setup:
    texts = np.zeros((200, 3), np.float32)
    texts[17, 2] = np.nan
    return _teacher(np.zeros((40, 3), np.float32), texts)


def _resume_unknown(w: Path) -> list[str]:
    _dataset(w)
    return ["train", "--resume", "0123456789abcdef"]


def _resume_corrupt_state(w: Path) -> list[str]:
    run = _run(w)
    (w / "runs" / run / "checkpoint" / "state.json").write_text("{not json")
    return ["train", "--resume", run]


# ---------------------------------------------------------------------------------------------------------
# evaluate and export (of the template's trained run)


def _on_run(*args: str) -> Setup:
    """``args`` with ``RUN`` replaced by the template's train run."""

    def setup(w: Path) -> list[str]:
        run = _run(w)
        return [run if a == "RUN" else a for a in args]

    return setup


def _evaluate_prepare_run(w: Path) -> list[str]:
    return ["evaluate", "--run", _copy_template(w).prepare_run]


def _embeddings_nan(w: Path) -> list[str]:
    images = np.random.default_rng(0).normal(size=(10, 4))
    images[3, 0] = np.nan
    np.savez(w / "e.npz", images=images, texts=np.ones((10, 4)))
    return ["evaluate", "--embeddings", "e.npz"]


def _corrupt_best_state(command: str) -> Setup:
    def setup(w: Path) -> list[str]:
        run = _run(w)
        (w / "runs" / run / "best" / "state.json").write_text("{not json")
        return [command, "--run", run] + (["--onnx"] if command == "export" else [])

    return setup


def _wrong_tensor_shape(w: Path) -> list[str]:
    from safetensors.numpy import load_file, save_file

    run = _run(w)
    path = w / "runs" / run / "best" / "model.safetensors"
    weights = load_file(str(path))
    weights["encoder.image.proj.proj.bias"] = np.zeros((3, 3), dtype=np.float32)
    save_file(weights, str(path))
    return ["evaluate", "--run", run]


def _evaluate_on_other_data(w: Path) -> list[str]:
    run = _run(w)
    folder = w / DATA
    for split in ("train", "dev", "test"):
        rows = len(np.load(folder / f"{split}_ims.npy"))
        np.save(folder / f"{split}_ims.npy", np.ones((rows, 4, 9), dtype=np.float32))
    _rewrite_manifest(folder, lambda m: m["modalities"]["image"].update(shape=[4, 9]))
    return ["evaluate", "--run", run, "--data", DATA]


def _export_out_exists(w: Path) -> list[str]:
    run = _run(w)
    (w / "exports" / "mine").mkdir(parents=True)
    (w / "exports" / "mine" / "keep.txt").write_text("mine")
    return ["export", "--onnx", "--run", run, "--out", "exports/mine"]


def _export_out_below_a_file(w: Path) -> list[str]:
    run = _run(w)
    (w / "ef").write_text("a file")
    return ["export", "--onnx", "--run", run, "--out", "ef/bundle"]


def _export_default_out_below_a_file(w: Path) -> list[str]:
    run = _run(w)
    (w / "exports").write_text("a file")
    return ["export", "--onnx", "--run", run]


# ---------------------------------------------------------------------------------------------------------
# tune


def _tune_with(*extra: str) -> Setup:
    def setup(w: Path) -> list[str]:
        _dataset(w)
        return [*TUNE, *extra]

    return setup


def _tune_storage_below_a_file(w: Path) -> list[str]:
    _dataset(w)
    (w / "sf").write_text("a file")
    return [*TUNE, "--param", "block_size=4,8", "--storage", "sf/ray"]


def _tune_runs_below_a_file(w: Path) -> list[str]:
    _dataset(w)
    (w / "rf").write_text("a file")
    return [*TUNE, "--param", "block_size=4,8", "--base", "runs_dir=rf/runs"]


def _tune_config_not_utf8(w: Path) -> list[str]:
    _dataset(w)
    (w / "t.toml").write_bytes(NOT_UTF8)
    return [*TUNE, "--param", "block_size=4,8", "--config", "t.toml"]


# ---------------------------------------------------------------------------------------------------------
# run (pipelines): every stage's settings, tune's space and the output folders are checked before prepare


def _pipe(extra: str = "", file: str | None = None, prepare_out: str = "data/pp") -> Setup:
    def setup(w: Path) -> list[str]:
        if file is not None:
            (w / file).write_text("a file where a folder should be")
        return _pipeline(w, extra, prepare_out)

    return setup


def _pipeline_not_utf8(w: Path) -> list[str]:
    (w / "p.toml").write_bytes(b'[train]\nmetric = "\xe9"\n')
    return ["run", "p.toml"]


CASES: dict[str, tuple[Setup, str]] = {
    # prepare
    "prepare: missing source": (_missing_source, "source nowhere not found"),
    "prepare: a share of 1": (_imbalance("--caption-noise", "1"), "prepare.caption_noise: must be in [0, 1)"),
    "prepare: a negative share": (
        _imbalance("--region-insufficiency", "-0.1"),
        "prepare.region_insufficiency: must be",
    ),
    "prepare: imbalance of digits": (
        _imbalance("--caption-noise", "0.3", dataset="digits"),
        "the imbalance options apply to --dataset synthetic",
    ),
    "prepare: imbalance with no knob": (
        lambda w: ["prepare", "--dataset", "imbalance", "--source", "data/syn", "--out", "data/x"],
        "--dataset imbalance makes a dataset imbalanced: give --caption-noise",
    ),
    "prepare: imbalance of an unknown split": (
        _imbalance("--caption-noise", "0.3", "--imbalance-splits", "val"),
        "--imbalance-splits: splits among train",
    ),
    "prepare: region insufficiency without a record": (
        _region_insufficiency_without_a_record,
        "--region-insufficiency needs to know which regions show a concept",
    ),
    "prepare: wrong shape": (_wrong_shape, "dev_ims.npy: expected a 2-D or 3-D array, got shape [3, 2, 2, 2]"),
    "prepare: wrong dtype": (_wrong_dtype, "dev_ims.npy: expected floating-point values, got dtype int32"),
    "prepare: caption count": (_caption_count, "test_ims.npy: 4 images but 18 captions"),
    "prepare: nan": (_nan, "train_ims.npy: contains NaN or Inf (first at row 5)"),
    "prepare: inf": (_inf, "dev_texts: contains NaN or Inf (first at row 0)"),
    "prepare: -inf in an npz": (_inf_in_npz, "f.npz:features: contains NaN or Inf (first at row 7)"),
    "prepare: object array": (_object_array, "train_images.npy: not a readable .npy array"),
    "prepare: empty split": (_empty_split, "dev_ims.npy: the array is empty"),
    "prepare: non-utf8 captions": (_non_utf8, "train_caps.txt: line 41 is not valid UTF-8"),
    "prepare: empty caption": (_empty_caption, "dev_caps.txt: line 5 is an empty caption"),
    "prepare: missing captions": (_missing_captions, "dev_caps.txt: missing"),
    "prepare: corrupt npy": (_corrupt_npy, "train_ims.npy: not a readable .npy array"),
    "prepare: labels length": (_labels_mismatch, "test_labels: 5 labels for 6 feature rows"),
    "prepare: labels dtype": (_labels_not_integer, "train_labels: expected a 1-D integer array"),
    "prepare: texts per image": (_texts_not_multiple, "train_texts: 13 rows is not a multiple of the 12 images"),
    "prepare: output exists": (_output_exists, "already exists: pass --force"),
    "prepare: unwritable output": (_unwritable_output, "cannot create output folder data"),
    "prepare: output below a file": (_output_below_a_file, "cannot create output folder f/deeper: f is a file"),
    "prepare: unknown kind": (_unknown_kind, "prepare.dataset: 'imagenet' is not one of synthetic, digits"),
    "prepare: unknown config key": (_unknown_config_key, "prepare.split_seed: unknown key"),
    "prepare: config not utf-8": (_prepare_config_not_utf8, "p.toml: not valid TOML (line 2 is not UTF-8"),
    "prepare: config is a folder": (_prepare_config_is_a_folder, "p.toml: is a folder, not a TOML file"),
    "prepare: bad tracking uri": (_bad_tracking_uri, "cannot use tracking store nosuchscheme://x"),
    "prepare: too many images": (_too_many_images, "of memory to generate, but this machine has"),
    "prepare: fraction inf": (_fraction_inf, "prepare.dev_fraction: must be a finite number, got inf"),
    "prepare: fraction nan": (_fraction_nan, "prepare.test_fraction: must be a finite number, got nan"),
    "prepare: too few words": (_too_few_words, "prepare.vocab_size: 6 concepts need at least 21 words"),
    "prepare: zero regions": (_zero_regions, "prepare.regions: must be at least 1, got 0"),
    # train
    "train: lr inf": (_train_with("--lr", "inf"), "train.lr: must be a finite number, got inf"),
    "train: lr nan": (_train_with("--lr", "nan"), "train.lr: must be a finite number, got nan"),
    "train: margin inf": (_train_with("--margin", "inf"), "train.margin: must be a finite number, got inf"),
    "train: weight decay inf": (_train_with("--weight-decay", "inf"), "train.weight_decay: must be a finite"),
    "train: grad clip -inf": (_train_with("--grad-clip", "-inf"), "train.grad_clip: must be a finite number"),
    "train: lr inf in a file": (_train_config("lr = inf\n"), "train.lr: must be a finite number, got inf"),
    "train: lr_decay nan in a file": (_train_config("lr_decay = nan\n"), "train.lr_decay: must be a finite"),
    "train: config not utf-8": (_train_config(NOT_UTF8), "t.toml: not valid TOML (line 2 is not UTF-8"),
    "train: unknown config key": (_train_config("learning_rate = 0.1\n"), "train.learning_rate: unknown key"),
    "train: config wrong type": (_train_config('seed = "ten"\n'), "train.seed: expected an integer"),
    "train: more workers than CPUs": (
        _train_with("--workers", str(CPUS + 1)),
        f"--workers {CPUS + 1}: needs {CPUS + 1} CPUs (1 per worker, --threads), but this machine has {CPUS}",
    ),
    "train: workers times threads": (
        _train_with("--workers", "2", "--threads", str(CPUS)),
        f"--workers 2: needs {2 * CPUS} CPUs ({CPUS} per worker, --threads), but this machine has {CPUS}",
    ),
    "train: no cluster at the address": (
        _train_with("--workers", "2", "--address", f"127.0.0.1:{CLOSED_PORT}"),
        f"--address 127.0.0.1:{CLOSED_PORT}: no Ray cluster answers there",
    ),
    "train: address without a port": (_train_with("--address", "somewhere"), "--address somewhere: expected HOST:PORT"),
    "train: not Ray at the address": (
        _train_with("--workers", "2", "--address", f"127.0.0.1:{SILENT_PORT}"),
        f"--address 127.0.0.1:{SILENT_PORT}: something listens there, but not Ray",
    ),
    "train: seeds with more workers than CPUs": (
        _train_with("--workers", str(CPUS + 1), "--seeds", "0,1"),
        f"--workers {CPUS + 1}: needs {CPUS + 1} CPUs",
    ),
    "tune: no cluster at the address": (
        _tune_with("--param", "block_size=4,8", "--address", f"127.0.0.1:{CLOSED_PORT}"),
        f"--address 127.0.0.1:{CLOSED_PORT}: no Ray cluster answers there",
    ),
    "train: block size": (_train_with("--block-size", "5"), "block size 5 does not divide the embedding size 16"),
    "train: huge embedding": (
        _train_with("--embed-dim", "16777216", "--block-size", "1"),
        "with embed_dim 16777216 and word_dim 8 the model would have",
    ),
    "train: absurd embedding": (
        _train_with("--embed-dim", "1" + "0" * 30, "--block-size", "7"),
        "train.embed_dim: must be in [1, 16,777,216], got 1000000000000000000000000000000",
    ),
    "train: missing dataset": (lambda w: ["train", "--data", "nowhere"], "dataset folder nowhere not found"),
    "train: manifest without splits": (_manifest_without("splits"), "manifest.json: splits: expected an object"),
    "train: manifest without task": (_manifest_without("task"), "manifest.json: task: expected a string, got missing"),
    "train: manifest not an object": (_manifest_not_an_object, "manifest.json: expected a JSON object, got list"),
    "train: manifest not json": (_manifest_not_json, "manifest.json: not valid JSON"),
    "train: manifest bad task": (_manifest_bad_task, "manifest.json: task: expected one of cross_modal, labels"),
    "train: manifest bad counts": (_manifest_bad_counts, "splits.dev.images: expected a count"),
    "train: dataset object array": (_dataset_object_array, "train_ims.npy: not a readable .npy array"),
    "train: dataset empty dev split": (_dataset_empty_dev(counted=True), "dev_ims.npy: the split is empty"),
    "train: dataset emptied dev split": (
        _dataset_empty_dev(counted=False),
        "dev_ims.npy: 0 rows, the manifest lists 10",
    ),
    "train: dataset integer regions": (_dataset_integer_regions, "train_ims.npy: expected floating-point values"),
    "train: dataset feature size": (_dataset_wrong_feature_size, "test_ims.npy: expected shape ['N', 4, 8]"),
    "train: dataset missing captions": (_dataset_missing_captions, "dev_caps.txt: missing"),
    "train: dataset changed": (_dataset_changed, "test_caps.txt: checksum mismatch"),
    "train: dataset float labels": (_labelled_dataset_with_float_labels, "dev_labels.npy: expected integer labels"),
    "train: teacher nan": (_teacher_nan(), "t.npz:texts: contains NaN or Inf (first at row 17)"),
    "train: teacher inf": (_teacher(np.full((40, 3), np.inf, np.float32)), "t.npz:images: contains NaN or Inf"),
    "train: teacher float64 overflow": (_teacher(np.full((40, 3), 1e300)), "t.npz:images: contains NaN or Inf"),
    "train: teacher of strings": (_teacher(np.array([["a"] * 3] * 40)), "t.npz:images: expected a 2-D array"),
    "train: teacher rows": (_teacher(np.zeros((39, 3), np.float32)), "t.npz: 39 images / 200 texts"),
    "train: resume unknown run": (_resume_unknown, "unknown run '0123456789abcdef'"),
    "train: resume corrupt state": (_resume_corrupt_state, "state.json: unreadable"),
    # evaluate
    "evaluate: unknown run": (_on_run("evaluate", "--run", "nosuchrun"), "unknown run 'nosuchrun'"),
    "evaluate: run and embeddings": (_on_run("evaluate", "--run", "RUN", "--embeddings", "e.npz"), "exactly one"),
    "evaluate: k 0": (_on_run("evaluate", "--run", "RUN", "--k", "0"), "evaluate.ks: cut-offs must be positive"),
    "evaluate: k not a list": (_on_run("evaluate", "--run", "RUN", "--k", "1,five"), "--k: expected comma-sep"),
    "evaluate: protocol": (_on_run("evaluate", "--run", "RUN", "--protocol", "x"), "evaluate.protocol: 'x' is not"),
    "evaluate: memory budget": (
        _on_run("evaluate", "--run", "RUN", "--memory-budget-mb", "0"),
        "evaluate.memory_budget_mb: must be at least 1",
    ),
    "evaluate: a prepare run": (_evaluate_prepare_run, "is a prepare run, not a train run"),
    "evaluate: missing embeddings": (
        lambda w: ["evaluate", "--embeddings", "e.npz"],
        "embeddings file e.npz not found",
    ),
    "evaluate: nan embeddings": (_embeddings_nan, "images: contains NaN or Inf"),
    "evaluate: corrupt state": (_corrupt_best_state("evaluate"), "best: unreadable checkpoint"),
    "evaluate: wrong tensor shape": (
        _wrong_tensor_shape,
        "tensor encoder.image.proj.proj.bias has shape [3, 3], the model's [16]",
    ),
    "evaluate: other data": (_evaluate_on_other_data, "tensor encoder.image.proj.proj.weight has shape [16, 8]"),
    # export
    "export: no --onnx": (_on_run("export", "--run", "RUN"), "pass --onnx"),
    "export: opset": (_on_run("export", "--onnx", "--run", "RUN", "--opset", "9"), "export.opset: must be in [18, 23]"),
    "export: atol inf": (_on_run("export", "--onnx", "--run", "RUN", "--atol", "inf"), "export.atol: must be a finite"),
    "export: rtol nan": (_on_run("export", "--onnx", "--run", "RUN", "--rtol", "nan"), "export.rtol: must be a finite"),
    "export: parity batch": (
        _on_run("export", "--onnx", "--run", "RUN", "--parity-batch", "1"),
        "export.parity_batch: must be at least 2",
    ),
    "export: unknown run": (_on_run("export", "--onnx", "--run", "nosuchrun"), "unknown run 'nosuchrun'"),
    "export: out exists": (_export_out_exists, "output exports/mine already exists: pass --force"),
    "export: out below a file": (_export_out_below_a_file, "cannot create output folder ef: ef is a file"),
    "export: default out below a file": (_export_default_out_below_a_file, "cannot create output folder exports"),
    "export: corrupt state": (_corrupt_best_state("export"), "best: unreadable checkpoint"),
    # tune
    "tune: grid nan": (_tune_with("--param", "lr=0.002,nan"), "--param lr=0.002,nan: 'nan' is not a finite number"),
    "tune: grid inf": (_tune_with("--param", "weight_decay=0,inf"), "'inf' is not a finite number"),
    "tune: range inf": (_tune_with("--param", "lr=1e-4:inf:log"), "--param lr=1e-4:inf:log: 'inf' is not a finite"),
    "tune: base inf": (_tune_with("--param", "block_size=4,8", "--base", "lr=inf"), "base.lr: must be a finite"),
    "tune: storage below a file": (_tune_storage_below_a_file, "cannot create --storage sf/ray: sf is a file"),
    "train: max failures without workers": (
        lambda w: ["train", "--data", str(_dataset(w)), "--max-failures", "1"],
        "train.max_failures: restarts a group of data-parallel workers; with --workers 1 there is none",
    ),
    "tune: storage in /proc": (
        lambda w: [*TUNE, "--param", "block_size=4,8", "--storage", "/proc/gssf-ray"] if _dataset(w) else [],
        "tune.storage /proc/gssf-ray: Ray cannot keep its results there",
    ),
    "tune: runs folder below a file": (_tune_runs_below_a_file, "cannot create the runs folder rf/runs: rf is a file"),
    "tune: unknown param": (_tune_with("--param", "blok_size=4,8"), "--param blok_size: unknown parameter"),
    "tune: block size": (_tune_with("--param", "block_size=4,5"), "--param block_size=5: block size 5 does not"),
    "tune: huge embedding": (
        _tune_with("--param", "block_size", "--base", "embed_dim=16777216", "--base", "metric=gssf"),
        "with embed_dim 16777216 and word_dim 8 the model would have",
    ),
    "tune: no param": (_tune_with(), "give at least one --param"),
    "tune: missing dataset": (lambda w: ["tune", "--data", "nowhere", "--param", "lr=0.1,0.2"], "nowhere not found"),
    "tune: cpus": (_tune_with("--param", "block_size=4,8", "--cpus-per-trial", "9999"), "this machine has"),
    "tune: config not utf-8": (_tune_config_not_utf8, "t.toml: not valid TOML (line 2 is not UTF-8"),
    "tune: metric": (_tune_with("--param", "block_size=4,8", "--metric", "accuracy"), "--metric accuracy: not"),
    # run
    "run: tune param typo": (_pipe('[tune]\nparams = ["blok_size=4,8"]\n'), "[tune] --param blok_size: unknown"),
    "run: tune param nan": (_pipe('[tune]\nparams = ["lr=0.1,nan"]\n'), "[tune] --param lr=0.1,nan: 'nan' is not"),
    "run: tune block size": (_pipe('[tune]\nparams = ["block_size=4,5"]\n'), "[tune] --param block_size=5: block"),
    "run: tune base override": (
        _pipe('[tune]\nparams = ["block_size=4,8"]\nbase = ["lr=-1"]\n'),
        "[tune] base.lr: must be positive",
    ),
    "run: tune storage below a file": (
        _pipe('[tune]\nparams = ["block_size=4,8"]\nstorage = "sf/ray"\n', file="sf"),
        "cannot create tune.storage sf/ray: sf is a file",
    ),
    "run: runs folder below a file": (_pipe('runs_dir = "rf/runs"\n', file="rf"), "runs folder rf/runs: rf is a file"),
    "run: export out below a file": (
        _pipe('[export]\nout = "ef/b"\n', file="ef"),
        "cannot create output folder ef: ef is a file",
    ),
    "run: prepare out below a file": (_pipe(file="pf", prepare_out="pf/d"), "cannot create output folder pf: pf is"),
    "run: lr inf": (_pipe("lr = inf\n"), "train.lr: must be a finite number, got inf"),
    "run: not utf-8": (_pipeline_not_utf8, "p.toml: not valid TOML (line 2 is not UTF-8"),
    "run: unknown stage": (_pipe("[deploy]\nx = 1\n"), "unknown stage [deploy]"),
    "run: missing file": (lambda w: ["run", "nope.toml"], "pipeline file nope.toml not found"),
}


def _snapshot(folder: Path) -> set[str]:
    """Every path below ``folder`` except the tracking store (``mlflow.db*``, ``mlruns``)."""
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if not p.name.startswith("mlflow.db") and p.relative_to(folder).parts[0] != "mlruns"
    }


def _runs_in_store(folder: Path) -> int:
    store = folder / "mlflow.db"
    if not store.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(store)) as db:
        try:
            count: int = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        except sqlite3.OperationalError:  # a store created but not yet migrated has no table
            return 0
    return count


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_no_leftovers(gssf: Gssf, workdir: Path, case: str) -> None:
    setup, expected = CASES[case]
    args = setup(workdir)
    before, runs_before = _snapshot(workdir), _runs_in_store(workdir)
    result = gssf(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gssf: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert _snapshot(workdir) - before == set()
    assert _runs_in_store(workdir) == runs_before


def test_the_table_covers_every_command() -> None:
    commands = {case.split(":")[0] for case in CASES}
    assert commands == {"prepare", "train", "evaluate", "tune", "export", "run"}
    assert len(CASES) >= 60


def test_debug_shows_the_traceback(gssf: Gssf, workdir: Path) -> None:
    result = gssf("--debug", "prepare", "--dataset", "imagenet", "--out", "data/x")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "UserInputError"


JSON_CASES = sorted({case.split(":")[0]: case for case in sorted(CASES, reverse=True)}.values())  # one a command


@pytest.mark.parametrize("case", JSON_CASES)
def test_bad_input_with_json_is_one_json_object_on_stdout(gssf: Gssf, workdir: Path, case: str) -> None:
    """With ``--json`` the same error is also a JSON object on stdout, the stream a script parses."""
    setup, expected = CASES[case]
    args = setup(workdir)
    result = gssf(*args, "--json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    error = json.loads(result.stdout)
    assert error["kind"] == "input" and error["exit_code"] == 2 and expected in error["error"]
    assert result.stderr.strip().splitlines() == [f"gssf: error: {error['error']}"]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "nowhere"],
        ["evaluate", "--run", "latest"],
        ["evaluate", "--run", "0123456789abcdef"],
        ["export", "--onnx", "--run", "latest"],
        ["train", "--resume", "latest", "--data", "nowhere"],
        ["compare", "latest", "latest"],
    ],
    ids=" ".join,
)
def test_a_refused_command_in_an_empty_folder_creates_no_store(gssf: Gssf, workdir: Path, args: list[str]) -> None:
    """Refused before anything is logged: no ``mlflow.db``, no lock beside it, nothing at all."""
    result = gssf(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == []
