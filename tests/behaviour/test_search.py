"""``gssf index`` and ``gssf search`` on an exported bundle: exactness against the graphs by hand, approximate
kinds with --eval, the MLflow run, bad input (exit 2, one line, nothing left), and a search path without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.core.errors import UserInputError
from tests.behaviour.test_bad_input import _runs_in_store, _snapshot

ROOT = Path(__file__).resolve().parents[2]
BUNDLE, DATA = "exports/quickstart", "data/quickstart"


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})


def _ok(result: Result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The quickstart's data (its pipeline's [prepare] settings) and a one-epoch GSSF model exported as
    ``exports/quickstart``; tests run in this folder and may add indexes under ``indexes/``."""
    root = tmp_path_factory.mktemp("search")
    prepare = tomllib.loads((ROOT / "pipelines/quickstart.toml").read_text())["prepare"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        args = [f"--{key.replace('_', '-')}={value}" for key, value in prepare.items() if key != "dataset"]
        assert _invoke("prepare", "--dataset", prepare["dataset"], *args).exit_code == 0
        _ok(_invoke("train", "--data", DATA, "--metric", "gssf", "--block-size", "8", "--embed-dim", "32",
                    "--word-dim", "32", "--epochs", "1", "--batch-size", "128", "--json"))  # fmt: skip
        _ok(_invoke("export", "--onnx", "--run", "latest", "--out", BUNDLE, "--json"))
        _ok(_invoke("index", "--bundle", BUNDLE, "--gallery", f"{DATA}/test_ims.npy", "--json"))
        yield root


@pytest.fixture
def here(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def _by_hand(folder: Path, captions: list[str]) -> np.ndarray:
    """``metric_head(image_encoder(test images)) @ text_encoder(captions).T`` ``[N, Q]`` with the graphs on ONNX
    Runtime, tokenised by the rule the manifest states — no gssf code."""
    import re

    bundle = folder / BUNDLE
    words = json.loads((bundle / "vocab.json").read_text())["words"]
    index = {w: i for i, w in enumerate(words)}
    ids = [[1, *(index.get(t, 3) for t in re.findall(r"[^\W_]+(?:'[^\W_]+)?", c.lower())), 2] for c in captions]
    tokens = np.array([i + [0] * (max(map(len, ids)) - len(i)) for i in ids], dtype=np.int64)

    def run(name: str, feeds: dict) -> np.ndarray:
        return ort.InferenceSession(str(bundle / f"{name}.onnx")).run(None, feeds)[0]

    texts = run("text_encoder", {"tokens": tokens, "lengths": np.array([len(i) for i in ids], dtype=np.int64)})
    images = run("image_encoder", {"features": np.load(folder / DATA / "test_ims.npy")})
    return run("metric_head", {"embeddings": images}) @ texts.T


def test_flat_search_equals_the_graphs_scored_by_hand(here: Path) -> None:
    captions = (here / DATA / "test_caps.txt").read_text().splitlines()[::37][:8]
    (here / "q.txt").write_text("\n".join(captions) + "\n")
    result = _ok(_invoke("search", "--index", "indexes/quickstart", "--texts", "q.txt", "--k", "10", "--json"))
    scores = _by_hand(here, captions)
    assert [q["query"] for q in result["queries"]] == captions
    for column, query in enumerate(result["queries"]):
        expected = np.argsort(-scores[:, column], kind="stable")[:10]
        rows = [hit["row"] for hit in query["results"]]
        got = np.array([hit["score"] for hit in query["results"]])
        assert [hit["rank"] for hit in query["results"]] == list(range(1, 11))
        assert np.allclose(got, scores[expected, column], atol=1e-5)
        near_ties = np.abs(scores[rows, column] - scores[expected, column]) <= 1e-5
        assert (np.array(rows) == expected)[~near_ties].all()
        assert [hit["id"] for hit in query["results"]] == [str(r) for r in rows]


def test_the_manifest_names_the_bundle_by_content_and_checksums_its_files(here: Path) -> None:
    from gssf_cli.core.files import manifest_digest, sha256_file

    manifest = json.loads((here / "indexes/quickstart/manifest.json").read_text())
    assert manifest["bundle"]["digest"] == manifest_digest(here / BUNDLE)
    assert (here / "indexes/quickstart" / manifest["bundle"]["path"]).resolve() == (here / BUNDLE).resolve()
    for name, entry in manifest["files"].items():
        assert sha256_file(here / "indexes/quickstart" / name) == entry["sha256"]
    assert manifest["count"] == 150 and manifest["kind"] == "flat"
    assert (here / "indexes/quickstart/ids.txt").read_text().splitlines() == [str(i) for i in range(150)]
    assert set(manifest["files"]) == {"index.faiss", "ids.txt", "captions.txt"}
    assert manifest["gallery"]["captions"] == {"source": f"{DATA}/test_caps.txt", "per_row": 5}
    assert (here / "indexes/quickstart/captions.txt").read_bytes() == (here / DATA / "test_caps.txt").read_bytes()


def test_an_index_is_hashed_once_per_process_and_a_file_changed_in_place_is_caught(
    here: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest records each file's stamp (size, mtime, ctime, inode) beside its sha256: an index opened where
    it was built is not re-hashed, a copy is hashed once per process, and a byte changed in place, with the size
    and mtime put back, still fails the check (the write changed the ctime, which no tool can set back)."""
    from gssf_cli.core import files
    from gssf_cli.deploy.index_folder import open_index

    hashed: list[str] = []
    sha256 = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: hashed.append(Path(path).name) or sha256(path))
    index_files = {"index.faiss", "ids.txt", "captions.txt"}

    open_index(here / "indexes/quickstart")
    assert index_files.isdisjoint(hashed), "an index where it was built is not re-hashed"
    copy = tmp_path / "copy"
    shutil.copytree(here / "indexes/quickstart", copy)
    for _ in range(2):
        open_index(copy, here / BUNDLE)
    assert sorted(name for name in hashed if name in index_files) == sorted(index_files), "a copy: hashed once"

    target = copy / "index.faiss"
    before = target.stat()
    with open(target, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(UserInputError, match=r"index\.faiss: checksum mismatch"):
        open_index(copy, here / BUNDLE)


def test_each_hit_shows_its_images_own_captions(here: Path) -> None:
    """An index of a dataset's images answers with what each hit shows, so a person can judge the hits."""
    lines = (here / DATA / "test_caps.txt").read_text().splitlines()
    found = _ok(_invoke("search", "--index", "indexes/quickstart", "--text", "red square", "--k", "5", "--json"))
    hits = found["queries"][0]["results"]
    assert len(hits) == 5
    assert all(hit["captions"] == lines[5 * hit["row"] : 5 * hit["row"] + 5] for hit in hits)
    args = ["search", "--index", "indexes/quickstart", "--text", "red square", "--k", "3"]
    shown = CliRunner().invoke(app, args, env={"COLUMNS": "300", "NO_COLOR": "1"})  # wide: a caption on one line
    assert shown.exit_code == 0, shown.stderr
    assert "captions" in shown.stdout.splitlines()[2]
    assert all(caption in shown.stdout for hit in hits[:3] for caption in hit["captions"])


def test_the_build_is_an_mlflow_run_with_its_figures(here: Path) -> None:
    from gssf_cli.tracking.adapter import Tracker

    tracker = Tracker()
    runs = tracker.client.search_runs([tracker.experiment_id], "tags.`gssf.stage` = 'index'")
    assert runs, "no index run"
    run = runs[0]
    assert run.data.metrics["count"] == 150 and run.data.metrics["build_seconds"] > 0
    assert run.data.tags["gssf.bundle.digest"] == json.loads((here / "indexes/quickstart/manifest.json").read_text())[
        "bundle"]["digest"]  # fmt: skip


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_report_recall_against_exact_search(here: Path, kind: str) -> None:
    out = f"indexes/{kind}"
    built = _ok(_invoke("index", "--bundle", BUNDLE, "--gallery", f"{DATA}/test_ims.npy", "--kind", kind,
                        "--out", out, "--eval", "--eval-queries", f"{DATA}/test_caps.txt", "--json"))  # fmt: skip
    evaluation = built["eval"]
    assert evaluation["k"] == 10 and evaluation["queries"] == 750
    assert 0.0 <= evaluation["recall_at_10"] <= 1.0 and evaluation["queries_per_second"] > 0
    if kind == "hnsw":
        assert evaluation["recall_at_10"] >= 0.95  # 150 vectors: the graph is nearly exhaustive
    found = _ok(_invoke("search", "--index", out, "--text", (here / DATA / "test_caps.txt").read_text().split("\n")[0],
                        "--k", "3", "--json"))  # fmt: skip
    assert len(found["queries"][0]["results"]) == 3 and found["kind"] == kind


def test_flat_eval_has_recall_one_and_k_beyond_the_gallery_returns_the_whole_gallery(here: Path) -> None:
    built = _ok(_invoke("index", "--bundle", BUNDLE, "--gallery", f"{DATA}/test_ims.npy", "--out", "indexes/e",
                        "--eval", "--eval-count", "20", "--json"))  # fmt: skip
    assert built["eval"]["recall_at_10"] == pytest.approx(1.0) and built["eval"]["queries"] == 20
    found = _ok(_invoke("search", "--index", "indexes/e", "--text", "red square", "--k", "1000000000", "--json"))
    assert sorted(hit["row"] for hit in found["queries"][0]["results"]) == list(range(150))


def test_embedded_gallery_and_vector_queries_match_the_encoded_ones(here: Path) -> None:
    from gssf_cli.deploy.bundle import BundleModel

    bundle = BundleModel.load(here / BUNDLE)
    np.save(here / "emb.npy", bundle.encode_images(np.load(here / DATA / "test_ims.npy")))
    captions = (here / DATA / "test_caps.txt").read_text().splitlines()[:3]
    np.save(here / "q.npy", bundle.encode_texts(captions))
    (here / "ids.txt").write_text("".join(f"img-{i}\n" for i in range(150)))
    _ok(_invoke("index", "--bundle", BUNDLE, "--gallery", "emb.npy", "--embedded", "--ids", "ids.txt",
                "--out", "indexes/emb", "--json"))  # fmt: skip
    by_vector = _ok(_invoke("search", "--index", "indexes/emb", "--vectors", "q.npy", "--embedded", "--json"))
    plain = _invoke("search", "--index", "indexes/emb", "--vectors", "q.npy", "--embedded", "--k", "2")
    assert plain.exit_code == 0 and "img-" in plain.stdout and "captions" not in plain.stdout, plain.stdout
    (here / "q3.txt").write_text("\n".join(captions) + "\n")
    by_text = _ok(_invoke("search", "--index", "indexes/quickstart", "--texts", "q3.txt", "--json"))
    for vector_query, text_query in zip(by_vector["queries"], by_text["queries"], strict=True):
        assert [h["id"] for h in vector_query["results"]] == [f"img-{h['row']}" for h in text_query["results"]]
        assert not any("captions" in hit for hit in vector_query["results"]), "a plain array brings no captions"
        assert np.allclose([h["score"] for h in vector_query["results"]], [h["score"] for h in text_query["results"]],
                           atol=1e-5)  # fmt: skip


def test_an_interrupted_build_leaves_nothing(here: Path) -> None:
    from gssf_cli.core.stage_configs import IndexConfig
    from gssf_cli.deploy.indexes import build

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    before = _snapshot(here)
    config = IndexConfig(bundle=Path(BUNDLE), gallery=Path(f"{DATA}/test_ims.npy"), out=Path("indexes/cut"))
    with pytest.raises(KeyboardInterrupt):
        build(config, progress=interrupt)
    assert _snapshot(here) == before


def _other_bundle(folder: Path) -> str:
    """A valid bundle that is not the index's: the same graphs, another manifest (so another digest)."""
    other = folder / "exports/other"
    if not other.exists():
        shutil.copytree(folder / BUNDLE, other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["source_run_id"] = "another-run"
        (other / "manifest.json").write_text(json.dumps(manifest))
    return "exports/other"


def _tampered_bundle(folder: Path) -> str:
    tampered = folder / "exports/tampered"
    if not tampered.exists():
        shutil.copytree(folder / BUNDLE, tampered)
        with open(tampered / "metric_head.onnx", "ab") as fh:
            fh.write(b"\0")
    return "exports/tampered"


def _write(name: str, content: str) -> str:
    Path(name).write_text(content)
    return name


def _npy(name: str, shape: tuple[int, ...]) -> str:
    np.save(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return name


GALLERY = f"{DATA}/test_ims.npy"
BAD = {
    "index: bundle fails --check": (
        lambda f: ["index", "--bundle", _tampered_bundle(f), "--gallery", GALLERY, "--out", "indexes/x"],
        "metric_head.onnx: checksum mismatch",
    ),
    "index: no bundle": (lambda f: ["index", "--gallery", GALLERY], "--bundle exports/NAME"),
    "index: registered name": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--out", "indexes/x", "--register", "a/b"],
        "not a valid registered model name",
    ),
    "index: missing bundle": (
        lambda f: ["index", "--bundle", "exports/nope", "--gallery", GALLERY, "--out", "indexes/x"],
        "not a gssf ONNX bundle",
    ),
    "index: gallery dims": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _npy("g.npy", (5, 8, 31)), "--out", "indexes/x"],
        "dimension mismatch",
    ),
    "index: gallery rank": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _npy("g.npy", (5, 32)), "--out", "indexes/x"],
        "dimension mismatch",
    ),
    "index: embedded dims": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _npy("g.npy", (5, 31)), "--embedded", "--out", "i/x"],
        "dimension mismatch",
    ),
    "index: gallery nan": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _nan_gallery(), "--out", "indexes/x"],
        "nan.npy: contains NaN or Inf (first at row 3)",
    ),
    "index: pickle gallery": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _pickled(), "--out", "indexes/x"],
        "not a readable .npy array",
    ),
    "index: ids count": (
        lambda f: [
            "index",
            "--bundle",
            BUNDLE,
            "--gallery",
            GALLERY,
            "--ids",
            _write("i.txt", "a\nb\n"),
            "--out",
            "indexes/x",
        ],
        "2 ids for a gallery of 150 rows",
    ),
    "index: captions changed": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _changed_captions(f), "--out", "indexes/x"],
        "test_caps.txt: missing or changed since the dataset was prepared",
    ),
    "index: ids twice": (
        lambda f: [
            "index",
            "--bundle",
            BUNDLE,
            "--gallery",
            GALLERY,
            "--out",
            "indexes/x",
            "--ids",
            _write("i.txt", "".join(f"{i % 149}\n" for i in range(150))),
        ],
        "appears twice",
    ),
    "index: exists": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--out", "indexes/quickstart"],
        "already exists",
    ),
    "index: nlist too large": (
        lambda f: [
            "index",
            "--bundle",
            BUNDLE,
            "--gallery",
            GALLERY,
            "--kind",
            "ivfpq",
            "--nlist",
            "5000",
            "--out",
            "indexes/x",
        ],
        "--nlist",
    ),
    "index: eval queries unknown words": (
        lambda f: [
            "index",
            "--bundle",
            BUNDLE,
            "--gallery",
            GALLERY,
            "--eval",
            "--out",
            "indexes/x",
            "--eval-queries",
            _write("e.txt", "zzz qqq\n"),
        ],
        "e.txt: line 1: none of the words",
    ),
    "search: other bundle": (
        lambda f: ["search", "--index", "indexes/quickstart", "--bundle", _other_bundle(f), "--text", "red square"],
        "not the bundle index indexes/quickstart was built from",
    ),
    "search: bundle fails --check": (
        lambda f: ["search", "--index", "indexes/quickstart", "--bundle", _tampered_bundle(f), "--text", "red square"],
        "metric_head.onnx: checksum mismatch",
    ),
    "search: empty query": (lambda f: ["search", "--index", "indexes/quickstart", "--text", "  "], "empty query"),
    "search: unknown words only": (
        lambda f: ["search", "--index", "indexes/quickstart", "--text", "zebras surfing"],
        "none of the words of 'zebras surfing' is in the bundle's vocabulary",
    ),
    "search: unknown words in a file": (
        lambda f: ["search", "--index", "indexes/quickstart", "--texts", _write("t.txt", "red square\nzzz\n")],
        "t.txt: line 2: none of the words",
    ),
    "search: vectors without --embedded": (
        lambda f: ["search", "--index", "indexes/quickstart", "--vectors", _npy("v.npy", (2, 32))],
        "takes captions",
    ),
    "search: vector dims": (
        lambda f: ["search", "--index", "indexes/quickstart", "--vectors", _npy("v.npy", (2, 7)), "--embedded"],
        "query vectors of shape [2, 7]",
    ),
    "search: no query": (lambda f: ["search", "--index", "indexes/quickstart"], "give exactly one of --text"),
    "search: two queries": (
        lambda f: ["search", "--index", "indexes/quickstart", "--text", "red square", "--texts", "q.txt"],
        "give exactly one of --text, --texts, --vectors (got --text, --texts)",
    ),
    "search: no index": (
        lambda f: ["search", "--index", "indexes/nope", "--text", "red square"],
        "no such index folder",
    ),
    "search: changed index": (
        lambda f: ["search", "--index", _changed_index(f), "--text", "red square"],
        "index.faiss: checksum mismatch",
    ),
    "index: --force on a folder that is not an index": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--out", _victim(f), "--force"],
        "--out victim is a folder that is not a gssf index",
    ),
    "index: --out holds the bundle": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--out", "exports", "--force"],
        "--out exports is or holds the bundle",
    ),
    "index: --out is the working folder": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--out", ".", "--force"],
        "is or holds the bundle",
    ),
    "index: empty eval queries": (
        lambda f: [
            "index",
            "--bundle",
            BUNDLE,
            "--gallery",
            GALLERY,
            "--eval",
            "--out",
            "indexes/x",
            "--eval-queries",
            _write("empty.txt", ""),
        ],
        "empty.txt: no queries",
    ),
    "index: a parameter of another kind": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--ef-search", "10", "--out", "indexes/x"],
        "--ef-search does not apply to --kind flat",
    ),
    "index: negative seed": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", GALLERY, "--seed", "-1", "--out", "indexes/x"],
        "index.seed",
    ),
    "index: overflow through the encoders": (
        lambda f: ["index", "--bundle", BUNDLE, "--gallery", _huge_gallery(), "--out", "indexes/x"],
        "huge.npy: row 2 becomes NaN or Inf through the bundle",
    ),
    "search: a parameter of another kind": (
        lambda f: ["search", "--index", "indexes/quickstart", "--text", "red square", "--nprobe", "3"],
        "--nprobe does not apply to --kind flat",
    ),
    "search: k zero": (
        lambda f: ["search", "--index", "indexes/quickstart", "--text", "red square", "--k", "0"],
        "search.k",
    ),
}


