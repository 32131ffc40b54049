"""``gssf evaluate --output FILE.json``: a results file that says what it measured (dataset, model, metrics with
CLIP_benchmark's names in the right direction), written atomically, and refused before anything runs when it
cannot be written."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import Result

from gssf_cli import __version__
from gssf_cli.core.errors import UserInputError
from gssf_cli.evaluation import evaluate as evaluation
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]


def _run(gssf: Gssf, *args: str) -> dict:
    result = gssf(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _one_exact_caption(n: int = 12, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each image's first caption is the image itself, the other k-1 are noise: image→text R@1 is 100, while
    text→image R@1 is far lower (a noise caption rarely finds its image). So the two directions cannot be
    confused."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 16)).astype(np.float32)
    texts = rng.normal(size=(n, k, 16)).astype(np.float32)
    texts[:, 0] = images
    return images, texts.reshape(n * k, 16)


def _clip_benchmark_recalls(images: np.ndarray, texts: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """CLIP_benchmark's definitions, written out: ``scores = texts @ images.T`` of normalised embeddings;
    ``image_retrieval_recall@K`` is per text (its image in the row's top K), ``text_retrieval_recall@K`` per
    image (any of its texts in the column's top K); both are means of 0/1 hits."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    scores = texts @ images.T
    image_of_text = np.arange(len(texts)) // (len(texts) // len(images))
    out = {}
    for k in ks:
        top_images = np.argsort(-scores, axis=1)[:, :k]
        out[f"image_retrieval_recall@{k}"] = float(
            np.mean([t in row for t, row in zip(image_of_text, top_images, strict=True)])
        )
        top_texts = np.argsort(-scores.T, axis=1)[:, :k]
        hits = [np.any(image_of_text[row] == i) for i, row in enumerate(top_texts)]
        out[f"text_retrieval_recall@{k}"] = float(np.mean(hits))
    return out


def test_embeddings_results_file(gssf: Gssf, workdir: Path) -> None:
    images, texts = _one_exact_caption()
    np.savez(workdir / "emb.npz", images=images, texts=texts)
    out = _run(gssf, "evaluate", "--embeddings", "emb.npz", "--output", "results.json")
    doc = json.loads((workdir / "results.json").read_text())
    assert out["output"] == "results.json"

    sha = hashlib.sha256((workdir / "emb.npz").read_bytes()).hexdigest()
    assert (doc["dataset"], doc["model"], doc["pretrained"], doc["task"]) == (
        "emb", "embeddings-cosine", "emb.npz", "cross_modal"
    )  # fmt: skip
    assert doc["dataset_info"] == {
        "name": "emb", "kind": "embeddings", "path": "emb.npz", "sha256": sha, "split": None,
        "layout": "cross_modal", "protocol": "all", "sizes": {"images": 12, "texts": 60, "captions_per_image": 5},
    }  # fmt: skip
    assert doc["model_info"] == {"source": "embeddings", "path": "emb.npz", "sha256": sha, "score": "cosine"}
    assert out["dataset_info"] == doc["dataset_info"] and out["model_info"] == doc["model_info"], "--json says it too"
    assert doc["evaluate_run_id"] == out["run_id"] and doc["gssf_version"] == __version__
    assert datetime.datetime.fromisoformat(doc["created"]).tzinfo is not None
    assert doc["format"] == evaluation.RESULTS_FORMAT

    metrics = doc["metrics"]
    ours = {k: v for k, v in out.items() if isinstance(v, float) and k != "seconds"}
    assert {k: metrics[k] for k in ours} == ours, "our own metrics, under our own names"
    assert out["i2t_r1"] == 100.0 and out["t2i_r1"] < 60.0, "the two directions differ in this data"
    for k in (1, 5, 10):
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(out[f"i2t_r{k}"] / 100), "image→text"
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(out[f"t2i_r{k}"] / 100), "text→image"
    clip = _clip_benchmark_recalls(images, texts, (1, 5, 10))
    assert {k: metrics[k] for k in clip} == pytest.approx(clip)
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".results")) == [], "no temporary left"

    # clip_benchmark build's own row logic (metrics merged into the row, model + " " + pretrained) works.
    row = {**doc["metrics"], **doc}
    del row["metrics"]
    assert row["model"] + " " + row["pretrained"] == "embeddings-cosine emb.npz"


def test_the_split_read_and_label_data_are_named(gssf: Gssf, workdir: Path) -> None:
    images, texts = _one_exact_caption(n=6)
    np.savez(workdir / "s.npz", test_images=images, test_texts=texts)
    _run(gssf, "evaluate", "--embeddings", "s.npz", "--output", "s.json")
    assert json.loads((workdir / "s.json").read_text())["dataset_info"]["split"] == "test"
    rng = np.random.default_rng(0)
    np.savez(workdir / "l.npz", features=rng.normal(size=(30, 4)), labels=np.arange(30) % 3)
    _run(gssf, "evaluate", "--embeddings", "l.npz", "--output", "l.json")
    doc = json.loads((workdir / "l.json").read_text())
    assert doc["task"] == "labels" and doc["dataset_info"]["sizes"] == {"queries": 30, "gallery": 30}
    assert "map_at_r" in doc["metrics"] and not any("retrieval_recall" in k for k in doc["metrics"])


