"""``gssf compare``: two tiny runs that differ only in seed, end to end through a real MLflow SQLite store —
differences, intervals and p-values, agreement with ``gssf evaluate``, groups of seeds, what the run logs, the
label-based path, and bad input refused with exit 2 and nothing left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.cli.options import shown_default
from gssf_cli.core.stage_configs import CompareConfig, PrepareConfig
from gssf_cli.tracking.adapter import Tracker
from tests.behaviour.test_cli_conventions import TYPER_TYPES
from tests.conftest import tiny_train_config
from tests.unit.cli.test_app import HEAVY
from tests.unit.cli.test_options import help_rows

CROSS_MODAL_TESTED = (
    "rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_map", "i2t_meanr", "t2i_meanr",
    "i2i_r1", "i2i_r5", "i2i_r10", "i2i_map_at_r", "t2t_r1", "t2t_r5", "t2t_r10", "t2t_map_at_r",
)  # fmt: skip
"""What compare tests of cross-modal runs on generated data: the cross-modal metrics, then the intra-modal ones
(the data records concepts, so both sides have relevance)."""
LABEL_TESTED = ("map_at_r", "precision_at_1", "r_precision", "r_at_1", "r_at_5", "r_at_10")
FAST = ["--bootstrap", "2000", "--permutations", "2000", "--no-plots"]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "140", "NO_COLOR": "1"})


def _ok(*args: str) -> dict[str, Any]:
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


class Runs:
    """The shared store: ``root`` (the working directory), cross-modal runs ``a``, ``b``, ``c`` (seeds 0, 1, 2
    of one configuration), ``noisy`` (seed 0 on a copy of that data whose train captions are noisy), ``other``
    (seed 0 on data generated with another seed), label-based runs ``la``, ``lb``, and the prepare run
    ``prepare``."""

    def __init__(self, root: Path, ids: dict[str, str]) -> None:
        self.root = root
        self.__dict__.update(ids)

    a: str
    b: str
    c: str
    la: str
    lb: str
    noisy: str
    other: str
    prepare: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    from gssf_cli.stages import prepare, train

    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        tracker = Tracker()
        syn = PrepareConfig(
            dataset="synthetic", out=Path("data/syn"), train_images=48, dev_images=8, test_images=40,
            regions=3, region_dim=8, concepts=6, vocab_size=30,
        )  # fmt: skip
        prepared = prepare.run(syn, tracker)
        rng = np.random.default_rng(0)
        labels = np.arange(240) % 12
        feats = np.eye(12, 10)[labels] + 0.8 * rng.normal(size=(240, 10))
        np.savez(root / "feats.npz", features=feats.astype(np.float32), labels=labels)
        prepare.run(PrepareConfig(dataset="features", out=Path("data/feat"), source=root / "feats.npz"))
        noisy = PrepareConfig(dataset="imbalance", source=Path("data/syn"), out=Path("data/noisy"), caption_noise=0.5)
        prepare.run(noisy, tracker)
        prepare.run(dataclasses.replace(syn, out=Path("data/other"), seed=1), tracker)
        ids = {"prepare": str(prepared.run_id)}
        for name, data, seed in (
            ("a", "syn", 0),
            ("b", "syn", 1),
            ("c", "syn", 2),
            ("la", "feat", 0),
            ("lb", "feat", 1),
            ("noisy", "noisy", 0),
            ("other", "other", 0),
        ):
            config = tiny_train_config(Path("data") / data, epochs=1, seed=seed, threads=1)
            ids[name] = train.run(config, tracker).run_id  # type: ignore[arg-type]
        yield Runs(root, ids)


@pytest.fixture
def inside(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> Runs:
    monkeypatch.chdir(runs.root)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return runs


def _rows(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["metric"]: row for row in payload["rows"]}


def test_two_seeds_differences_cis_and_p_values(inside: Runs) -> None:
    """Two runs that differ only in seed: every metric has a difference, a 95% interval and a p-value, and most
    differences are not significant at 5%. The baseline's values are exactly what `gssf evaluate` reports."""
    out = _ok("compare", inside.a, inside.b, *FAST)
    rows = _rows(out)
    assert tuple(rows) == CROSS_MODAL_TESTED and set(out["not_tested"]) == {"i2t_medr", "t2i_medr"}
    assert out["units"] == 40 and out["unit"] == "image with its 5 captions" and out["split"] == "test"
    assert out["baseline"]["runs"][0]["run_id"] == inside.a and out["compared"][0]["runs"][0]["run_id"] == inside.b
    for row in rows.values():
        assert row["difference"] == pytest.approx(row["other"] - row["baseline"], abs=1e-9)
        assert row["ci_low"] <= row["ci_high"] and 0.0 < row["p_value"] <= 1.0
        assert row["verdict"] in ("n.s.", "better", "worse") and row["significant"] == (row["p_value"] < 0.05)
    assert sum(not row["significant"] for row in rows.values()) >= 0.7 * len(rows)
    assert out["settings"] == {
        "bootstrap": 2000, "permutations": 2000, "confidence": 0.95, "alpha": 0.05, "seed": 0, "ks": [1, 5, 10],
    }  # fmt: skip
    evaluated = _ok("evaluate", "--run", inside.a, "--no-plots")
    for metric, row in rows.items():
        assert row["baseline"] == pytest.approx(evaluated[metric], rel=1e-9), metric
    assert _ok("compare", inside.a, inside.b, *FAST)["rows"] == out["rows"]  # seeded: the same numbers again


