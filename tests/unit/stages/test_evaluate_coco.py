"""``gssf evaluate --protocol eccv|cxc`` on a precomp-format COCO test folder carrying the real ids: SCAN's layout
(``testall_ids.txt``, the image id on each caption line, in the order of the eccv_caption package's test ids), random
features and synthetic captions; a one-epoch model. And the refusals: one line, exit 2, no run, no file."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from tests.factories import captions

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the package warns that its optional ujson and tqdm are missing
    import eccv_caption

Gssf = Callable[..., Result]
TRAIN = ["--epochs", "1", "--metric", "cosine", "--embed-dim", "8", "--word-dim", "8", "--batch-size", "64",
         "--device", "cpu"]  # fmt: skip
ECCV_KEYS = {f"eccv_{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "rprecision", "map_at_r")}
CXC_KEYS = {f"cxc_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
STANDARD_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "i2t_map"}


def _coco_test_image_ids() -> np.ndarray:
    """The image id of each of the package's 25,000 test captions, in its order: SCAN's testall_ids.txt."""
    metrics = eccv_caption.Metrics()
    return np.array([metrics.coco_gts["t2i"][int(c)][0] for c in metrics.coco_ids], dtype=np.int64)


def _write_source(folder: Path, testall_ids: np.ndarray) -> Path:
    """train (8 images, no ids), dev (4 COCO test images with ids) and testall (5,000 images, ids per caption)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("dev", 4), ("testall", 5000)):
        np.save(folder / f"{split}_ims.npy", rng.normal(size=(count, 4)).astype(np.float32))
        (folder / f"{split}_caps.txt").write_text("\n".join(captions(count, seed=count)) + "\n")
    (folder / "dev_ids.txt").write_text("".join(f"{i}\n" for i in testall_ids[: 4 * 5]))
    (folder / "testall_ids.txt").write_text("".join(f"{i}\n" for i in testall_ids))
    return folder


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory with ``data/coco`` (the real ids), ``data/coco_bad`` (one testall id, 391895, replaced by
    9, a COCO train image) and a one-epoch train run on ``data/coco``."""
    folder = tmp_path_factory.mktemp("coco")
    ids = _coco_test_image_ids()
    bad = ids.copy()
    bad[bad == 391895] = 9
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        for name, source_ids in (("coco", ids), ("coco_bad", bad)):
            source = _write_source(folder / f"src_{name}", source_ids)
            result = _invoke("prepare", "--dataset", "precomp", "--source", str(source), "--out", f"data/{name}")
            assert result.exit_code == 0, result.stderr
        result = _invoke("train", "--data", "data/coco", *TRAIN, "--json")
        assert result.exit_code == 0, result.stderr
        yield folder


def _evaluate(*args: str) -> dict:
    result = _invoke("evaluate", "--run", "latest", "--split", "testall", "--no-plots", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_eccv_reports_the_package_metrics_beside_coco_5k(coco: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(coco)
    eccv = _evaluate("--protocol", "eccv")
    five = _evaluate("--protocol", "coco-5k")
    assert eccv["protocol"] == "eccv" and eccv["dataset_info"]["protocol"] == "eccv"
    assert eccv["sizes"] == {"images": 5000, "texts": 25000}
    assert set(eccv) >= ECCV_KEYS | STANDARD_KEYS and not set(eccv) & CXC_KEYS
    assert all(0.0 <= eccv[key] <= 100.0 for key in ECCV_KEYS)
    assert {key: eccv[key] for key in STANDARD_KEYS} == {key: five[key] for key in STANDARD_KEYS}
    from gssf_cli.tracking.adapter import Tracker

    logged = Tracker().client.get_run(eccv["run_id"]).data.metrics
    assert logged["eccv_i2t_map_at_r"] == pytest.approx(eccv["eccv_i2t_map_at_r"])


def test_cxc_prints_its_table_and_writes_recalls_at_each_k(coco: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(coco)
    args = ["--split", "testall", "--protocol", "cxc", "--k", "1,5,10", "--no-plots", "--output", "cxc.json"]
    table = _invoke("evaluate", "--run", "latest", *args)
    assert table.exit_code == 0, table.stderr
    assert "protocol cxc" in table.stdout and "results written to" in table.stdout
    document = json.loads((coco / "cxc.json").read_text())
    cxc = document["metrics"]
    assert document["dataset_info"]["protocol"] == "cxc"
    assert set(cxc) >= CXC_KEYS | STANDARD_KEYS and not set(cxc) & ECCV_KEYS
    assert all(0.0 <= cxc[key] <= 100.0 for key in CXC_KEYS)
    assert cxc["cxc_i2t_r1"] <= cxc["cxc_i2t_r5"] <= cxc["cxc_i2t_r10"]


def _runs(folder: Path) -> int:
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db:
        count: int = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    return count


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if not p.name.startswith("mlflow.db") and "mlruns" not in p.parts}


BAD = {
    "a split without ids": (
        ["--run", "latest", "--split", "train", "--protocol", "eccv"],
        "(train split): no COCO image ids (train_ids.txt); --protocol eccv ranks COCO's test images by id",
    ),
    "ids outside the COCO test set": (
        ["--run", "latest", "--data", "data/coco_bad", "--split", "testall", "--protocol", "cxc"],
        "testall_ids.txt: 1 of the split's image ids are not COCO test images (e.g. 9)",
    ),
    "not the 5,000-image test split": (
        ["--run", "latest", "--split", "dev", "--protocol", "eccv"],
        "--protocol eccv needs COCO's 5,000-image test split (SCAN's coco_precomp names it testall: --split "
        "testall), this split has 4 images",
    ),
    "the default test split is missing": (
        ["--run", "latest", "--protocol", "eccv"],
        "no 'test' split (has train, dev, testall)",
    ),
    "an embeddings file": (
        ["--embeddings", "e.npz", "--protocol", "eccv"],
        "--protocol eccv ranks a COCO test split by its COCO ids, which an embeddings file does not carry",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_no_run_no_file(coco: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.chdir(coco)
    np.savez(coco / "e.npz", images=np.eye(5000, 4, dtype=np.float32), texts=np.eye(25000, 4, dtype=np.float32))
    args, expected = BAD[case]
    runs, files = _runs(coco), _files(coco)
    result = _invoke("evaluate", *args, "--output", "results.json")
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gssf: error: ") and expected in lines[0], lines
    assert _runs(coco) == runs and _files(coco) == files


def test_compare_refuses_the_coco_id_protocols(coco: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(coco)
    runs = _runs(coco)
    result = _invoke("compare", "latest", "latest", "--split", "testall", "--protocol", "eccv")
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "protocol eccv ranks COCO test images by their COCO ids" in lines[0], lines
    assert _runs(coco) == runs
