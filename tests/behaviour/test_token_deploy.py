"""Deploying an interaction model (``gssf train --interaction``) through the CLI, as a user would: the export and
its rank-level gate, ``--check`` of old and new bundles, a failed gate deploying nothing, the MLflow pyfunc model,
``gssf index`` / ``gssf search`` by late interaction (also without torch), and bad input around the two families of
bundle (exit 2, one line, nothing left).

One project per module: tiny synthetic data, a one-epoch ``scan-t2i`` run exported (and registered) as
``exports/scan`` and indexed as ``indexes/scan``, a one-epoch embedding run exported as ``exports/emb`` and indexed
as ``indexes/emb``. Its tracking store keeps absolute artifact paths, so tests run in the project itself (adding
only what they name) rather than in copies, and edit copies of bundles in their own ``tmp_path``.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.core.metrics import RANK_METRICS
from gssf_cli.deploy.bundle import INTERACTION_GRAPHS, BundleModel
from gssf_cli.deploy.token_index import DEFAULT_PER_WORD
from tests.behaviour.test_bad_input import _runs_in_store, _snapshot
from tests.conftest import tiny_synthetic_args

DATA, GALLERY = "data/syn", "data/syn/test_ims.npy"
SMALL = ["--epochs", "1", "--embed-dim", "16", "--block-size", "4", "--word-dim", "8", "--batch-size", "16",
         "--device", "cpu", "--threads", "1"]  # fmt: skip
ENV = {"COLUMNS": "120", "NO_COLOR": "1"}
REGISTERED = "scan-retrieval"


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


def _ok(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("gssf: error: "), (
        result.stdout,
        result.stderr,
    )
    return lines[0]


@dataclass(frozen=True)
class Project:
    folder: Path
    scan_run: str
    embedding_run: str
    scan_export: dict[str, Any]
    scan_index: dict[str, Any]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    folder = tmp_path_factory.mktemp("token-deploy")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        _ok(_invoke(*tiny_synthetic_args(DATA), "--json"))
        scan = _ok(_invoke("train", "--data", DATA, *SMALL, "--interaction", "scan-t2i", "--json"))["run_id"]
        embedding = _ok(_invoke("train", "--data", DATA, *SMALL, "--json"))["run_id"]
        exported = _ok(_invoke("export", "--onnx", "--run", scan, "--out", "exports/scan", "--register", REGISTERED,
                               "--json"))  # fmt: skip
        _ok(_invoke("export", "--onnx", "--run", embedding, "--out", "exports/emb", "--json"))
        index = _ok(_invoke("index", "--bundle", "exports/scan", "--gallery", GALLERY, "--out", "indexes/scan",
                            "--eval", "--log-model", "--json"))  # fmt: skip
        _ok(_invoke("index", "--bundle", "exports/emb", "--gallery", GALLERY, "--out", "indexes/emb", "--json"))
    torch.set_num_threads(threads)
    yield Project(folder, scan, embedding, exported, index)


@pytest.fixture
def here(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.chdir(project.folder)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return project


def _captions(project: Project) -> list[str]:
    return (project.folder / DATA / "test_caps.txt").read_text().splitlines()


# ---------------------------------------------------------------------------------------------------------
# The export and its gate


def test_an_interaction_run_exports_a_checked_bundle(here: Project) -> None:
    exported = here.scan_export
    assert exported["passed"] is True and exported["path"] == "exports/scan"
    manifest = json.loads((here.folder / "exports/scan/manifest.json").read_text())
    assert manifest["bundle_format"] == 3 and manifest["family"] == "interaction"
    assert manifest["interaction"] == {"kind": "scan-t2i", "gssf_at": "relevance", "aggregate": "lse",
                                       "lambda_softmax": 9.0, "lambda_lse": 6.0}  # fmt: skip
    assert tuple(manifest["graphs"]) == INTERACTION_GRAPHS and set(exported["graphs"]) == set(INTERACTION_GRAPHS)
    assert "scorer.onnx" in manifest["files"] and "scorer" in manifest["usage"]
    outputs = {name: [o["name"] for o in graph["outputs"]] for name, graph in manifest["graphs"].items()}
    assert outputs == {"image_encoder": ["embeddings", "regions"], "text_encoder": ["embeddings", "words"],
                       "metric_head": ["transformed"], "scorer": ["scores"]}  # fmt: skip
    scorer_inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["scorer"]["inputs"]}
    assert all(isinstance(axis, str) for shape in scorer_inputs.values() for axis in shape[:2])
    parity = manifest["parity"]
    assert parity == exported["parity"] and parity["passed"] is True
    assert len(parity["graphs"]["scorer"]["checks"]) == 2 and parity["graphs"]["scorer"]["passed"] is True
    retrieval = parity["retrieval"]
    assert list(retrieval["metrics_onnx"]) == list(retrieval["metrics_torch"]) == list(RANK_METRICS["cross_modal"])
    assert {"i2t_map", "i2t_r1", "t2i_r10", "rsum"} <= set(retrieval["metrics_onnx"])
    assert retrieval["relevant_ranks_changed_beyond_ties"] == 0 and retrieval["passed"] is True
    checked = _ok(_invoke("export", "--check", "exports/scan", "--json"))
    assert checked["valid"] and checked["family"] == "interaction" and checked["bundle_format"] == 3
    assert checked["graphs"] == sorted(INTERACTION_GRAPHS)
    assert _invoke("export", "--check", "exports/scan").exit_code == 0

    from gssf_cli.tracking.adapter import Tracker

    metrics = Tracker().client.get_run(exported["export_run_id"]).data.metrics
    assert metrics["passed"] == 1.0 and metrics["onnx_i2t_map"] == retrieval["metrics_onnx"]["i2t_map"]
    assert "scorer_max_abs_diff" in metrics


def _rewritten(source: Path, into: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of a bundle whose manifest ``edit`` changed (the manifest checksums the other files, not itself)."""
    shutil.copytree(source, into)
    manifest = json.loads((into / "manifest.json").read_text())
    edit(manifest)
    (into / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return into


def _as_format_2(manifest: dict[str, Any]) -> None:
    manifest["bundle_format"] = 2
    del manifest["family"]


def test_an_old_format_2_embedding_bundle_still_verifies(here: Project, tmp_path: Path) -> None:
    old = _rewritten(here.folder / "exports/emb", tmp_path / "old", _as_format_2)
    checked = _ok(_invoke("export", "--check", str(old), "--json"))
    assert checked["valid"] and checked["bundle_format"] == 2 and checked["family"] == "embedding"
    bundle = BundleModel.load(old)
    assert bundle.family == "embedding" and bundle.input_scores(np.zeros((1, 4, 8), np.float32), ["a"]) is None
    images = np.load(here.folder / GALLERY)[:2]
    np.testing.assert_allclose(
        bundle.encode_images(images), BundleModel.load(here.folder / "exports/emb").encode_images(images)
    )


def _claims_interaction(manifest: dict[str, Any]) -> None:
    manifest["family"] = "interaction"
    manifest["interaction"] = {"kind": "scan-t2i"}


def _drops_scorer(manifest: dict[str, Any]) -> None:
    del manifest["graphs"]["scorer"]


def _forgets_interaction(manifest: dict[str, Any]) -> None:
    del manifest["interaction"]


REFUSED: dict[str, tuple[str, Callable[[dict[str, Any]], Any], str]] = {
    "an embedding bundle claiming interaction": (
        "exports/emb", _claims_interaction,
        "incomplete bundle, missing graph(s) scorer (a cross_modal interaction bundle holds image_encoder, "
        "text_encoder, metric_head, scorer); export again",
    ),
    "an interaction bundle without its scorer": ("exports/scan", _drops_scorer, "missing graph(s) scorer"),
    "an interaction bundle without its settings": (
        "exports/scan", _forgets_interaction,
        "malformed bundle manifest (an interaction bundle that records no interaction); export again",
    ),
    "an interaction bundle without its family": (
        "exports/scan", lambda m: m.pop("family"),
        "malformed bundle manifest (an embedding bundle that records an interaction but no family)",
    ),
    "a format-2 bundle that claims a family": (
        "exports/scan", lambda m: m.update(bundle_format=2), "bundle format 2 has no family (3 has); export again",
    ),
    "an unknown family": ("exports/scan", lambda m: m.update(family="graph"), "unknown bundle family 'graph'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_manifest_that_misstates_its_family_is_refused_in_one_line(here: Project, tmp_path: Path, case: str) -> None:
    source, edit, expected = REFUSED[case]
    bundle = _rewritten(here.folder / source, tmp_path / "edited", edit)
    line = _one_line(_invoke("export", "--check", str(bundle)))
    assert expected in line and str(bundle / "manifest.json") in line, line


def _perturbed_scorer(real: Callable[..., dict[str, torch.nn.Module]]) -> Callable[..., dict[str, torch.nn.Module]]:
    """``token_towers`` whose scorer uses a perturbed copy of the metric: the exported scorer graph (and its own
    per-graph check, which compares it with that copy) drift from the model, which torch still scores with."""
    from gssf_cli.deploy.interaction_export import TokenScorer

    def towers(model: Any, image_kind: str) -> dict[str, torch.nn.Module]:
        named = real(model, image_kind)
        interaction = copy.deepcopy(model.interaction)  # its metric too (held in a list, not as a submodule)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in interaction.metric.parameters():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
        named["scorer"] = TokenScorer(interaction)
        return named

    return towers


def test_a_failed_rank_gate_deploys_nothing(here: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scorer graph alone scores differently from the model: its own check passes (graph and perturbed copy
    agree) but the whole-split ranking does not, so nothing is deployed: the bundle is kept as ``<out>.failed``,
    nothing is at ``<out>``, the run is FAILED with no model, and ``--register`` adds no version."""
    from gssf_cli.deploy import interaction_export
    from gssf_cli.tracking.adapter import Tracker

    monkeypatch.setattr(interaction_export, "token_towers", _perturbed_scorer(interaction_export.token_towers))
    result = _invoke("export", "--onnx", "--run", here.scan_run, "--out", "exports/perturbed", "--register",
                     REGISTERED, "--json")  # fmt: skip
    assert result.exit_code == 1, (result.stdout, result.stderr)
    failed = json.loads(result.stdout)
    assert failed["passed"] is False and failed["path"] == "exports/perturbed.failed"
    assert failed["kind"] == "check_failed" and "nothing deployed" in failed["error"]
    assert failed["model_id"] is None and failed["registered"] is None
    parity = failed["parity"]
    assert parity["graphs"]["scorer"]["passed"] is True, "the graph matches the module it was exported from"
    assert parity["retrieval"]["passed"] is False and parity["passed"] is False
    assert parity["retrieval"]["max_abs_score_diff"] > 1e-3
    assert not (here.folder / "exports/perturbed").exists()
    assert not [p.name for p in (here.folder / "exports").iterdir() if p.name.startswith(".")], "no staging left"
    kept = json.loads((here.folder / "exports/perturbed.failed/manifest.json").read_text())
    assert kept["parity"]["passed"] is False and kept["family"] == "interaction"

    client = Tracker().client
    run = client.get_run(failed["export_run_id"])
    assert run.info.status == "FAILED" and run.data.metrics["passed"] == 0.0
    assert run.data.tags["gssf.export.failed_bundle"] == "exports/perturbed.failed"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "bundle")] == ["bundle/manifest.json"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in models if m.source_run_id == run.info.run_id] == []
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert [v.version for v in versions] == [1] and client.get_registered_model(REGISTERED).aliases == {"champion": 1}
    line = _one_line(_invoke("export", "--check", "exports/perturbed.failed"))
    assert "exports/perturbed.failed: its parity gate failed" in line


# ---------------------------------------------------------------------------------------------------------
# Serving: the MLflow model


def test_the_bundle_is_an_mlflow_pyfunc_model_that_scores_token_sets(here: Project) -> None:
    """``mlflow.pyfunc.load_model`` of the export's model and of ``models:/NAME@champion`` answers with the
    interaction scores — the bundle's, and the PyTorch run's within 1e-5 — not the pooled embeddings' product."""
    import mlflow

    from gssf_cli.stages.runs import TrainedModel, load_trained
    from gssf_cli.tracking.adapter import Tracker

    exported = here.scan_export
    assert exported["registered"] == {"name": REGISTERED, "version": 1, "alias": "champion"}
    mlflow.set_tracking_uri(Tracker().tracking_uri)
    images = np.load(here.folder / GALLERY)[:4]
    captions = _captions(here)[:3]
    bundle = BundleModel.load(here.folder / "exports/scan")
    expected = bundle.input_scores(images, captions)
    assert expected is not None
    _, model, dataset = load_trained(Tracker(), here.scan_run)
    in_torch = TrainedModel(model, dataset.vocab).input_scores(images, captions)
    assert in_torch is not None
    for uri in (f"models:/{exported['model_id']}", f"models:/{REGISTERED}@champion"):
        out = mlflow.pyfunc.load_model(uri).predict({"images": images, "texts": captions})
        assert out["image_embeddings"].shape == (4, 16) and out["text_embeddings"].shape == (3, 16)
        np.testing.assert_allclose(out["scores"], expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(out["scores"], in_torch, atol=1e-5, rtol=0)
        pooled = bundle.scores(out["image_embeddings"], out["text_embeddings"])
        assert not np.allclose(out["scores"], pooled, atol=1e-3), "scores come from the scorer, not the embeddings"


# ---------------------------------------------------------------------------------------------------------
# gssf index and gssf search


def test_index_and_search_by_late_interaction(here: Project) -> None:
    built = here.scan_index
    assert built["family"] == "interaction" and built["regions_per_image"] == 4 and built["count"] == 10
    assert set(built["files"]) == {"index.faiss", "ids.txt", "captions.txt", "tokens.npy"}
    assert built["eval"]["recall_at_10"] == 1.0 and built["eval"]["k"] == 10
    captions = _captions(here)
    found = _ok(_invoke("search", "--index", "indexes/scan", "--text", captions[7], "--k", "5", "--json"))
    hits = found["queries"][0]["results"]
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5] and found["params"]["per_word"] == DEFAULT_PER_WORD
    rows = [hit["row"] for hit in hits]
    exact = BundleModel.load(here.folder / "exports/scan").input_scores(np.load(here.folder / GALLERY)[rows],
                                                                         [captions[7]])  # fmt: skip
    assert exact is not None
    np.testing.assert_allclose([hit["score"] for hit in hits], exact[:, 0], atol=1e-6, rtol=0)
    assert all(hit["captions"] == captions[5 * hit["row"] : 5 * hit["row"] + 5] for hit in hits)
    evaluated = _ok(_invoke("search", "--index", "indexes/scan", "--texts", f"{DATA}/test_caps.txt", "--eval",
                            "--per-word", "1000", "--json"))  # fmt: skip
    assert evaluated["eval"]["recall_at_10"] == 1.0 and evaluated["eval"]["queries"] == 50
    assert evaluated["eval"]["per_word"] == 1000 and evaluated["params"]["per_word"] == 1000
    assert len(evaluated["queries"]) == 50
    shown = _invoke("search", "--index", "indexes/scan", "--text", captions[7], "--k", "3")
    assert shown.exit_code == 0 and captions[7].split()[0] in shown.stdout, shown.stderr


def test_a_token_index_served_as_a_model_answers_as_gssf_search_does(here: Project) -> None:
    """``--log-model`` on a token index: the logged model searches by late interaction as ``gssf search`` does."""
    import mlflow

    from gssf_cli.tracking.adapter import Tracker

    captions = _captions(here)[:2]
    mlflow.set_tracking_uri(Tracker().tracking_uri)
    answer = mlflow.pyfunc.load_model(f"models:/{here.scan_index['model_id']}").predict({"texts": captions, "k": 3})
    for caption, ids, scores in zip(captions, answer["ids"], answer["scores"], strict=True):
        hits = _ok(_invoke("search", "--index", "indexes/scan", "--text", caption, "--k", "3", "--json"))
        assert list(ids) == [hit["id"] for hit in hits["queries"][0]["results"]]
        np.testing.assert_allclose(scores, [hit["score"] for hit in hits["queries"][0]["results"]], atol=1e-6)


def test_a_token_index_is_searched_without_torch(here: Project) -> None:
    """The late-interaction path (ONNX Runtime, numpy, faiss) on a lean install: no torch, MLflow, Ray or onnx."""
    from tests.behaviour.test_search import _lean

    done = _lean(here.folder, "search", "--index", "indexes/scan", "--text", _captions(here)[0], "--k", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert "LEAKED []" in done.stderr
    assert len(json.loads(done.stdout)["queries"][0]["results"]) == 4


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing left


def _npy(name: str, shape: tuple[int, ...]) -> str:
    np.save(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return name


def _plain_gallery() -> str:
    """The test images as a plain array: no dataset folder beside it, so no captions."""
    Path("plain").mkdir(exist_ok=True)
    shutil.copyfile(GALLERY, "plain/gallery.npy")
    return "plain/gallery.npy"


CAPTION = "a red ball"
BAD: dict[str, tuple[Callable[[], list[str]], str]] = {
    "search: a token index with the embedding bundle": (
        lambda: ["search", "--index", "indexes/scan", "--bundle", "exports/emb", "--text", CAPTION],
        "exports/emb: an embedding bundle, and index indexes/scan holds token sets of an interaction bundle; pass "
        "the interaction bundle it was built from with --bundle",
    ),
    "search: an embedding index with the interaction bundle": (
        lambda: ["search", "--index", "indexes/emb", "--bundle", "exports/scan", "--text", CAPTION],
        "exports/scan: an interaction bundle, and index indexes/emb holds pooled embeddings",
    ),
    "search: --vectors on a token index": (
        lambda: ["search", "--index", "indexes/scan", "--vectors", _npy("v.npy", (2, 16)), "--embedded"],
        "indexes/scan: a token index is searched with captions (--text, --texts)",
    ),
    "search: --per-word on an embedding index": (
        lambda: ["search", "--index", "indexes/emb", "--text", CAPTION, "--per-word", "4"],
        "--per-word applies to a token index (built from an interaction bundle); indexes/emb is an embedding index",
    ),
    "search: --eval on an embedding index": (
        lambda: ["search", "--index", "indexes/emb", "--text", CAPTION, "--eval"],
        "--eval applies to a token index (built from an interaction bundle); indexes/emb is an embedding index",
    ),
    "search: --per-word 0": (
        lambda: ["search", "--index", "indexes/scan", "--text", CAPTION, "--per-word", "0"],
        "search.per_word",
    ),
    "search: a token index and unknown words only": (
        lambda: ["search", "--index", "indexes/scan", "--text", "zebras surfing"],
        "--text: none of the words of 'zebras surfing' is in the bundle's vocabulary",
    ),
    "index: --embedded with an interaction bundle": (
        lambda: ["index", "--bundle", "exports/scan", "--gallery", _npy("e.npy", (5, 16)), "--embedded", "--out",
                 "indexes/x"],
        "exports/scan: an interaction bundle indexes regions, so the gallery must be image-encoder inputs "
        "[N, R, F]; drop --embedded",
    ),
    "index: --embedded with an interaction bundle over regions": (
        lambda: ["index", "--bundle", "exports/scan", "--gallery", GALLERY, "--embedded", "--out", "indexes/x"],
        "exports/scan: an interaction bundle indexes regions, so the gallery must be image-encoder inputs "
        "[N, R, F]; drop --embedded",
    ),
    "index: --per-word with an embedding bundle": (
        lambda: ["index", "--bundle", "exports/emb", "--gallery", GALLERY, "--per-word", "4", "--out", "indexes/x"],
        "--per-word applies to a token index (an interaction bundle); exports/emb is an embedding bundle",
    ),
    "index: --eval of a token index over a gallery without captions": (
        lambda: ["index", "--bundle", "exports/scan", "--gallery", _plain_gallery(), "--eval", "--out", "indexes/x"],
        "plain/gallery.npy: --eval on a token index needs captions to search with: this gallery has none (it is no "
        "dataset split), so give --eval-queries CAPTIONS.txt",
    ),
    "index: --eval-queries vectors for a token index": (
        lambda: ["index", "--bundle", "exports/scan", "--gallery", GALLERY, "--eval", "--eval-queries",
                 _npy("q.npy", (3, 16)), "--out", "indexes/x"],
        "q.npy: a token index is searched with captions; give --eval-queries a .txt",
    ),
}  # fmt: skip


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(here: Project, case: str, as_json: bool) -> None:
    setup, expected = BAD[case]
    args = setup()
    before, runs_before = _snapshot(here.folder), _runs_in_store(here.folder)
    result = _invoke(*args, *(["--json"] if as_json else []))
    line = _one_line(result)
    assert expected in line, line
    assert "Traceback" not in result.stdout + result.stderr
    if as_json:
        error = json.loads(result.stdout)
        assert error["kind"] == "input" and error["exit_code"] == 2 and expected in error["error"]
    else:
        assert result.stdout == ""
    assert _snapshot(here.folder) == before, "nothing new in the project: no file, no index folder"
    assert _runs_in_store(here.folder) == runs_before, "no new MLflow run"