def test_the_compare_run_holds_the_table_the_units_and_a_plot(inside: Runs) -> None:
    out = _ok("compare", inside.a, inside.b, "--bootstrap", "500", "--permutations", "500")
    client = Tracker().client
    run = client.get_run(out["run_id"])
    tags = run.data.tags
    assert tags["gssf.stage"] == "compare" and tags["gssf.compare.baseline"] == inside.a
    assert tags["gssf.compare.runs"] == f"{inside.a},{inside.b}" and tags["gssf.source_run"] == inside.a
    assert run.data.params["compare.bootstrap"] == "500" and run.data.params["compare.split"] == "test"
    key = out["compared"][0]["key"]
    assert key == inside.b[:8]
    rsum = _rows(out)["rsum"]
    assert run.data.metrics[f"diff_rsum_{key}"] == pytest.approx(rsum["difference"])
    assert run.data.metrics[f"p_rsum_{key}"] == pytest.approx(rsum["p_value"])
    assert run.data.metrics[f"ci_low_rsum_{key}"] == pytest.approx(rsum["ci_low"])
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"comparison.json", "comparison.md", "units.npz", "units.txt", "plots", "config"} <= artifacts
    assert {a.path for a in client.list_artifacts(out["run_id"], "plots")} == {
        "plots/comparison_forest.png", "plots/similarity_distributions.png",
    }  # fmt: skip
    folder = Path(client.download_artifacts(out["run_id"], "", str(inside.root / "downloaded")))
    assert json.loads((folder / "comparison.json").read_text())["rows"] == out["rows"]
    assert "| rsum |" in (folder / "comparison.md").read_text()
    with np.load(folder / "units.npz", allow_pickle=False) as units:
        assert tuple(units["metrics"]) == CROSS_MODAL_TESTED and units["unit_ids"].tolist() == list(range(40))
        assert units["system_0"].mean(axis=0)[0] == pytest.approx(rsum["baseline"])
        assert np.array_equal(units["system_1"], units[f"run_{inside.b}"])


def test_groups_of_seeds_are_averaged_per_query(inside: Runs) -> None:
    """A1,A2 is one configuration: its values are the mean of its runs'."""
    one = _rows(_ok("compare", inside.a, inside.b, *FAST))
    other = _rows(_ok("compare", inside.c, inside.b, *FAST))
    group = _ok("compare", f"{inside.a},{inside.c}", inside.b, *FAST)
    assert group["baseline"]["label"].endswith(" +1") and len(group["baseline"]["runs"]) == 2
    for metric, row in _rows(group).items():
        assert row["baseline"] == pytest.approx((one[metric]["baseline"] + other[metric]["baseline"]) / 2)