def test_trained_run_results_file(gssf: Gssf, workdir: Path) -> None:
    assert gssf(*tiny_synthetic_args()).exit_code == 0
    trained = _run(
        gssf, "train", "--data", "data/syn", "--metric", "bdiag", "--block-size", "4", "--embed-dim", "16",
        "--word-dim", "8", "--batch-size", "16", "--epochs", "3",
    )  # fmt: skip
    (workdir / "out").mkdir()
    out = _run(gssf, "evaluate", "--run", "latest", "--output", "out/test.json")
    doc = json.loads((workdir / "out" / "test.json").read_text())
    manifest_sha = hashlib.sha256((workdir / "data" / "syn" / "manifest.json").read_bytes()).hexdigest()
    assert (doc["dataset"], doc["model"], doc["pretrained"]) == ("syn", "bdiag-d4", trained["run_id"])
    assert doc["dataset_info"] == {
        "name": "syn", "kind": "synthetic", "folder": "data/syn", "manifest_sha256": manifest_sha, "split": "test",
        "classes": None,
        "protocol": "all", "sizes": {"images": 10, "texts": 50},
    }  # fmt: skip
    model = doc["model_info"]
    assert model["source"] == "train_run" and model["train_run_id"] == trained["run_id"]
    assert model["best_epoch"] == trained["best_epoch"] >= 1, "counted from 1, as train said"
    assert (model["metric_head"], model["block_size"], model["embed_dim"]) == ("bdiag", 4, 16)
    assert model["parameters"] == {**model["parameters"], "metric_head": 16 * 4}
    assert out["model_info"] == model and out["dataset_info"] == doc["dataset_info"]
    assert doc["evaluate_run_id"] == out["run_id"] != trained["run_id"]
    assert doc["metrics"]["image_retrieval_recall@5"] == pytest.approx(out["t2i_r5"] / 100)
    assert doc["metrics"]["text_retrieval_recall@5"] == pytest.approx(out["i2t_r5"] / 100)

    shown = gssf("evaluate", "--run", "latest", "--output", "out/test.json")
    assert shown.exit_code == 0, shown.stderr
    assert "results written to out/test.json" in shown.stdout
    assert f"of run {trained['run_id']}, best epoch {trained['best_epoch']}" in " ".join(shown.stdout.split())
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["test.json"], "replaced in place, nothing else"


BAD_OUTPUTS = {
    "not a .json name": ("results.txt", "must be named *.json"),
    "an existing folder": ("folder.json", "is a folder"),
    "a missing folder": ("nowhere/results.json", "the folder nowhere does not exist"),
    "a file as its folder": ("plain.txt/results.json", "plain.txt is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
@pytest.mark.parametrize("source", ["embeddings", "run"])
def test_a_bad_output_exits_2_and_leaves_nothing(gssf: Gssf, workdir: Path, case: str, source: str) -> None:
    output, message = BAD_OUTPUTS[case]
    images, texts = _one_exact_caption(n=4)
    np.savez(workdir / "e.npz", images=images, texts=texts)
    (workdir / "folder.json").mkdir()
    (workdir / "plain.txt").write_text("x")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    given = ["--embeddings", "e.npz"] if source == "embeddings" else ["--run", "latest"]
    result = gssf("evaluate", *given, "--output", output)
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gssf: error: --output ") and message in lines[0], lines
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before, "no file, no tracking store, no run"


def test_an_unwritable_folder_is_refused(gssf: Gssf, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, texts = _one_exact_caption(n=4)
    np.savez(workdir / "e.npz", images=images, texts=texts)
    locked = workdir / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access
    # root may write into any folder: the folder is locked for it too
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != Path("locked") and real_access(path, mode))
    try:
        result = gssf("evaluate", "--embeddings", "e.npz", "--output", "locked/r.json")
        assert result.exit_code == 2 and "the folder locked is not writable" in result.stderr
        assert not (workdir / "mlflow.db").exists() and not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.json"
    evaluation.write_results(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation.os, "replace", no_rename)
    with pytest.raises(UserInputError, match=r"--output .*r\.json: cannot write the results file \(No space left"):
        evaluation.write_results(target, {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and json.loads(target.read_text()) == {"a": 1}


def test_a_tuned_pipeline_says_which_setting_won_and_whether_the_final_model_is_better(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gssf_cli.cli import tables

    tuned = {"values": {"block_size": 16}, "metric": "rsum", "on": "dev", "value": 175.6,
             "trials": [{"values": {"block_size": d}, "metric": m} for d, m in ((16, 175.6), (8, 173.3), (4, None))]}  # fmt: skip
    verdict = {"units": 150, "unit": "image with its 5 captions", "line": "rsum -0.67 [-8.00, +6.40], p = 0.8858: n.s."}
    stage = {"stage": "tune", "status": "ran", "run_id": "r" * 32, "seconds": 1.0, "summary": {}, "why": "first run"}
    result = {"name": "q", "dry_run": False, "parent_run_id": "p" * 32, "stages": [stage], "seconds": 2.0,
              "metrics": {}, "tuned": tuned, "verdict": verdict}  # fmt: skip
    tables.print_pipeline(result, False)
    text = " ".join(capsys.readouterr().out.split())
    assert "tune: block_size = 16 won (dev rsum 175.6 in its trial; 8: 173.3)" in text
    assert (
        "final vs baseline, paired over 150 test units (image with its 5 captions): rsum -0.67 [-8.00, +6.40]" in text
    )
