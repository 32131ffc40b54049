"""``gssf export --onnx``: bundles for every dataset kind, the parity gate, the README snippet, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.tracking.adapter import Tracker
from tests.factories import write_feature_folder, write_precomp

Gssf = Callable[..., Result]
TINY_TRAIN = ["--embed-dim", "16", "--word-dim", "8", "--batch-size", "16", "--epochs", "1"]
README = Path(__file__).resolve().parents[3] / "README.md"


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})


def _ok(result: Result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict, dict]]:
    """One tiny synthetic run, trained and exported, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        prep = _invoke("prepare", "--dataset", "synthetic", "--out", "data/syn", "--train-images", "40",
                       "--dev-images", "12", "--test-images", "12", "--regions", "3", "--region-dim", "8")  # fmt: skip
        assert prep.exit_code == 0, prep.stderr
        trained = _ok(
            _invoke("train", "--data", "data/syn", "--metric", "gssf", "--block-size", "4", *TINY_TRAIN, "--json")
        )
        bundle = _ok(_invoke("export", "--onnx", "--run", "latest", "--json"))
        yield root, trained, bundle


def test_bundle_holds_checked_graphs_and_a_manifest(exported: tuple[Path, dict, dict]) -> None:
    root, trained, bundle = exported
    folder = root / bundle["path"]
    assert folder == root / "exports" / trained["run_id"]
    assert {p.name for p in folder.iterdir()} == {
        "image_encoder.onnx", "text_encoder.onnx", "metric_head.onnx", "manifest.json", "vocab.json",
    }  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source_run_id"] == trained["run_id"] and manifest["exporter"]["opset"] == 20
    text_inputs = {i["name"]: i for i in manifest["graphs"]["text_encoder"]["inputs"]}
    assert isinstance(text_inputs["tokens"]["shape"][0], str) and isinstance(text_inputs["tokens"]["shape"][1], str)
    assert text_inputs["tokens"]["dtype"] == "int64"
    assert manifest["parity"]["passed"] and bundle["passed"]
    lengths = {c.get("length") for c in manifest["parity"]["graphs"]["text_encoder"]["checks"]}
    batches = {c["batch"] for c in manifest["parity"]["graphs"]["image_encoder"]["checks"]}
    assert len(lengths) >= 2 and len(batches) >= 2
    for info in manifest["graphs"].values():
        assert hashlib.sha256((folder / info["file"]).read_bytes()).hexdigest() == info["sha256"]
    assert manifest["preprocessing"]["text"]["tokenizer"] == "basic-v1"


def test_export_run_is_logged_with_one_served_bundle_model(exported: tuple[Path, dict, dict]) -> None:
    """One MLflow model per export, named after the model and the export run, in the run's experiment; it loads
    with mlflow.pyfunc and scores like PyTorch through ONNX Runtime."""
    root, trained, bundle = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        client = Tracker().client
        run = client.get_run(bundle["export_run_id"])
        assert run.data.tags["gssf.stage"] == "export" and run.data.metrics["passed"] == 1.0
        assert run.data.metrics["onnx_rsum"] == bundle["parity"]["retrieval"]["metrics_torch"]["rsum"]
        assert run.info.run_name == f"export-gssf-d4-{run.info.run_id[:6]}"
        import mlflow

        mlflow.set_tracking_uri(Tracker().tracking_uri)
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
        mine = [m for m in models if m.source_run_id == run.info.run_id]
        assert [(m.name, m.model_id) for m in mine] == [(f"gssf-d4-onnx-{run.info.run_id[:6]}", bundle["model_id"])]
        served = mlflow.pyfunc.load_model(f"models:/{bundle['model_id']}")
        images = np.load(root / "data/syn/test_ims.npy")[:4]
        captions = (root / "data/syn/test_caps.txt").read_text().splitlines()[:3]
        out = served.predict({"images": images, "texts": captions})
        from gssf_cli.stages.runs import TrainedModel, load_trained

        _, model, dataset = load_trained(Tracker(), trained["run_id"])
        reference = TrainedModel(model, dataset.vocab)
        expected = reference.scores(reference.encode_images(images), reference.encode_texts(captions))
    np.testing.assert_allclose(out["scores"], expected, atol=1e-5, rtol=1e-4)
    assert out["image_embeddings"].shape == (4, 16) and out["text_embeddings"].shape == (3, 16)