def test_the_score_distributions_take_each_arguments_first_run_whatever_the_task(inside: Runs) -> None:
    """c is the second run of the first group and the first of the second: its scores are sampled for the figure
    all the same; label-based runs draw theirs from same-label pairs."""
    client = Tracker().client
    for runs in ([f"{inside.a},{inside.c}", f"{inside.c},{inside.b}"], [inside.la, inside.lb]):
        out = _ok("compare", *runs, "--bootstrap", "200", "--permutations", "200")
        assert "plots/similarity_distributions.png" in {a.path for a in client.list_artifacts(out["run_id"], "plots")}


def test_several_runs_each_against_the_baseline(inside: Runs) -> None:
    out = _ok("compare", inside.a, inside.b, inside.c, *FAST)
    assert [system["runs"][0]["run_id"] for system in out["compared"]] == [inside.b, inside.c]
    assert len(out["rows"]) == 2 * len(CROSS_MODAL_TESTED)
    two = _ok("compare", inside.a, inside.b, *FAST)  # common random numbers: b's rows do not depend on c
    for mine, alone in zip(out["rows"][: len(CROSS_MODAL_TESTED)], two["rows"], strict=True):
        assert mine["p_value"] == pytest.approx(alone["p_value"]) and mine["ci_low"] == pytest.approx(alone["ci_low"])


def test_runs_trained_on_different_train_splits_compare_on_the_test_split_they_share(inside: Runs) -> None:
    """A run trained on an imbalanced copy of the data (noisy train captions, the same test split byte for byte)
    is measured on the very queries of the baseline's: the baseline's values are those it has against a run of
    its own dataset, and the noisy run's are what `gssf evaluate` reports for it."""
    out = _ok("compare", inside.a, inside.noisy, *FAST)
    same = _ok("compare", inside.a, inside.b, *FAST)
    rows = _rows(out)
    assert tuple(rows) == CROSS_MODAL_TESTED
    for metric, row in rows.items():
        assert row["baseline"] == pytest.approx(_rows(same)[metric]["baseline"], rel=1e-12), metric
    evaluated = _ok("evaluate", "--run", inside.noisy, "--no-plots")
    assert rows["rsum"]["other"] == pytest.approx(evaluated["rsum"], rel=1e-9)


def test_table_output(inside: Runs) -> None:
    result = _invoke("compare", inside.a, inside.b, *FAST)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for word in ("metric", "baseline", "difference", "95% CI", "p-value", "rsum", "t2i_meanr", "MLflow run"):
        assert word in text, word
    assert f"baseline: train-gssf-d4-{inside.a[:6]} ({inside.a})" in text
    assert f"train-gssf-d4-{inside.b[:6]} vs baseline train-gssf-d4-{inside.a[:6]}" in text


def test_names_label_the_groups_in_tables_and_json(inside: Runs) -> None:
    """``--name LABEL=RUNS`` labels the argument given as RUNS (spaces aside) everywhere the label shows: the JSON,
    its rows, the tables and the run's comparison.md; the others keep their run's name."""
    args = ["compare", f"{inside.a},{inside.c}", inside.b, inside.c, "--name", f"gssf seeds={inside.a}, {inside.c}",
            "--name", f"other | x={inside.b}", *FAST]  # fmt: skip
    out = _ok(*args)
    assert out["baseline"]["label"] == "gssf seeds"
    assert [system["label"] for system in out["compared"]] == ["other | x", f"train-gssf-d4-{inside.c[:6]}"]
    assert {row["compared"] for row in out["rows"]} == {"other | x", f"train-gssf-d4-{inside.c[:6]}"}
    markdown = Tracker().client.download_artifacts(out["run_id"], "comparison.md", str(inside.root / "named"))
    assert "| rsum | other \\| x |" in Path(markdown).read_text()
    text = _invoke(*args).stdout
    assert "other | x vs baseline gssf seeds" in text and f"baseline: gssf seeds ({inside.a}, {inside.c})" in text


