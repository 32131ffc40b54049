"""80 columns everywhere: every command's help and every result table fit the terminal's width (80 and 120 columns
here) without cutting anything a user types or copies: option names, choices, run ids and labels stay whole,
nothing is cut with ``…``, help paragraphs fill the width, and required parameters say ``[required]``.

Help is rendered in-process through the real ``gssf`` group; tables by calling the ``tables.print_*`` functions
on representative results, so nothing here trains, tracks or imports torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable
from typing import Any

import pytest
import typer.main
from rich.cells import cell_len
from typer.testing import CliRunner

from gssf_cli.cli import tables
from gssf_cli.cli.app import app
from gssf_cli.core.stage_configs import (
    CompareConfig,
    EvaluateConfig,
    ExportConfig,
    IndexConfig,
    PrepareConfig,
    SearchConfig,
    TrainConfig,
    TuneConfig,
)
from tests.unit.cli.test_options import help_rows

WIDTHS = (80, 120)
GROUP = typer.main.get_command(app)
assert isinstance(GROUP, typer.core.TyperGroup)
COMMANDS: list[tuple[str, ...]] = [(), *((name,) for name in GROUP.commands)]
CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "tune": TuneConfig,
    "export": ExportConfig, "compare": CompareConfig, "index": IndexConfig, "search": SearchConfig,
}  # fmt: skip


def _help(command: tuple[str, ...], width: int) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(width), "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.stdout


def _params(command: tuple[str, ...]) -> list[Any]:
    return list((GROUP.commands[command[0]] if command else GROUP).params)


def _choices(param: Any) -> list[str]:
    """A parameter's choices: an Enum's or Literal's as Typer types them, or those its metavar lists (``[a|b|c]``,
    a config's Literal given as text so that the config's own check reports a bad one)."""
    if param.type_descriptor.is_choice:
        return [str(choice) for choice in param.type_descriptor.choices or ()]
    metavar = param.metavar or ""
    return metavar[1:-1].split("|") if metavar.startswith("[") and "|" in metavar else []


def _required(command: tuple[str, ...]) -> list[str]:
    """The first name of every parameter the command cannot run without: required by click, or a config field
    without a default (its flag may be left out only when the ``--config`` file gives it)."""
    required = [param.opts[0] if param.param_type_name == "option" else param.metavar for param in _params(command)
                if param.required]  # fmt: skip
    cls = CONFIGS.get(command[0]) if command else None
    for field in dataclasses.fields(cls) if cls else ():
        if field.default is dataclasses.MISSING and not field.metadata.get("file_only"):
            required.append((field.metadata.get("flag") or f"--{field.name.replace('_', '-')}").split("/")[0])
    return required


def _too_long(text: str, width: int) -> list[str]:
    return [line for line in text.splitlines() if cell_len(line) > width]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "gssf")
def test_help_fits_and_cuts_nothing(command: tuple[str, ...], width: int) -> None:
    text = _help(command, width)
    assert not _too_long(text, width)
    assert "…" not in text
    lines = text.splitlines()
    for param in _params(command):
        for name in (*param.opts, *param.secondary_opts):
            whole = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
            assert any(whole.search(line) for line in lines), f"{name} is not whole on any line"
        for choice in _choices(param):
            whole = re.compile(rf"[\[|]{re.escape(choice)}[|\]]")
            assert any(whole.search(line) for line in lines), f"{param.opts[0]}: choice {choice} is split"
    prose = text.split("╭")[0].splitlines()[3:]  # the command's own help, below the usage line
    for line, following in itertools.pairwise(prose):  # reflowed: no line ends where the next word would fit
        words = following.split()
        assert not (line.strip() and words and cell_len(line.rstrip()) + 1 + cell_len(words[0]) <= width - 1), line
    rows = help_rows(text)
    for name in _required(command):
        row = rows.get(name) or rows.get(f"{name}...", "")  # an argument that takes several: RUN...
        assert "[required]" in row, (name, row)


# ---------------------------------------------------------------------------------------------------------
# Tables

RUN = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
THIRD = "00112233445566778899aabbccddeeff"
BASELINE_LABEL = "train-gssf-d4-0a1b2c +1"
LABEL = "seeds-bdiag-d16-3d4e5f"


def _prepare() -> dict[str, Any]:
    counts = {"images": 29000, "texts": 145000, "regions": 36, "feature_dim": 2048}
    return {"name": "flickr30k-precomp", "kind": "precomp", "task": "cross_modal",
            "splits": {"train": counts, "dev": counts, "test": counts}, "path": "data/flickr30k-precomp",
            "seconds": 12.3, "bytes": 2**33, "manifest_sha256": "ab" * 32, "run_id": RUN}  # fmt: skip


def _evaluation(task: str) -> dict[str, Any]:
    if task == "labels":
        return {"task": "labels", "sizes": {"queries": 5924, "gallery": 5924}, "map_at_r": 0.1234,
                "precision_at_1": 0.5, "r_precision": 0.25, "r_at_1": 0.5, "run_id": RUN}  # fmt: skip
    result = {"task": "cross_modal", "protocol": "coco-1k", "sizes": {"images": 5000, "texts": 25000},
              "rsum": 512.34, "i2t_map": 55.5, "run_id": RUN, "folds": [{"rsum": 510.0}, {"rsum": 514.0}],
              "dataset_info": {"name": "coco-precomp", "split": "test", "manifest_sha256": "cd" * 32},
              "model_info": {"source": "train_run", "metric_head": "gssf", "block_size": 64, "embed_dim": 1024,
                             "train_run_id": OTHER, "best_epoch": 17}}  # fmt: skip
    for direction in ("i2t", "t2i"):
        result |= {f"{direction}_r{k}": 88.88 for k in (1, 5, 10)}
        result |= {f"{direction}_medr": 1.0, f"{direction}_meanr": 3.4}
    return result


def _training() -> dict[str, Any]:
    return {"best_epoch": 17, "validation_metric": "rsum", "metrics": {"loss": 0.1234, "val_rsum": 412.5},
            "parameters": {"metric_head": 65536, "total": 12345678}, "epochs_run": 20, "seconds": 1234.5,
            "out_dir": f"runs/{RUN}", "run_id": RUN, "model_id": f"m-{OTHER}"}  # fmt: skip


def _seeds(count: int = 10) -> dict[str, Any]:
    runs = [{"run_id": RUN, "best_epoch": 3, "out_dir": f"runs/{RUN}", "metrics": {"val_rsum": 412.5, "loss": 0.12}}
            for _ in range(count)]  # fmt: skip
    summary = {"val_rsum": {"mean": 412.5, "std": 1.25, "n": count}, "loss": {"mean": 0.12, "std": 0.01, "n": count}}
    return {"run_id": OTHER, "seeds": list(range(count)), "validation_metric": "rsum", "summary": summary,
            "runs": runs}  # fmt: skip


def _tune() -> dict[str, Any]:
    trials = [
        {"trial_id": f"a1b2c_0000{i}", "status": status, "values": {"block_size": 8 * (i + 1), "lr": 0.003, "seed": i},
         "metric": None if status == "FAILED" else 312.4, "epochs": 3, "head_params": 1024, "seconds": 12.3,
         "run_id": THIRD, "error": "RuntimeError: CUDA out of memory while allocating" if status == "FAILED" else None}
        for i, status in enumerate(("FINISHED", "TERMINATED", "FAILED", "KILLED"))
    ]  # fmt: skip
    return {"metric": "rsum", "mode": "max", "scheduler": "asha", "tuned": ["block_size", "lr", "seed"],
            "trials": trials, "best": {"trial_id": "a1b2c_00000", "values": {"block_size": 8}, "metric": 312.4},
            "configurations": [{"values": {"block_size": 8, "lr": 0.003}, "metric": {"mean": 312.4, "std": 1.2, "n": 2}}],
            "best_config": "tune/best.toml", "seconds": 100.0, "trial_seconds": 80.0, "storage": "ray_results",
            "run_id": RUN}  # fmt: skip


def _export() -> dict[str, Any]:
    graph = {"checks": [{"batch": 1, "length": 5}, {"batch": 8, "length": 37}], "max_abs_diff": 1e-6,
             "max_rel_diff": 1e-5, "passed": True}  # fmt: skip
    metrics = {"rsum": 500.1, "i2t_r1": 70.1, "t2i_r1": 55.2, "i2t_map": 40.0}
    retrieval = {"queries": 5000, "metrics_torch": metrics, "metrics_onnx": metrics, "top10_identical": 0.99,
                 "top10_equal_up_to_ties": 1.0, "passed": True}  # fmt: skip
    return {"passed": True, "path": f"exports/{RUN}", "seconds": 12.3, "export_run_id": RUN,
            "parity": {"graphs": {"image_encoder": graph, "text_encoder": graph}, "retrieval": retrieval}}  # fmt: skip


def _index() -> dict[str, Any]:
    return {"kind": "hnsw", "count": 123456, "dim": 1024, "path": "indexes/flickr-hnsw", "run_id": RUN,
            "build": {"build_seconds": 1.23, "embed_seconds": 4.56, "vectors_per_second": 12345.0},
            "files": {"index.faiss": {"bytes": 123456789}},
            "eval": {"recall_at_10": 0.9876, "queries_per_second": 12345.0, "latency_ms_p50": 0.123},
            "spec": {"build": {"hnsw_m": 32}, "search": {"ef_search": 128}},
            "bundle": {"digest": "ef" * 32, "source_run_id": OTHER}}  # fmt: skip


def _pipeline() -> dict[str, Any]:
    why = f"its input changed ({OTHER})"
    stages = [{"stage": stage, "status": "ran", "run_id": RUN, "seconds": 12.3, "why": why, "summary": {"rsum": 412.5}}
              for stage in ("prepare", "train", "evaluate", "compare")]  # fmt: skip
    return {"name": "quickstart", "dry_run": False, "parent_run_id": THIRD, "stages": stages, "seconds": 99.0,
            "metrics": {"final_rsum": 412.5, "baseline_rsum": 400.0}, "tuned": TUNED, "verdict": VERDICT}  # fmt: skip


TUNED = {"values": {"block_size": 16}, "metric": "rsum", "on": "dev", "value": 175.6,
         "trials": [{"values": {"block_size": d}, "metric": m} for d, m in ((16, 175.6), (8, 173.3), (4, None))]}  # fmt: skip
VERDICT = {"metric": "rsum", "difference": -0.67, "units": 150, "unit": "image with its 5 captions",
           "line": "rsum -0.67 [-8.00, +6.40], p = 0.8858: no significant difference"}  # fmt: skip


def _comparison(task: str, compared: int = 2) -> dict[str, Any]:
    """A baseline group of two runs against ``compared`` systems (the first a seeds run's group)."""
    labels = ("map_at_r", "precision_at_1", "r_precision") if task == "labels" else ("rsum", "i2t_r1", "t2i_meanr")
    fraction = task == "labels"

    def system(label: str, ids: list[str]) -> dict[str, Any]:
        spread = {metric: {"mean": 1.0, "std": 0.5, "n": len(ids)} for metric in labels} if len(ids) > 1 else {}
        return {"label": label, "key": ids[0][:8], "runs": [{"run_id": i, "run_name": label} for i in ids],
                "spread": spread}  # fmt: skip

    systems = [system(LABEL, [OTHER, THIRD]), system("bdiag d16, lr 0.01", [THIRD])][:compared]
    rows = [{"metric": metric, "compared": other["label"], "baseline": 0.4321 if fraction else 412.34,
             "other": 0.4567 if fraction else 415.67, "difference": 0.0246 if fraction else 3.33,
             "ci_low": -0.0123 if fraction else -12.34, "ci_high": 0.0456 if fraction else 14.56,
             "p_value": 0.00001, "verdict": "better"} for other in systems for metric in labels]  # fmt: skip
    return {"task": task, "split": "test", "protocol": None if fraction else "coco-1k",
            "dataset": {"name": "coco-precomp", "folder": "data/coco", "manifest_sha256": "ab" * 32, "split": "test"},
            "unit": "query" if fraction else "image with its 5 captions", "units": 5000,
            "baseline": system(BASELINE_LABEL, [RUN, OTHER]), "compared": systems, "rows": rows,
            "settings": {"bootstrap": 10000, "permutations": 10000, "confidence": 0.95, "seed": 0},
            "not_tested": {} if fraction else {"i2t_medr": "a median"}, "run_id": THIRD}  # fmt: skip


TABLES: dict[str, Callable[[], None]] = {
    "prepare": lambda: tables.print_prepare(_prepare(), False),
    "evaluate cross-modal": lambda: tables.print_evaluation(_evaluation("cross_modal"), False),
    "evaluate labels": lambda: tables.print_evaluation(_evaluation("labels"), False),
    "train": lambda: tables.print_training(_training(), False),
    "train --seeds": lambda: tables.print_seeds(_seeds(), False),
    "tune": lambda: tables.print_tune(_tune(), False),
    "export": lambda: tables.print_export(_export(), False),
    "index": lambda: tables.print_index(_index(), False),
    "run": lambda: tables.print_pipeline(_pipeline(), False),
    "compare cross-modal": lambda: tables.print_comparison(_comparison("cross_modal", compared=1), False),
    "compare labels": lambda: tables.print_comparison(_comparison("labels", compared=1), False),
    "compare several": lambda: tables.print_comparison(_comparison("cross_modal"), False),
}
WHOLE = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("table", list(TABLES))
def test_tables_fit_and_keep_ids_and_labels_whole(
    table: str, width: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setenv("NO_COLOR", "1")
    TABLES[table]()
    text = capsys.readouterr().out
    assert "…" not in text
    assert not _too_long(text, width)
    ids = {match for line in text.splitlines() for match in WHOLE.findall(line)}
    assert {RUN, OTHER, THIRD} & set(re.findall(r"[0-9a-f]{32}", text.replace("\n", ""))) <= ids, "an id is split"
    if table == "tune":
        assert THIRD in ids and all(f"a1b2c_0000{i}" in text for i in range(4))
    if table.startswith("compare"):
        assert BASELINE_LABEL in text and LABEL in text
        assert all(f" {header} " in text for header in ("metric", "baseline", "compared", "p-value"))
    if table == "compare several":
        assert "bdiag d16, lr 0.01" in text