def test_register_adds_a_version_per_export_linked_to_its_run(exported: tuple[Path, dict, dict]) -> None:
    """Each export is a new version, linked to its export run; the alias ``champion`` moves to the newest, so
    ``models:/NAME@champion`` serves it."""
    root, trained, _ = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        first = _ok(_invoke("export", "--onnx", "--run", trained["run_id"], "--out", "exports/r1",
                            "--register", "syn-retrieval", "--json"))  # fmt: skip
        second = _ok(_invoke("export", "--onnx", "--run", trained["run_id"], "--out", "exports/r2",
                             "--register", "syn-retrieval", "--json"))  # fmt: skip
        assert first["registered"] == {"name": "syn-retrieval", "version": 1, "alias": "champion"}
        assert second["registered"] == {"name": "syn-retrieval", "version": 2, "alias": "champion"}
        client = Tracker().client
        assert client.get_registered_model("syn-retrieval").aliases == {"champion": 2}, "the newest is the champion"
        versions = sorted(client.search_model_versions("name='syn-retrieval'"), key=lambda v: int(v.version))
        assert [(v.version, v.run_id) for v in versions] == [
            (1, first["export_run_id"]), (2, second["export_run_id"]),
        ]  # fmt: skip
        assert [v.source for v in versions] == [f"models:/{first['model_id']}", f"models:/{second['model_id']}"]
        assert client.get_run(second["export_run_id"]).data.tags["gssf.source_run"] == trained["run_id"]
        assert versions[1].tags["gssf.source_run"] == trained["run_id"] and versions[1].tags["mlflow.user"]
        assert trained["run_id"] in versions[1].description and "parity gate passed" in versions[1].description
        import mlflow

        mlflow.set_tracking_uri(Tracker().tracking_uri)
        served = mlflow.pyfunc.load_model("models:/syn-retrieval@champion")
        out = served.predict({"texts": ["a dog runs"]})
    assert out["text_embeddings"].shape == (1, 16)


def test_register_refuses_a_bad_name_before_any_run(gssf: Gssf, workdir: Path) -> None:
    for name in ("a/b", "a:b", " ", "x" * 300):
        line = _one_line(gssf("export", "--onnx", "--register", name))
        assert "registered model name" in line, line
    assert not (workdir / "exports").exists() and not (workdir / "mlruns").exists()