def test_a_seeds_run_is_labelled_by_its_name() -> None:
    """A ``gssf train --seeds`` run stands for its finished train runs, and is labelled by its own name; a group
    says how many more arguments it names."""
    from types import SimpleNamespace

    from gssf_cli.stages.compare import _resolve

    def run(run_id: str, name: str, stage: str, status: str = "FINISHED") -> SimpleNamespace:
        info = SimpleNamespace(run_id=run_id, run_name=name, status=status)
        return SimpleNamespace(info=info, data=SimpleNamespace(tags={"gssf.stage": stage}))

    runs = {"s": run("s", "seeds-gssf-d4-aaaaaa", "seeds"), "t": run("t", "train-gssf-d4-bbbbbb", "train"),
            "u": run("u", "train-gssf-d4-cccccc", "train")}  # fmt: skip
    children = [run("s1", "train-1", "train"), run("s2", "train-2", "train"), run("s3", "x", "train", "FAILED")]
    tracker = SimpleNamespace(get_run=lambda ref, stage: runs[ref], child_runs=lambda run_id: children)
    groups, labels = _resolve(tracker, CompareConfig(runs=("s", "t,u", "s,t")))  # type: ignore[arg-type]
    assert [[r.info.run_id for r in group] for group in groups] == [["s1", "s2"], ["t", "u"], ["s1", "s2", "t"]]
    assert labels == ["seeds-gssf-d4-aaaaaa", "train-gssf-d4-bbbbbb +1", "seeds-gssf-d4-aaaaaa +1"]


def test_label_based_runs(inside: Runs) -> None:
    out = _ok("compare", inside.la, inside.lb, *FAST, "--full-map")
    rows = _rows(out)
    assert tuple(rows) == (*LABEL_TESTED[:3], *LABEL_TESTED[3:], "map") and out["protocol"] is None
    assert out["unit"] == "query" and out["not_tested"] == {}
    evaluated = _ok("evaluate", "--run", inside.la, "--no-plots", "--full-map")
    for metric, row in rows.items():
        assert row["baseline"] == pytest.approx(evaluated[metric], rel=1e-9), metric


def _store_state(root: Path) -> tuple[int, set[str]]:
    """How many runs the store holds, and every file under the working directory but the store itself."""
    client = Tracker().client
    experiments = [e.experiment_id for e in client.search_experiments()]
    count = len(client.search_runs(experiments, max_results=10_000))
    files = {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("mlflow.db")}
    return count, files