def _changed_captions(folder: Path) -> str:
    """The quickstart's test split in a copy of its dataset folder whose captions file was edited since."""
    changed = folder / "data/changed"
    if not changed.exists():
        shutil.copytree(folder / DATA, changed)
        with open(changed / "test_caps.txt", "a") as fh:
            fh.write("a red square\n")
    return "data/changed/test_ims.npy"


def _victim(folder: Path) -> str:
    (folder / "victim").mkdir(exist_ok=True)
    (folder / "victim" / "precious.txt").write_text("keep me\n")
    return "victim"


def _huge_gallery() -> str:
    array = np.load(f"{DATA}/test_ims.npy")[:5]
    array[2] = 3e38
    np.save("huge.npy", array)
    return "huge.npy"


def _nan_gallery() -> str:
    array = np.load(f"{DATA}/test_ims.npy")
    array[3, 1, 2] = np.nan
    np.save("nan.npy", array)
    return "nan.npy"


def _pickled() -> str:
    np.save("obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return "obj.npy"


def _changed_index(folder: Path) -> str:
    changed = folder / "indexes/changed"
    if not changed.exists():
        shutil.copytree(folder / "indexes/quickstart", changed)
        manifest = json.loads((changed / "manifest.json").read_text())
        manifest["bundle"]["path"] = os.path.relpath(folder / BUNDLE, changed)
        (changed / "manifest.json").write_text(json.dumps(manifest))
        with open(changed / "index.faiss", "r+b") as fh:
            fh.seek(-4, os.SEEK_END)
            fh.write(b"\1\2\3\4")
    return "indexes/changed"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(here: Path, case: str) -> None:
    setup, expected = BAD[case]
    args = setup(here)
    before, runs_before = _snapshot(here), _runs_in_store(here)
    result = _invoke(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gssf: error: "), result.stderr
    assert expected in lines[0]
    assert _snapshot(here) == before
    assert _runs_in_store(here) == runs_before


BLOCKED = ("torch", "mlflow", "ray", "onnx", "onnxscript", "sklearn", "matplotlib", "safetensors")
LEAN = f"""
import importlib.abc, sys
class Lean(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (lean install)", name=name)
sys.meta_path.insert(0, Lean())
from gssf_cli.cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as done:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
    print("LEAKED", leaked, file=sys.stderr)
    raise
"""


def _lean(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``gssf ARGS`` in a fresh interpreter where torch, MLflow, Ray, onnx & co. cannot be imported: what a
    ``pip install "gssf[search]"`` machine has."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", LEAN, *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_search_runs_without_torch_mlflow_ray_or_onnx(here: Path) -> None:
    caption = (here / DATA / "test_caps.txt").read_text().splitlines()[0]
    done = _lean(here, "search", "--index", "indexes/quickstart", "--text", caption, "--json")
    assert done.returncode == 0, done.stderr
    assert "LEAKED []" in done.stderr
    assert len(json.loads(done.stdout)["queries"][0]["results"]) == 10


def test_a_lean_install_names_what_a_full_command_lacks(here: Path) -> None:
    done = _lean(here, "train", "--data", DATA, "--epochs", "1")
    assert done.returncode == 2, done.stderr
    hint = f'pip install -e "{ROOT}[all]"'  # the tests run on an editable install of this checkout
    assert done.stderr.splitlines()[0].endswith(f"which this install lacks: {hint}"), done.stderr
    help_text = _lean(here, "--help")
    assert help_text.returncode == 0 and "search" in help_text.stdout


def test_the_config_offers_exactly_the_index_kinds_and_parameters_search_builds() -> None:
    import dataclasses
    import typing

    from gssf_cli.core import limits
    from gssf_cli.core.stage_configs import IndexConfig, SearchConfig
    from gssf_cli.deploy import search

    assert set(limits.INDEX_KINDS) == set(search.INDEX_KINDS)
    assert set(typing.get_args(typing.get_type_hints(IndexConfig)["kind"])) == set(search.INDEX_KINDS)
    index_fields = {field.name for field in dataclasses.fields(IndexConfig)}
    search_fields = {field.name for field in dataclasses.fields(SearchConfig)}
    for kind in search.INDEX_KINDS.values():
        assert set(kind.params) <= index_fields
        assert set(kind.search_params) <= search_fields


def test_the_table_shows_queries_and_ids_literally(here: Path) -> None:
    (here / "odd.txt").write_text("".join(f"[red]img {i}[/]\n" for i in range(150)))
    _ok(
        _invoke("index", "--bundle", BUNDLE, "--gallery", GALLERY, "--ids", "odd.txt", "--out", "indexes/odd", "--json")
    )
    caption = (here / DATA / "test_caps.txt").read_text().splitlines()[0]
    shown = _invoke("search", "--index", "indexes/odd", "--text", f"[bold]{caption}", "--k", "3")
    assert shown.exit_code == 0, shown.stderr
    assert "query: [bold]" + caption.split()[0] in shown.stdout
    assert shown.stdout.count("[red]img ") == 3


def test_a_logged_search_model_answers_as_gssf_search_does_without_torch(here: Path) -> None:
    """``gssf index --register NAME`` logs the index and its bundle as one MLflow model (the run names it, the
    registry's champion points at it); loaded back through MLflow it answers captions with the ids, rows and
    scores ``gssf search --json`` gives (ivfpq: its refine reads the vectors the model carries), at the k asked or its default, with a gallery smaller than k giving all
    of it, and refuses a bad request in one line. Serving it over HTTP: ``tests/behaviour/test_readme.py``."""
    import mlflow

    from gssf_cli.deploy import served_search
    from gssf_cli.tracking.adapter import Tracker

    built = _ok(_invoke("index", "--bundle", BUNDLE, "--gallery", GALLERY, "--kind", "ivfpq", "--out",
                        "indexes/served", "--register", "served-search", "--json"))  # fmt: skip
    assert built["registered"] == {"name": "served-search", "version": 1, "alias": "champion"}
    captions = (here / DATA / "test_caps.txt").read_text().splitlines()[:3]
    Path("served-queries.txt").write_text("\n".join(captions) + "\n")
    searched = _ok(_invoke("search", "--index", "indexes/served", "--texts", "served-queries.txt", "--k", "4",
                           "--json"))["queries"]  # fmt: skip
    mlflow.set_tracking_uri(Tracker().tracking_uri)
    model = mlflow.pyfunc.load_model("models:/served-search@champion")
    answer = model.predict({"texts": captions, "k": 4})
    assert answer["ids"].tolist() == [[hit["id"] for hit in query["results"]] for query in searched]
    assert answer["rows"].tolist() == [[hit["row"] for hit in query["results"]] for query in searched]
    expected = np.array([[hit["score"] for hit in query["results"]] for query in searched])
    assert np.allclose(answer["scores"], expected, atol=1e-6)
    assert model.predict({"texts": captions[:1]})["ids"].shape == (1, served_search.DEFAULT_K)
    count = len(np.load(here / GALLERY, mmap_mode="r"))
    assert model.predict({"texts": captions[:1], "k": served_search.MAX_K})["rows"].shape == (1, count)
    with pytest.raises(Exception, match="k: expected a whole number") as refused:
        model.predict({"texts": captions, "k": -1})
    assert "\n" not in str(refused.value)
    run = Tracker().client.get_run(built["run_id"])
    assert run.outputs is not None and built["model_id"] in [m.model_id for m in run.outputs.model_outputs]
    loaded = subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
                             "mlflow.pyfunc.load_model('models:/served-search/1'); print('torch' in sys.modules)",
                             Tracker().tracking_uri], capture_output=True, text=True, cwd=here, timeout=120)  # fmt: skip
    assert loaded.stdout.strip() == "False", loaded.stderr[-2000:]
