"""ONNX export: ONNX Runtime against torch eager per graph, export time, and the quickstart's wall time.

Models are built at the host frameworks' scale (D = 1024, regions 36 x 2048, captions of 12 tokens over a
10k vocabulary, gssf head with d = 64; ``--quick``: D = 256) with random weights — latency does not depend
on training. Each graph is timed at batch 1 and 128, torch and ORT interleaved in one run (median of
repeats); ratio = ORT / torch (target <= 0.8). The quickstart pipeline runs in a fresh temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-quickstart", action="store_true")
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    from gssf_cli.deploy.onnx_export import MetricHead, export_graph
    from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
    from gssf_cli.modeling.similarity import make_similarity

    dim, feat, regions, seq = (256, 512, 12, 12) if args.quick else (1024, 2048, 36, 12)
    repeats = 3 if args.quick else 10
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec(image_dim=feat, vocab_size=10_000, embed_dim=dim)).eval()
    towers = {
        "image_encoder": encoder.image,
        "text_encoder": encoder.text,
        "metric_head": MetricHead(make_similarity("gssf", dim, min(64, dim))).eval(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in towers.items():
            path = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            export_graph(name, module, dim, path, 20)
            export_seconds = time.perf_counter() - start
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for batch in (1, 128):
                feeds = _inputs(name, batch, dim, feat, regions, seq)
                tensors = [torch.from_numpy(v) for v in feeds.values()]
                torch_times, ort_times = [], []
                with torch.no_grad():
                    module(*tensors)
                    session.run(None, feeds)
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        module(*tensors)
                        t1 = time.perf_counter()
                        session.run(None, feeds)
                        t2 = time.perf_counter()
                        torch_times.append(t1 - t0)
                        ort_times.append(t2 - t1)
                torch_ms, ort_ms = 1000 * statistics.median(torch_times), 1000 * statistics.median(ort_times)
                rows.append({"graph": name, "batch": batch, "torch_ms": torch_ms, "ort_ms": ort_ms,
                             "ort_over_torch": ort_ms / torch_ms, "export_s": export_seconds})  # fmt: skip
    notes = [
        f"D={dim}, regions {regions}x{feat}, captions of {seq} tokens; median of {repeats}. Target ORT <= 0.8x torch."
    ]
    if not args.skip_quickstart:
        seconds = _quickstart()
        rows.append({"graph": "gssf run pipelines/quickstart.toml (wall)", "batch": "", "torch_ms": "", "ort_ms": "",
                     "ort_over_torch": "", "export_s": seconds})  # fmt: skip
        notes.append(f"quickstart pipeline wall time {seconds:.1f} s (target <= 180 s)")
    report("export" + ("_quick" if args.quick else ""), rows, notes)


def _inputs(name: str, batch: int, dim: int, feat: int, regions: int, seq: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "image_encoder":
        return {"features": rng.normal(size=(batch, regions, feat)).astype(np.float32)}
    if name == "text_encoder":
        lengths = rng.integers(seq // 2, seq + 1, size=batch).astype(np.int64)
        lengths[0] = seq
        return {"tokens": rng.integers(4, 10_000, size=(batch, seq)).astype(np.int64), "lengths": lengths}
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    return {"embeddings": x / np.linalg.norm(x, axis=1, keepdims=True)}


def _quickstart() -> float:
    exe = shutil.which("gssf") or str(Path(sys.executable).with_name("gssf"))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "pipelines", Path(tmp) / "pipelines")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        start = time.perf_counter()
        subprocess.run([exe, "run", "pipelines/quickstart.toml", "--json"], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