BAD: dict[str, tuple[list[str], str]] = {
    "one run": (["{a}"], "give at least two runs to compare, the baseline first (got 1)"),
    "a run against itself": (["{a}", "{a}"], "arguments 1 and 2 are both run {a}: a run compared with itself"),
    "a group against itself": (["{a},{c}", "{b}", "{c},{a}"], "arguments 1 and 3 are both the runs {c}, {a}"),
    "a repeated member": (["{a},{a}", "{b}"], "run {a} is given twice in argument 1: give each run once"),
    "bootstrap memory": (
        ["{a}", "{b}", "--bootstrap", "1000000000000"],
        "compare: 1,000,000,000,000 bootstrap resamples of 1 differences need 21.8 TiB of memory, but this machine has",
    ),
    "unknown run": (["{a}", "nope"], "unknown run 'nope'"),
    "not a train run": (["{a}", "{prepare}"], "is a prepare run, not a train run"),
    "different tasks": (["{a}", "{la}"], "were trained for different tasks (cross_modal vs labels)"),
    "another test split": (["{a}", "{other}"], "whose 'test' split differs from that of the first run's"),
    "missing split": (["{a}", "{b}", "--split", "nosuch"], "no 'nosuch' split to compare on (has train, dev, test)"),
    "protocol": (["{a}", "{b}", "--protocol", "f30k-1k"], "protocol f30k-1k needs 1,000 images, got 40"),
    "latest in a group": (["latest,{a}", "{b}"], "'latest' cannot be part of a group"),
    "empty member": (["{a},", "{b}"], "an empty run id"),
    "confidence": (["{a}", "{b}", "--confidence", "1.5"], "compare.confidence: must be between 0 and 1"),
    "bootstrap": (["{a}", "{b}", "--bootstrap", "0"], "compare.bootstrap: must be at least 1"),
    "name without =": (["{a}", "{b}", "--name", "gssf"], "--name 'gssf': give LABEL=RUNS"),
    "name without runs": (["{a}", "{b}", "--name", "gssf="], "--name 'gssf=': give LABEL=RUNS"),
    "name without label": (["{a}", "{b}", "--name", "={a}"], "the label must be one line of text"),
    "name of no argument": (["{a}", "{b}", "--name", "x={c}"], "{c} is not one of the runs to compare ({a} {b})"),
    "name given twice": (["{a}", "{b}", "--name", "x={a}", "--name", "y={a}"], "{a} is named twice ('x' and 'y')"),
    "label given twice": (["{a}", "{b}", "--name", "x={a}", "--name", "x={b}"], "the label 'x' is given to two"),
}


@pytest.mark.parametrize(
    ("case", "as_json"), [(case, index % 2 == 1) for index, case in enumerate(sorted(BAD))]
)  # each case once, half of them with --json
def test_bad_input_exits_2_and_leaves_nothing(inside: Runs, case: str, as_json: bool) -> None:
    template, expected = BAD[case]
    args = [arg.format(**inside.__dict__) for arg in template]
    expected = expected.format(**inside.__dict__)
    before = _store_state(inside.root)
    result = _invoke("compare", *args, *(["--json"] if as_json else []))
    assert result.exit_code == 2, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith("gssf: error: ") and expected in line and "Traceback" not in result.stderr, line
    if as_json:
        error = json.loads(result.stdout)
        assert error["kind"] == "input" and error["exit_code"] == 2 and expected in error["error"]
    else:
        assert result.stdout == ""
    assert _store_state(inside.root) == before


def test_missing_runs_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke("compare")
    assert result.exit_code == 2 and "missing argument 'RUN'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_shows_arguments_defaults_and_imports_nothing_heavy() -> None:
    result = _invoke("compare", "--help")
    assert result.exit_code == 0
    assert "Usage: gssf compare [OPTIONS] RUN..." in result.stdout
    assert not TYPER_TYPES.search(result.stdout), TYPER_TYPES.findall(result.stdout)
    rows = help_rows(result.stdout)
    for field in dataclasses.fields(CompareConfig):  # every setting a flag, with its default (runs: the arguments)
        if field.metadata.get("file_only"):
            continue
        name = field.name.replace("_", "-")
        decls = field.metadata.get("flag") or (f"--{name}/--no-{name}" if field.type == "bool" else f"--{name}")
        shown = shown_default(field.default, decls)
        row = rows[decls.split("/")[0]]
        assert (f"[default: {shown}]" in row) if shown is not None else ("[default" not in row), row
    assert rows["--bootstrap"].startswith("--bootstrap INTEGER ") and "[default: 10000]" in rows["--bootstrap"]
    assert "[default: 10000]" in rows["--permutations"] and "[default: 0.95]" in rows["--confidence"]
    assert "[default: 0]" in rows["--seed"] and "[default: test]" in rows["--split"]
    assert rows["--k"].startswith("--k INT,INT,... ") and "[default: all]" in rows["--protocol"]
    code = (
        "import sys\nfrom gssf_cli.cli.app import app\n"
        "try:\n    app(['compare', '--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "COLUMNS": "120"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:"
