"""A bundle's verification (:func:`~gssf_cli.deploy.bundle.verify_bundle`) on small hand-made bundles: identity
graphs in a real manifest layout, no export, no tracking (the exporter's recipe: ``test_onnx_export.py``; the
parity gate and ``--check`` end to end: ``tests/unit/stages/test_export.py``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# ---------------------------------------------------------------------------------------------------------
# verify_bundle on a small hand-made bundle (identity graphs, a real manifest layout): no export, no tracking


def _identity_graph(path: Path, inputs: list[tuple[str, int]], output: str = "embeddings") -> None:
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    values = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT if t else onnx.TensorProto.INT64, ["batch", 4])
              for n, t in inputs]  # fmt: skip
    out = helper.make_tensor_value_info(output, values[0].type.tensor_type.elem_type, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0][0]], [output])], "g", values[:1], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _make_bundle(folder: Path, task: str = "cross_modal") -> Path:
    from gssf_cli.deploy import bundle

    folder.mkdir(parents=True)
    graphs: dict = {}
    for name in bundle.GRAPHS[task]:
        inputs = [("tokens", 0), ("lengths", 0)] if name == "text_encoder" else [("features", 1)]
        if name == "metric_head":  # fed by name, as BundleModel.transform does
            inputs = [("embeddings", 1)]
        _identity_graph(folder / f"{name}.onnx", inputs, "vectors" if name == "metric_head" else "embeddings")
        graphs[name] = {"file": f"{name}.onnx", "inputs": [{"name": n} for n, _ in inputs]}
    preprocessing: dict = {}
    if task == "cross_modal":
        (folder / "vocab.json").write_text(json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "dog"]}))
        preprocessing["text"] = {"vocab": "vocab.json"}
    files = bundle.file_checksums(folder)
    for info in graphs.values():
        info["sha256"] = files[info["file"]]["sha256"]
    parity = {"graphs": {name: {"passed": True} for name in graphs}, "retrieval": {"passed": True}}
    parity["passed"] = bundle.gate_passed(parity)
    manifest = {"bundle_format": bundle.BUNDLE_FORMAT, "source_run_id": "r0", "task": task, "graphs": graphs,
                "files": files, "preprocessing": preprocessing, "parity": parity}  # fmt: skip
    (folder / bundle.MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def made_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_bundle(tmp_path_factory.mktemp("bundles") / "made")


def _edited(made: Path, tmp_path: Path, edit: Callable[[Path, dict], Any]) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(made, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    if manifest:
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_made_bundle_verifies(made_bundle: Path, tmp_path: Path) -> None:
    from gssf_cli.deploy.bundle import verify_bundle

    checked = verify_bundle(made_bundle)
    assert checked["valid"] and checked["graphs"] == ["image_encoder", "metric_head", "text_encoder"]
    assert checked["files"] == ["image_encoder.onnx", "metric_head.onnx", "text_encoder.onnx", "vocab.json"]
    labels = verify_bundle(_make_bundle(tmp_path / "labels", task="labels"))
    assert labels["graphs"] == ["encoder", "metric_head"] and labels["files"] == ["encoder.onnx", "metric_head.onnx"]


def test_gate_verdict_and_failed_path_come_from_one_place() -> None:
    from gssf_cli.deploy.bundle import failed_path, gate_passed

    report = {"graphs": {"a": {"passed": True}, "b": {"passed": True}}, "retrieval": {"passed": True}}
    assert gate_passed(report)
    assert not gate_passed({**report, "graphs": {"a": {"passed": True}, "b": {"passed": False}}})
    assert not gate_passed({**report, "retrieval": {"passed": False}})
    assert not gate_passed({"passed": True}) and not gate_passed([])
    assert failed_path(Path("exports/RUN")) == Path("exports/RUN.failed")
    assert failed_path(Path("exports/RUN/")) == Path("exports/RUN.failed")


def _swap(copy: Path, manifest: dict, file: str) -> None:
    manifest["graphs"]["metric_head"]["file"] = file
    manifest["files"][file] = manifest["files"].pop("metric_head.onnx")


def _symlink_out(copy: Path, name: str) -> None:
    outside = copy.parent / f"outside-{name}"
    shutil.copyfile(copy / name, outside)
    (copy / name).unlink()
    (copy / name).symlink_to(outside)


def _outside_via_linked_folder(copy: Path, manifest: dict) -> None:
    (copy.parent / "elsewhere").mkdir()
    shutil.copyfile(copy / "metric_head.onnx", copy.parent / "elsewhere/metric_head.onnx")
    (copy / "sub").symlink_to(copy.parent / "elsewhere")
    _swap(copy, manifest, "sub/metric_head.onnx")


EDITS: dict[str, tuple[Callable[[Path, dict], Any], str]] = {
    "dotdot": (lambda c, m: _swap(c, m, "../../outside.onnx"), "bundle/../../outside.onnx: the manifest path climbs"),
    "dotdot-inside": (lambda c, m: _swap(c, m, "sub/../metric_head.onnx"), "sub/../metric_head.onnx: the manifest"),
    "absolute": (lambda c, m: _swap(c, m, "/etc/passwd"), "/etc/passwd: an absolute path"),
    "windows-absolute": (lambda c, m: _swap(c, m, "C:\\head.onnx"), "C:\\head.onnx: an absolute path"),
    "symlinked-vocab": (lambda c, m: _symlink_out(c, "vocab.json"), "vocab.json: a symlink"),
    "symlinked-graph": (lambda c, m: _symlink_out(c, "metric_head.onnx"), "metric_head.onnx: a symlink"),
    "symlinked-folder": (_outside_via_linked_folder, "bundle/sub: a symlink"),
    "no-graphs": (lambda c, m: m.update(graphs={}), "missing graph(s) image_encoder, text_encoder, metric_head"),
    "no-metric-head": (lambda c, m: m["graphs"].pop("metric_head"), "missing graph(s) metric_head"),
    "extra-graph": (lambda c, m: m["graphs"].update(encoder=m["graphs"]["metric_head"]), "unexpected graph(s) encoder"),
    "unknown-task": (lambda c, m: m.update(task="ranking"), "unknown task 'ranking'"),
    "edited-vocab": (lambda c, m: (c / "vocab.json").write_text('{"words": []}'), "vocab.json: checksum mismatch"),
    "missing-vocab": (lambda c, m: (c / "vocab.json").unlink(), "vocab.json: missing from the bundle"),
    "vocab-unlisted": (lambda c, m: m["files"].pop("vocab.json"), "vocab.json: the vocabulary is not checksummed"),
    "vocab-unrecorded": (lambda c, m: m.update(preprocessing={}), "takes tokens but the manifest records no vocab"),
    "graph-unlisted": (lambda c, m: m["files"].pop("metric_head.onnx"), "metric_head.onnx: graph metric_head is not"),
    "graph-sha-differs": (
        lambda c, m: m["graphs"]["metric_head"].update(sha256="0" * 64),
        "metric_head.onnx: checksum",
    ),
    "size-differs": (lambda c, m: m["files"]["vocab.json"].update(bytes=1), "vocab.json: checksum mismatch"),
    "gate-failed": (lambda c, m: m["parity"].update(passed=False), "bundle: its parity gate failed"),
    "gate-part-failed": (lambda c, m: m["parity"]["retrieval"].update(passed=False), "bundle: its parity gate failed"),
    "not-an-object": (lambda c, m: (m.clear(), (c / "manifest.json").write_text("[1]")), "not a bundle manifest"),
    "not-json": (lambda c, m: (m.clear(), (c / "manifest.json").write_text("{")), "unreadable bundle manifest"),
    "no-files": (lambda c, m: m.pop("files"), "manifest.json: incomplete bundle manifest (no files)"),
    "no-format": (lambda c, m: m.pop("bundle_format"), "incomplete bundle manifest (no bundle_format)"),
    "old-format": (lambda c, m: m.update(bundle_format=1), "bundle format 1, this gssf checks formats 2, 3"),
    "files-not-a-dict": (lambda c, m: m.update(files=["vocab.json"]), "malformed bundle manifest"),
    "no-manifest": (lambda c, m: (m.clear(), (c / "manifest.json").unlink()), "no manifest.json"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_verify_refuses_a_bundle_that_is_not_self_contained(made_bundle: Path, tmp_path: Path, edit: str) -> None:
    from gssf_cli.core.errors import UserInputError
    from gssf_cli.deploy.bundle import verify_bundle

    change, expected = EDITS[edit]
    copy = _edited(made_bundle, tmp_path, change)
    with pytest.raises(UserInputError) as caught:
        verify_bundle(copy)
    message = str(caught.value)
    assert expected in message and len(message.splitlines()) == 1, message


def test_a_bundle_serves_its_dataset_s_layout_and_refuses_other_shapes(made_bundle: Path, tmp_path: Path) -> None:
    """The layout serving checks comes from the modalities the manifest records (the exporter writes the dataset's);
    a request of another shape is refused before ONNX Runtime sees it."""
    import numpy as np

    from gssf_cli.core.errors import UserInputError
    from gssf_cli.deploy.bundle import BundleModel
    from gssf_cli.deploy.serving import Layout

    with pytest.raises(UserInputError, match=r"manifest.json: records no preprocessing.modalities"):
        _ = BundleModel.load(made_bundle).layout
    modalities = {"image": {"type": "features", "shape": [4]}, "text": {"type": "captions", "vocab_size": 5}}
    copy = _edited(made_bundle, tmp_path, lambda _, m: m["preprocessing"].update(modalities=modalities))
    model = BundleModel.load(copy)
    assert model.layout == Layout(images=(4,), texts=None, dim=4)
    images = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(model.predict({"images": images.tolist()})["image_embeddings"], images)
    with pytest.raises(
        UserInputError, match=r"images: expected an array \[N, 4\] \(each item \[4\]\), got shape \[2, 3\]"
    ):
        model.predict({"images": images[:, :3]})
    with pytest.raises(UserInputError, match="images: 1 value"):
        model.predict({"images": [[0.0, 1.0, float("nan"), 2.0]]})


def test_sessions_take_omp_num_threads_else_the_free_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's pool: ``OMP_NUM_THREADS`` where Ray (or the user) sets it, else the cores no other process is
    busy on (a pool thread waiting for a held core stalls every operator)."""
    from gssf_cli.deploy import bundle

    graph = tmp_path / "g.onnx"
    _identity_graph(graph, [("features", 1)])
    monkeypatch.setattr(bundle, "free_cores", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert bundle.open_session(graph).get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert bundle.open_session(graph).get_session_options().intra_op_num_threads == 3