def test_readme_snippet_scores_like_pytorch(exported: tuple[Path, dict, dict]) -> None:
    """The README's onnxruntime + numpy snippet, run as printed, agrees with the trained model."""
    root, trained, bundle = exported
    text = README.read_text()
    block = text.split("<!-- onnx-snippet:begin -->", 1)[1].split("<!-- onnx-snippet:end -->", 1)[0]
    code = re.search(r"```python\n(.*?)```", block, re.S)
    assert code is not None
    source = code.group(1).replace('"exports/quickstart", "data/quickstart"', f'{bundle["path"]!r}, "data/syn"')
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(compile(source, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    scores = namespace["scores"]
    assert scores.shape == (4, len(namespace["captions"]))
    scores = scores[:, :2]

    import torch

    from gssf_cli.data.text import Vocabulary
    from gssf_cli.stages.runs import load_trained

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _, model, _dataset = load_trained(Tracker(), trained["run_id"])
        vocab = Vocabulary.load(root / "data/syn/vocab.json")
        ids = [vocab.encode(c) for c in (root / "data/syn/test_caps.txt").read_text().splitlines()[:2]]
        tokens = torch.zeros(2, max(map(len, ids)), dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row)
        with torch.no_grad():
            images = model.encode_images(torch.from_numpy(np.load(root / "data/syn/test_ims.npy")[:4]))
            texts = model.encode_texts(tokens, torch.tensor([len(i) for i in ids]))
            expected = model.scores(images, texts).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=1e-4)


def _assert_failed_export_run(run_id: str, passed_run_id: str) -> None:
    """The export run ended FAILED, with the parity metrics and the manifest, and no graph logged as a model
    (the same query finds the one model of ``passed_run_id``, an export that passed)."""
    client = Tracker().client
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["passed"] == 0.0
    assert "image_encoder_max_abs_diff" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {"bundle", "config"}
    assert [a.path for a in client.list_artifacts(run_id, "bundle")] == ["bundle/manifest.json"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in models if m.source_run_id == run_id] == []
    assert len([m.name for m in models if m.source_run_id == passed_run_id]) == 1
    assert "gssf.registered_model" not in run.data.tags


def test_parity_outside_tolerance_exits_1(exported: tuple[Path, dict, dict]) -> None:
    """A failed gate deploys nothing: no folder at --out, the bundle kept as <out>.failed, the run FAILED."""
    root, trained, bundle = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = _invoke(
            "export", "--onnx", "--run", trained["run_id"], "--out", "exports/strict", "--atol", "0", "--rtol", "0"
        )
        assert result.exit_code == 1, result.stdout + result.stderr
        assert "ONNX parity (FAILED)" in result.stdout and "outside the parity tolerance" in result.stderr
        assert "exports/strict.failed" in result.stdout and "nothing deployed" in result.stdout
        assert not (root / "exports/strict").exists()
        assert not [p.name for p in (root / "exports").iterdir() if p.name.startswith(".")]
        manifest = json.loads((root / "exports/strict.failed/manifest.json").read_text())
        assert manifest["parity"]["passed"] is False
        _assert_failed_export_run(Tracker().get_run("latest", stage="export").info.run_id, bundle["export_run_id"])
        line = _one_line(_invoke("export", "--check", "exports/strict.failed"))
        assert "exports/strict.failed" in line and "parity gate failed" in line


def test_failed_export_never_replaces_a_good_bundle(exported: tuple[Path, dict, dict]) -> None:
    """--force with a failing gate: the good bundle at --out stays byte for byte; an older .failed is replaced."""
    root, trained, bundle = exported
    good = root / "exports/good"
    shutil.copytree(root / bundle["path"], good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    (root / "exports/good.failed").mkdir()
    (root / "exports/good.failed/stale.txt").write_text("an older failed export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = _invoke("export", "--onnx", "--run", trained["run_id"], "--out", "exports/good", "--force",
                         "--atol", "0", "--rtol", "0", "--register", "never", "--json")  # fmt: skip
        assert result.exit_code == 1, result.stdout + result.stderr
        failed = json.loads(result.stdout)
        assert failed["passed"] is False and failed["parity"]["passed"] is False
        assert failed["path"] == "exports/good.failed"
        assert {p.name: p.read_bytes() for p in good.iterdir()} == before
        assert failed["registered"] is None and not Tracker().client.search_model_versions("name='never'")
        assert not (root / "exports/good.failed/stale.txt").exists()
        assert json.loads((root / "exports/good.failed/manifest.json").read_text())["parity"]["passed"] is False
        _assert_failed_export_run(failed["export_run_id"], bundle["export_run_id"])
        assert _invoke("export", "--check", "exports/good").exit_code == 0


def _kind_dataset(kind: str, workdir: Path) -> list[str]:
    if kind == "precomp-global":
        write_precomp(workdir / "src", item_shape=(6,), n={"train": 10, "dev": 3, "test": 4})
        return ["--dataset", "precomp", "--source", "src", "--min-word-count", "1"]
    if kind == "features":
        write_feature_folder(workdir / "src", paired=True, k=2)
        return ["--dataset", "features", "--source", "src"]
    return ["--dataset", "digits"]


@pytest.mark.parametrize("kind", ["precomp-global", "features", "digits"])
def test_every_dataset_kind_exports_with_parity(gssf: Gssf, workdir: Path, kind: str) -> None:
    assert gssf("prepare", *_kind_dataset(kind, workdir), "--out", "data/d").exit_code == 0
    _ok(gssf("train", "--data", "data/d", "--metric", "bdiag", "--block-size", "8", *TINY_TRAIN, "--json"))
    bundle = _ok(gssf("export", "--onnx", "--json"))
    expected = {"digits": {"encoder", "metric_head"}}.get(kind, {"image_encoder", "text_encoder", "metric_head"})
    assert set(bundle["graphs"]) == expected and bundle["passed"]


def _one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("gssf: error: "), result.stderr
    return lines[0]


def test_bad_export_input(gssf: Gssf, workdir: Path) -> None:
    assert "unknown run 'nope'" in _one_line(gssf("export", "--onnx", "--run", "nope"))
    assert "pass --onnx" in _one_line(gssf("export", "--run", "latest"))
    assert gssf("prepare", "--dataset", "digits", "--out", "data/d").exit_code == 0
    prepare_run = Tracker().get_run("latest", stage="prepare").info.run_id
    assert "is a prepare run, not a train run" in _one_line(gssf("export", "--onnx", "--run", prepare_run))
    tracker = Tracker()
    with tracker.start_run("train") as empty:
        pass
    assert "has no checkpoint" in _one_line(gssf("export", "--onnx", "--run", empty.run_id))
    assert not (workdir / "exports").exists()


def test_check_catches_a_corrupted_or_truncated_graph(exported: tuple[Path, dict, dict]) -> None:
    root, _, bundle = exported
    copy = root / "exports" / "copy"
    shutil.copytree(root / bundle["path"], copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert _invoke("export", "--check", "exports/copy").exit_code == 0
        head = copy / "metric_head.onnx"
        head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])
        result = _invoke("export", "--check", "exports/copy")
        assert result.exit_code == 2 and "metric_head.onnx: checksum mismatch" in result.stderr
        manifest = json.loads((copy / "manifest.json").read_text())
        digest = hashlib.sha256(head.read_bytes()).hexdigest()
        manifest["graphs"]["metric_head"]["sha256"] = digest
        manifest["files"]["metric_head.onnx"] = {"sha256": digest, "bytes": head.stat().st_size}
        (copy / "manifest.json").write_text(json.dumps(manifest))
        result = _invoke("export", "--check", "exports/copy")
        assert result.exit_code == 2 and "metric_head.onnx: not a valid ONNX graph" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def _outside_path(copy: Path, manifest: dict) -> str:
    """Point metric_head at ``../../outside.onnx`` (a real copy of the graph sits there)."""
    shutil.copyfile(copy / "metric_head.onnx", copy.parents[1] / "outside.onnx")
    manifest["graphs"]["metric_head"]["file"] = "../../outside.onnx"
    manifest["files"]["../../outside.onnx"] = manifest["files"].pop("metric_head.onnx")
    return "../../outside.onnx"


def _absolute_path(copy: Path, manifest: dict) -> str:
    target = copy.parents[1] / "absolute.onnx"
    shutil.copyfile(copy / "metric_head.onnx", target)
    manifest["graphs"]["metric_head"]["file"] = str(target)
    manifest["files"][str(target)] = manifest["files"].pop("metric_head.onnx")
    return str(target)


def _symlinked_vocab(copy: Path, manifest: dict) -> str:
    outside = copy.parents[1] / "outside-vocab.json"
    shutil.copyfile(copy / "vocab.json", outside)
    (copy / "vocab.json").unlink()
    (copy / "vocab.json").symlink_to(outside)
    return "vocab.json: a symlink"


def _symlinked_graph(copy: Path, manifest: dict) -> str:
    outside = copy.parents[1] / "outside-head.onnx"
    shutil.copyfile(copy / "metric_head.onnx", outside)
    (copy / "metric_head.onnx").unlink()
    (copy / "metric_head.onnx").symlink_to(outside)
    return "metric_head.onnx: a symlink"


def _no_graphs(copy: Path, manifest: dict) -> str:
    manifest["graphs"] = {}
    return "manifest.json: incomplete bundle, missing graph(s) image_encoder, text_encoder, metric_head"


def _no_metric_head(copy: Path, manifest: dict) -> str:
    del manifest["graphs"]["metric_head"]
    del manifest["files"]["metric_head.onnx"]
    (copy / "metric_head.onnx").unlink()
    return "missing graph(s) metric_head"


def _edited_vocab(copy: Path, manifest: dict) -> str:
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["words"][4], vocab["words"][5] = vocab["words"][5], vocab["words"][4]
    (copy / "vocab.json").write_text(json.dumps(vocab))
    return "vocab.json: checksum mismatch"


def _truncated_vocab(copy: Path, manifest: dict) -> str:
    data = (copy / "vocab.json").read_bytes()
    (copy / "vocab.json").write_bytes(data[: len(data) // 2])
    return "vocab.json: checksum mismatch"


def _missing_vocab(copy: Path, manifest: dict) -> str:
    (copy / "vocab.json").unlink()
    return "vocab.json: missing from the bundle"


def _vocab_not_checksummed(copy: Path, manifest: dict) -> str:
    del manifest["files"]["vocab.json"]
    return "vocab.json: the vocabulary is not checksummed"


def _gate_failed(copy: Path, manifest: dict) -> str:
    manifest["parity"]["passed"] = False
    return f"{copy.name}: its parity gate failed"


def _not_an_object(copy: Path, manifest: dict) -> str:
    manifest.clear()
    (copy / "manifest.json").write_text("[]")
    return "manifest.json: not a bundle manifest"


def _no_files_section(copy: Path, manifest: dict) -> str:
    del manifest["files"]
    return "manifest.json: incomplete bundle manifest (no files)"


ATTACKS = {
    "dotdot-path": _outside_path,
    "absolute-path": _absolute_path,
    "symlinked-vocab": _symlinked_vocab,
    "symlinked-graph": _symlinked_graph,
    "no-graphs": _no_graphs,
    "no-metric-head": _no_metric_head,
    "edited-vocab": _edited_vocab,
    "truncated-vocab": _truncated_vocab,
    "missing-vocab": _missing_vocab,
    "vocab-not-checksummed": _vocab_not_checksummed,
    "gate-failed": _gate_failed,
    "not-an-object": _not_an_object,
    "no-files-section": _no_files_section,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_check_refuses_a_bundle_that_is_not_self_contained(exported: tuple[Path, dict, dict], attack: str) -> None:
    """Each edit to a copied bundle: ``export --check`` exits 2 with one line naming the file (or bundle)."""
    root, _, bundle = exported
    copy = root / "exports" / f"attack-{attack}"
    shutil.copytree(root / bundle["path"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    expected = ATTACKS[attack](copy, manifest)
    if manifest:
        (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        line = _one_line(_invoke("export", "--check", f"exports/attack-{attack}"))
    assert expected in line, line
