"""The stage configs' own rules: what each ``validate()`` refuses across settings, and the pipeline file reader
(the generic key, type and range checks: test_config.py and test_limits.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import (
    CompareConfig,
    EvaluateConfig,
    ExportConfig,
    IndexConfig,
    PrepareConfig,
    SearchConfig,
    TrainConfig,
    TuneConfig,
    load_pipeline,
)


def _refused(config: Any, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        config.validate()


def test_prepare() -> None:
    PrepareConfig(dataset="synthetic", out=Path("d")).validate()
    _refused(
        PrepareConfig(dataset="digits", out=Path("d"), dev_fraction=0.5, test_fraction=0.5),
        "must leave data for training",
    )
    for kind in ("precomp", "features"):
        _refused(PrepareConfig(dataset=kind, out=Path("d")), f"--source is required for --dataset {kind}")
    PrepareConfig(dataset="features", out=Path("d"), source=Path("s.npz")).validate()


def test_evaluate(tmp_path: Path) -> None:
    EvaluateConfig(run="latest").validate()
    EvaluateConfig(embeddings=Path("e.npz"), head="latest").validate()
    one_of = "give exactly one of --embeddings FILE.npz or --run RUN"
    _refused(EvaluateConfig(), one_of)
    _refused(EvaluateConfig(run="latest", embeddings=Path("e.npz")), one_of)
    _refused(EvaluateConfig(embeddings=Path("e.npz"), data=Path("d")), "--data applies to --run only")
    _refused(EvaluateConfig(run="latest", head="latest"), "--head RUN scores an --embeddings file")
    _refused(EvaluateConfig(run="latest", ks=(1, 0)), r"evaluate\.ks: cut-offs must be positive integers, got \[1, 0\]")
    _refused(EvaluateConfig(run="latest", ks=()), "cut-offs must be positive")


def test_evaluate_output_is_checked_and_nothing_is_created(tmp_path: Path) -> None:
    EvaluateConfig(run="latest", output=tmp_path / "r.json").validate()
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "afile").write_text("x")
    for output, message in [
        (tmp_path / "r.txt", r"the results file must be named \*\.json"),
        (tmp_path / "folder.json", "is a folder; name a file in it"),
        (tmp_path / "missing" / "r.json", "does not exist; create it first"),
        (tmp_path / "afile" / "r.json", "is a file, not a folder"),
    ]:
        _refused(EvaluateConfig(run="latest", output=output), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.json"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_evaluate_output_in_a_read_only_folder(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        _refused(EvaluateConfig(run="latest", output=tmp_path / "r.json"), "is not writable; choose another --output")
    finally:
        tmp_path.chmod(0o755)


def test_train() -> None:
    TrainConfig(data=Path("d")).validate()
    _refused(TrainConfig(data=Path("d"), embed_dim=32, block_size=5), "block size 5 does not divide")
    TrainConfig(data=Path("d"), metric="cosine", embed_dim=32, block_size=5).validate()  # no blocks: not checked
    frozen = "--encoder frozen and --encoder-run RUN go together"
    _refused(TrainConfig(data=Path("d"), encoder="frozen"), frozen)
    _refused(TrainConfig(data=Path("d"), encoder_run="abc"), frozen)
    TrainConfig(data=Path("d"), encoder="frozen", encoder_run="abc", adapter=True).validate()
    _refused(TrainConfig(data=Path("d"), adapter=True), "--adapter applies to head-only training")
    _refused(TrainConfig(data=Path("d"), lr_decay_epoch=3), "--lr-decay-epoch applies to --lr-schedule step")
    TrainConfig(data=Path("d"), lr_decay_epoch=3, lr_schedule="step").validate()


def test_train_derived_settings() -> None:
    config = TrainConfig(data=Path("d"))
    assert not config.on_ray() and config.worker_threads() == 1 and config.head_rate() == 1.0
    assert TrainConfig(data=Path("d"), workers=2, threads=3).on_ray()
    assert TrainConfig(data=Path("d"), workers=2, threads=3).worker_threads() == 3
    assert TrainConfig(data=Path("d"), address="ray://h:10001").on_ray()
    assert TrainConfig(data=Path("d"), encoder="identity").head_rate() == 100.0
    assert config.model_label() == "gssf-d64" and TrainConfig(data=Path("d"), metric="cosine").model_label() == "cosine"


def test_export_tune_compare() -> None:
    ExportConfig(register="syn-retrieval").validate()
    _refused(ExportConfig(register="a/b"), r"export\.register: 'a/b' is not a valid registered model name")
    TuneConfig(params=("lr=0.1,0.2",)).validate()
    _refused(TuneConfig(params=()), "give at least one --param NAME")
    _refused(TuneConfig(params=("lr",), storage="  "), r"tune\.storage: must name a folder or a URI")
    compare = CompareConfig(runs=("a", "b1, b2"))
    compare.validate()
    assert compare.groups() == [("a",), ("b1", "b2")]
    _refused(CompareConfig(), r"give at least two runs to compare, the baseline first \(got none\)")
    _refused(CompareConfig(runs=("a",)), r"\(got 1\)")
    _refused(CompareConfig(runs=("a", "b,")), "an empty run id")
    _refused(CompareConfig(runs=("a", "latest,b")), "'latest' cannot be part of a group")
    _refused(CompareConfig(runs=("a", "b"), ks=(0,)), r"compare\.ks: cut-offs must be positive")


def test_index_and_search() -> None:
    IndexConfig(bundle=Path("b"), gallery=Path("g.npy")).validate()
    _refused(IndexConfig(gallery=Path("g.npy")), "give the bundle to embed with")
    _refused(IndexConfig(bundle=Path("b")), "give the gallery to index")
    _refused(
        IndexConfig(bundle=Path("b"), gallery=Path("g.npy"), eval_queries=Path("q.txt")), "--eval-queries needs --eval"
    )
    SearchConfig(index=Path("i"), text="a dog").validate()
    SearchConfig(index=Path("i"), vectors=Path("v.npy"), embedded=True).validate()
    _refused(SearchConfig(text="a dog"), "give the index to search")
    _refused(SearchConfig(index=Path("i")), r"give exactly one of --text, --texts, --vectors$")
    _refused(SearchConfig(index=Path("i"), text="a", texts=Path("t")), r"\(got --text, --texts\)")
    _refused(SearchConfig(index=Path("i"), text="  "), "--text: an empty query")
    _refused(SearchConfig(index=Path("i"), text="a", embedded=True), "--embedded applies to --vectors only")


def test_load_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[export]\n[train]\ndata = "d"\n[tune]\nparams = ["lr=0.1,0.2"]\nretrain = true\nretrain_epochs = 3\n'
        '[prepare]\ndataset = "digits"\nout = "d"\n'
    )
    pipeline = load_pipeline(path)
    assert pipeline.name == "p" and pipeline.stages == ("prepare", "train", "tune", "export"), "the fixed order"
    assert pipeline.retrain and pipeline.retrain_epochs == 3
    assert pipeline.table("tune") == {"params": ["lr=0.1,0.2"]}, "retrain settings are the pipeline's, not tune's"
    assert pipeline.table("evaluate") == {} and pipeline.text == path.read_text()
    path.write_text('[pipeline]\nname = "x"\nstages = ["train"]\n[prepare]\ndataset = "digits"\nout = "d"\n')
    assert load_pipeline(path).stages == ("train",) and load_pipeline(path).name == "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[deploy]\n", r"unknown stage \[deploy\]"),
        ('[pipeline]\nowner = "me"\n', "pipeline.owner: unknown key"),
        ("pipeline = 3\n", r"\[pipeline\] must be a table"),
        ("train = 3\n", r"\[train\] must be a table of settings"),
        ('[pipeline]\nstages = ["train", "deploy"]\n', "pipeline.stages must list stages among"),
        ('[pipeline]\nstages = ["tune"]\n', r"pipeline.stages lists tune but there is no \[tune\] table"),
        ("[tune]\nretrain_epochs = 0\n", r"tune\.retrain_epochs: must be at least 1"),
        ("[train]\n[index]\n", r"\[index\] indexes the bundle that \[export\] writes: add an \[export\] table"),
        ('[export]\n[index]\nbundle = "x"\n', r"index\.bundle: set by the pipeline"),
    ],
)
def test_load_pipeline_refuses(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(UserInputError, match=message):
        load_pipeline(tmp_path / "p.toml")


def test_a_missing_pipeline_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"pipeline file .*nope\.toml not found \(see pipelines/ for examples\)"):
        load_pipeline(tmp_path / "nope.toml")
