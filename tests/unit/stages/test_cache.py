"""The pipeline cache: keys from contents, damage found by re-hashing what a stage wrote, an atomic cache file;
and, through ``gssf run``, a stage skipped only while its inputs and outputs are unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.core.errors import UserInputError
from gssf_cli.stages import cache

Gssf = Callable[..., Result]


def _files(root: Path, **contents: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (root / name).write_text(text)
    return root


def test_a_key_names_the_config_and_the_inputs() -> None:
    base = cache.key("train", {"lr": 0.1, "epochs": 2}, {"data": "abc"})
    assert base == cache.key("train", {"epochs": 2, "lr": 0.1}, {"data": "abc"}), "key order does not matter"
    assert len({
        base,
        cache.key("train", {"lr": 0.2, "epochs": 2}, {"data": "abc"}),
        cache.key("train", {"lr": 0.1, "epochs": 2}, {"data": "abd"}),
        cache.key("tune", {"lr": 0.1, "epochs": 2}, {"data": "abc"}),
    }) == 4  # fmt: skip


def test_same_contents_same_digest_and_a_changed_byte_a_new_one(tmp_path: Path) -> None:
    a = _files(tmp_path / "a" / "data", **{"x.txt": "one", "y.txt": "two"})
    b = _files(tmp_path / "b" / "data", **{"x.txt": "one", "y.txt": "two"})
    assert cache.digest([a]) == cache.digest([b]), "the same contents elsewhere"
    (b / "y.txt").write_text("twO")
    changed = cache.digest([b])
    assert changed != cache.digest([a])
    (b / "y.txt").rename(b / "z.txt")
    assert cache.digest([b]) not in (changed, cache.digest([a])), "a renamed file is another dataset"


def test_hidden_files_are_not_outputs(tmp_path: Path) -> None:
    root = _files(tmp_path / "out", **{"a.npy": "a", ".lock": "l"})
    _files(root / "sub", **{"b.json": "b"})
    assert cache.files_of([root]) == [root / "a.npy", root / "sub" / "b.json"]
    assert cache.files_of([root / "a.npy", tmp_path / "missing"]) == [root / "a.npy"]


def test_damage_says_what_changed(tmp_path: Path) -> None:
    root = _files(tmp_path / "bundle", **{"graph.onnx": "graph", "manifest.json": "{}"})
    recorded = cache.fingerprint([root])
    assert set(recorded) == {str(root / "graph.onnx"), str(root / "manifest.json")}
    assert cache.damage(recorded, [root]) is None
    (root / "extra.txt").write_text("x")
    assert cache.damage(recorded, [root]) == f"{root / 'extra.txt'} appeared since the stage ran"
    assert cache.damage(recorded) is None, "without roots only the recorded files count"
    (root / "graph.onnx").write_text("grapH")
    assert cache.damage(recorded) == f"{root / 'graph.onnx'} changed since it was written"
    (root / "graph.onnx").unlink()
    assert cache.damage(recorded) == f"{root / 'graph.onnx'} is missing"


def _entry(**changed: object) -> dict[str, object]:
    return {"key": "k1", "run_id": "r1", "summary": {}, "outputs": {}, "roots": []} | changed


def test_the_cache_file_round_trips_and_survives_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unusable cache — unreadable, of the wrong shape, naming paths outside the pipeline's folders — counts
    as absent, each step with the reason; a folder where the cache belongs is refused in one line."""
    monkeypatch.chdir(tmp_path)
    entries = cache.Cache("p", Path("c"))
    assert entries.get("train") is None and entries.absent_because("train") is None
    entries.record("train", _entry(outputs={"runs/r1/best/model.pt": "ab"}, roots=["runs/r1/best"]))
    assert cache.Cache("p", Path("c")).get("train") == _entry(
        outputs={"runs/r1/best/model.pt": "ab"}, roots=["runs/r1/best"]
    )
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["p.json"], "no temporary file is left"
    damaged = {
        b'{"train": ': "is not readable JSON",
        b"\xff\xfe{}": "is not readable JSON",
        b"[1, 2]": "holds a list, not an object of steps",
    }
    for text, why in damaged.items():
        (tmp_path / "c/p.json").write_bytes(text)
        read = cache.Cache("p", Path("c"))
        assert read.entries == {} and why in str(read.absent_because("train")), text
    shapes = {
        "evaluate": 3,
        "train": _entry(run_id=["r1"]),
        "export": _entry(roots="/proc/1/cwd"),
        "index": _entry(outputs={"/etc/passwd": "ab"}),
        "prepare": _entry(roots=["../outside"]),
        "tune": {"key": "k"},
    }
    (tmp_path / "c/p.json").write_text(json.dumps(shapes | {"compare": _entry()}))
    read = cache.Cache("p", Path("c"))
    assert read.entries == {"compare": _entry()}
    assert {step: read.absent_because(step) for step in shapes} == {
        "evaluate": "its entry in c/p.json is unusable: an entry is a int, not an object",
        "train": "its entry in c/p.json is unusable: its 'run_id' is a list",
        "export": "its entry in c/p.json is unusable: its 'roots' is a str",
        "index": "its entry in c/p.json is unusable: it names /etc/passwd, outside the folders the pipeline writes to",
        "prepare": "its entry in c/p.json is unusable: it names ../outside, outside the folders the pipeline writes to",
        "tune": "its entry in c/p.json is unusable: it has no 'run_id'",
    }
    outside = _entry(roots=[str(tmp_path.parent / "runs")])
    (tmp_path / "c/p.json").write_text(json.dumps({"train": outside}))
    assert cache.Cache("p", Path("c"), allowed=[Path(), tmp_path.parent / "runs"]).get("train") == outside
    (tmp_path / "c/q.json").mkdir()
    with pytest.raises(UserInputError, match=r"^c/q.json is not a file: the pipeline cache cannot be written there"):
        cache.Cache("q", Path("c"))


