"""The GPU check: a few hundred training steps at the host frameworks' scale on CUDA, with and without AMP, then
evaluation and export of the CUDA-trained run on the CPU.

D = 1024, 36 regions x 2048 features, batch 128, GSSF head (blocks of 64), ~300 steps per precision. Reports
training samples/s (best epoch; the first pays for cuDNN/cuBLAS warm-up) and peak GPU memory for float32 and
``--amp``, then evaluates and exports (ONNX Runtime parity gate on the CPU) the AMP run with ``CUDA_VISIBLE_DEVICES``
hidden, as a CPU-only machine would. On a machine without CUDA it says so and exits 0 (``nox -s bench`` runs it
everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report


def _gssf(cwd: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    command = [str(Path(sys.executable).with_name("gssf")), *args, "--json"]
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed: {done.stderr.strip()[-2000:]}")
    return dict(json.loads(done.stdout))


def _train(cwd: Path, args: argparse.Namespace, amp: bool) -> dict[str, Any]:
    flags = ["--amp"] if amp else []
    return _gssf(cwd, "train", "--data", "data/big", "--metric", "gssf", "--block-size", "64", "--embed-dim",
                   str(args.dim), "--batch-size", str(args.batch), "--epochs", str(args.epochs), "--device", "cuda",
                   *flags)  # fmt: skip


def _peak_gpu_mib(cwd: Path, run_id: str) -> float:
    """Peak GPU memory of a training step of the run's config, measured in this process (the CLI's own process
    is gone by now)."""
    import torch

    from gssf_cli.core.config import from_dict
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.training.loop import Trainer

    saved = json.loads((cwd / "runs" / run_id / "config.json").read_text())["config"]
    os.chdir(cwd)
    trainer = Trainer(from_dict(TrainConfig, {**saved, "epochs": 1}, "train"), Dataset(Path(saved["data"])))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    split = trainer.dataset.split("train")
    batches = split.pair_batches(trainer.config.batch_size, torch.Generator().manual_seed(0))[:5]
    for pairs in batches:
        batch = split.training_batch(pairs, torch.Generator())
        parts = trainer.step(
            batch.images.cuda(), batch.texts.cuda(), None if batch.lengths is None else batch.lengths.cuda(),
            batch.ids.cuda(), True,
        )  # fmt: skip
        trainer.scaler.scale(parts["loss"]).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="train images (5 captions each)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    args, _ = parser.parse_known_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (run it on a GPU machine)")
        return
    with tempfile.TemporaryDirectory(prefix="gssf-bench-gpu-") as tmp:
        cwd = Path(tmp)
        _gssf(cwd, "prepare", "--dataset", "synthetic", "--out", "data/big", "--train-images", str(args.images),
              "--dev-images", "500", "--test-images", "500", "--regions", "36", "--region-dim", "2048")  # fmt: skip
        rows = []
        runs = {}
        for amp in (False, True):
            result = _train(cwd, args, amp)
            runs[amp] = str(result["run_id"])
            rows.append({
                "precision": "amp (" + ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") + ")"
                if amp else "float32",
                "samples/s": round(float(result["metrics"]["samples_per_s"]), 1),
                "val rsum": round(float(result["metrics"]["val_rsum"]), 2),
                "peak GPU MiB": round(_peak_gpu_mib(cwd, runs[amp]), 1),
            })  # fmt: skip
        for row in rows:
            row["vs float32"] = round(row["samples/s"] / rows[0]["samples/s"], 2)
        cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
        evaluated = _gssf(cwd, "evaluate", "--run", runs[True], env=cpu_only)
        exported = _gssf(cwd, "export", "--onnx", "--run", runs[True], env=cpu_only)
        notes = [
            f"{torch.cuda.get_device_name()}; D = {args.dim}, 36 x 2048 regions, batch {args.batch}, "
            f"{args.images * 5 // args.batch * args.epochs} steps per precision.",
            f"the AMP run on the CPU only: evaluate rsum {evaluated['rsum']:.2f}, export gate passed: "
            f"{exported['passed']}",
        ]
        report("gpu", rows, notes)


if __name__ == "__main__":
    main()
