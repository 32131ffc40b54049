"""The steps of a pipeline: their order, each stage's config from its table and the links, the final model's
budget, and the up-front check."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import EvaluateConfig, ExportConfig, PipelineConfig, PrepareConfig, TuneConfig
from gssf_cli.stages import steps

ALL = ("prepare", "train", "evaluate", "tune", "export")


def _pipeline(stages: tuple[str, ...] = ALL, retrain: bool = False, **tables: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig(Path("p.toml"), "p", stages, tables, retrain=retrain)


def test_the_order_of_the_steps() -> None:
    assert steps.plan(_pipeline()) == ALL
    assert steps.plan(_pipeline(retrain=True)) == (
        "prepare", "train", "evaluate_baseline", "tune", "train_best", "evaluate", "compare", "export",
    )  # fmt: skip
    assert steps.plan(_pipeline(("prepare", "tune", "export"), retrain=True)) == (
        "prepare", "tune", "train_best", "export",
    )  # fmt: skip
    assert steps.plan(_pipeline(("prepare", "train", "evaluate"), retrain=True)) == ("prepare", "train", "evaluate")
    assert steps.model_step(_pipeline(retrain=True)) == "train_best"
    assert steps.model_step(_pipeline(("train", "evaluate"), retrain=True)) == "train"


def test_each_stage_config_takes_the_links() -> None:
    pipeline = _pipeline(
        prepare={"dataset": "digits", "out": "data/d"}, train={"epochs": 2}, evaluate={"plots": False}, export={}
    )
    links = steps.Links(steps.prepared(pipeline), train_run="r1")
    assert links.data == Path("data/d")
    prepare = steps.stage_config(pipeline, "prepare", links)
    assert isinstance(prepare, PrepareConfig) and prepare.force, "a pipeline replaces what it prepared"
    train = steps.stage_config(pipeline, "train", links)
    assert train.data == Path("data/d") and train.epochs == 2
    evaluate = steps.stage_config(pipeline, "evaluate", links)
    assert isinstance(evaluate, EvaluateConfig) and evaluate.run == "r1" and evaluate.plots is False
    export = steps.stage_config(pipeline, "export", links)
    assert isinstance(export, ExportConfig) and export.run == "r1" and export.force
    with pytest.raises(UserInputError, match=r"train\.epochs: must be at least 1"):
        steps.stage_config(_pipeline(train={"epochs": 0}), "train", links)


def test_the_final_model_keeps_the_train_budget_unless_it_was_tuned() -> None:
    pipeline = _pipeline(train={"data": "x", "epochs": 8, "warmup_epochs": 2})
    links = steps.Links(Path("data/d"))
    best = {"lr": 0.2, "epochs": 2, "warmup_epochs": 0, "block_size": 8}
    final = steps.final_values(pipeline, TuneConfig(params=("lr=0.1,0.2", "block_size=4,8")), best, links)
    assert final == {
        "lr": 0.2,
        "block_size": 8,
        "epochs": 8,
        "warmup_epochs": 2,
        "lr_decay_epoch": None,
        "data": links.data,
    }
    tuned = steps.final_values(pipeline, TuneConfig(params=("warmup-epochs=0,1",)), best, links)
    assert tuned["warmup_epochs"] == 0 and tuned["epochs"] == 8
    shorter = PipelineConfig(Path("p.toml"), "p", ALL, pipeline.tables, retrain=True, retrain_epochs=3)
    assert steps.final_values(shorter, TuneConfig(params=("lr=0.1",)), best, links)["epochs"] == 3
    assert steps.base_train(pipeline) == {"epochs": 8, "warmup_epochs": 2}, "tune's dataset comes from the link"


def test_links_name_datasets_and_models_by_content(tmp_path: Path) -> None:
    assert steps.dataset_digest(None) is None and steps.dataset_digest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{}")
    assert steps.dataset_digest(tmp_path) == hashlib.sha256(b"{}").hexdigest()
    links = steps.after_prepare(steps.Links(None), tmp_path, {"run_id": "p1"})
    assert links.data == tmp_path and links.prepare_run == "p1"
    first = steps.after_train(links, "t1", {"outputs": {"best/model.safetensors": "aa", "best/meta.json": "bb"}})
    same = steps.after_train(links, "t2", {"outputs": {"best/meta.json": "bb", "elsewhere/model.safetensors": "aa"}})
    other = steps.after_train(links, "t1", {"outputs": {"best/model.safetensors": "ab", "best/meta.json": "bb"}})
    assert first.train_run == "t1" and first.model is not None
    assert first.model == same.model != other.model, "the model is its files' hashes, wherever they are"
    assert steps.after_train(links, None, None) == steps.Links(tmp_path, "latest", "p1", None)
    assert steps.after_tune(first, "best.toml").best_config == "best.toml"


def test_check_refuses_an_output_below_a_file_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    steps.check(_pipeline(("prepare",), prepare={"dataset": "digits", "out": str(tmp_path / "new" / "d")}))
    pipeline = _pipeline(("prepare",), prepare={"dataset": "digits", "out": str(tmp_path / "afile" / "d")})
    with pytest.raises(UserInputError, match=r"afile is a file, not a folder; choose another \[prepare\] out"):
        steps.check(pipeline)
    with pytest.raises(UserInputError, match=r"prepare\.dataset: 'images' is not one of"):
        steps.check(_pipeline(("prepare",), prepare={"dataset": "images", "out": "d"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "the check creates nothing"


def test_the_verdict_reads_as_one_compare_row() -> None:
    test = {"metric": "rsum", "difference": 2.666, "ci_low": -3.6, "ci_high": 8.93, "p_value": 0.4437,
            "verdict": "no significant difference"}  # fmt: skip
    assert steps.verdict_line(test) == "rsum +2.67 [-3.60, +8.93], p = 0.4437: no significant difference"
    fraction = {"metric": "map_at_r", "difference": -0.0123, "ci_low": -0.02, "ci_high": -0.004, "p_value": 1e-6,
                "verdict": "significantly worse"}  # fmt: skip
    assert steps.verdict_line(fraction) == "map_at_r -0.0123 [-0.0200, -0.0040], p < 0.0001: significantly worse"
