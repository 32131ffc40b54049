"""A run trained on a GPU is evaluated, exported and resumed on a machine without one.

No GPU here: the run is trained on the CPU and then made to look as a CUDA run's folder does — ``device =
"cuda"`` in every config it records, and CUDA random states next to the CPU one in its checkpoint (safetensors
stores every tensor on the CPU whatever device it came from, so the weights themselves are the same). Nothing
downstream may read the recorded device: evaluation and export run where they are started, and resuming takes
``--device cpu`` (where a run trains is not what it learns; see ``gssf_cli.training.loop.PLACEMENT``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import Result

from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.tracking.adapter import Tracker
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]
TRAIN = ["train", "--data", "data/syn", "--epochs", "2", "--embed-dim", "16", "--block-size", "4", "--word-dim", "8",
         "--batch-size", "16", "--device", "cpu", "--json"]  # fmt: skip


def _as_if_trained_on_cuda(run: Path) -> None:
    for path in [run / ckpt.RUN_CONFIG, *(run / name / ckpt.STATE for name in (ckpt.BEST, ckpt.LAST))]:
        saved = json.loads(path.read_text())
        saved["config"]["device"] = "cuda"
        path.write_text(json.dumps(saved))
    rng = run / ckpt.LAST / ckpt.RNG
    states = load_file(str(rng))
    save_file({**states, "torch_cuda_0": torch.zeros(16, dtype=torch.uint8)}, str(rng))


def test_a_cuda_run_evaluates_exports_and_resumes_on_a_cpu(gssf: Gssf, workdir: Path) -> None:
    assert not torch.cuda.is_available()
    assert gssf(*tiny_synthetic_args()).exit_code == 0
    trained = gssf(*TRAIN)
    assert trained.exit_code == 0, trained.stderr
    run_id = json.loads(trained.stdout)["run_id"]
    _as_if_trained_on_cuda(workdir / "runs" / run_id)

    evaluated = gssf("evaluate", "--run", run_id, "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    exported = gssf("export", "--onnx", "--run", run_id, "--json")
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["passed"] is True

    Tracker().client.set_terminated(run_id, status="KILLED")  # as a run interrupted on the GPU machine
    refused = gssf("train", "--resume", run_id)
    assert refused.exit_code == 2
    assert "--device cuda: no CUDA device is available here" in refused.stderr
    resumed = gssf("train", "--resume", run_id, "--device", "cpu", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs_run"] == 0