CHAIN = """
[pipeline]
name = "chain"

[prepare]
dataset = "features"
source = "src.npz"
out = "data/chain"
dev_fraction = 0.2
test_fraction = 0.2

[train]
metric = "diag"
embed_dim = 8
batch_size = 16
epochs = 1
device = "cpu"

[evaluate]

[export]
"""


def _statuses(gssf: Gssf, *extra: str) -> dict[str, str]:
    result = gssf("run", "chain.toml", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return {s["stage"]: s["status"] for s in json.loads(result.stdout)["stages"]}


def _run_names() -> list[str]:
    from gssf_cli.tracking.adapter import Tracker

    client = Tracker().client
    return sorted(r.info.run_name for r in client.search_runs([e.experiment_id for e in client.search_experiments()]))


def test_the_cache_trusts_contents_not_names(gssf: Gssf, workdir: Path) -> None:
    """Each kind of damage re-runs the stage that wrote the file and everything after it, and only that."""
    from tests.factories import write_feature_npz

    write_feature_npz(workdir / "src.npz", paired=True, n=40, k=2)
    (workdir / "chain.toml").write_text(CHAIN)
    ran = dict.fromkeys(["prepare", "train", "evaluate", "export"], "ran")
    cached = dict.fromkeys(ran, "cached")
    first = gssf("run", "chain.toml", "--dry-run", "--json")
    assert {s["why"] for s in json.loads(first.stdout)["stages"]} <= {"first run", "prepare runs before it",
                                                                      "train runs before it"}, first.stdout  # fmt: skip
    assert json.loads(first.stdout)["stages"][0]["why"] == "first run"
    assert _statuses(gssf) == ran
    runs_before = _run_names()
    cached_again = gssf("run", "chain.toml", "--json")
    assert {s["status"] for s in json.loads(cached_again.stdout)["stages"]} == {"cached"}
    assert json.loads(cached_again.stdout)["parent_run_id"] is None
    assert _run_names() == runs_before, "a fully cached re-run opens no MLflow run"
    assert len(set(runs_before)) == len(runs_before), f"run names repeat: {runs_before}"
    assert _statuses(gssf, "--force") == ran
    cache = json.loads((workdir / ".gssf" / "pipelines" / "chain.json").read_text())

    bundle = Path(cache["export"]["summary"]["path"])
    graph = next(bundle.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:100])
    dry = json.loads(gssf("run", "chain.toml", "--dry-run", "--json").stdout)["stages"]
    assert [(s["stage"], s["status"]) for s in dry][-1] == ("export", "would run")
    assert "changed since it was written" in dry[-1]["why"]
    assert _statuses(gssf) == {**cached, "export": "ran"}

    best = Path(cache["train"]["outputs"] and next(iter(cache["train"]["outputs"]))).parent
    (best / "model.safetensors").unlink()
    assert _statuses(gssf) == {**cached, "train": "ran", "evaluate": "ran", "export": "ran"}

    with open(workdir / "data" / "chain" / "train_ims.npy", "ab") as fh:
        fh.write(b"xx")
    assert _statuses(gssf) == ran

    write_feature_npz(workdir / "src.npz", paired=True, n=44, k=2)
    result = gssf("run", "chain.toml", "--json")
    assert result.exit_code == 0, result.stderr
    assert {s["stage"]: s["status"] for s in json.loads(result.stdout)["stages"]} == ran
    assert "prepare: runs again: input source changed" in result.stderr, "the reason names what changed"


def test_a_changed_key_is_explained_by_what_changed() -> None:
    from gssf_cli.stages import cache

    before = cache.basis({"block_size": 8, "epochs": 4}, {"dataset": "aa"})
    now = cache.basis({"block_size": 16, "epochs": 4, "lr": 0.1}, {"dataset": "bb"})
    assert cache.changes(before, now) == "block_size 8 → 16; input dataset changed; lr unset → 0.1"
    assert cache.changes(None, now) == "its settings or inputs changed", "an entry from before the basis was kept"
    assert cache.changes(now, now) == "gssf's version changed", "the key also hashes the version"
    many = cache.basis({f"s{i}": i for i in range(6)}, {})
    assert cache.changes({}, many) == "its settings or inputs changed"
    assert cache.changes(cache.basis({"s0": -1}, {}), many).endswith("; and 2 more")
