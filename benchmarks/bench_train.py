"""Training step cost of the GSSF family against cosine, at the host frameworks' scale (D = 1024, B = 128).

One step = encode a batch (36 regions x 2048 features; captions of 12 tokens over a 10k vocabulary), score
it with the metric head, hardest-negative triplet loss, backward, gradient clipping, AdamW step. Metrics are
timed interleaved in one run (round-robin over repeats) so that machine noise hits them alike; ratios are
against cosine. Peak memory is measured per metric in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, report

METRICS = [("cosine", None), ("diag", None), ("bdiag", 64), ("gssf", 64), ("dense", None)]


def _setup(metric: str, block: int | None, dim: int, batch: int, regions: int, feat: int, seq: int):  # type: ignore[no-untyped-def]
    import torch

    from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
    from gssf_cli.modeling.losses import make_objective
    from gssf_cli.modeling.similarity import make_similarity

    torch.manual_seed(0)
    spec = EncoderSpec(image_dim=feat, vocab_size=10_000, embed_dim=dim)
    encoder = build_encoder(spec)
    similarity = make_similarity(metric, dim, block)
    objective = make_objective("triplet")
    params = list(encoder.parameters()) + list(similarity.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    images = torch.randn(batch, regions, feat)
    tokens = torch.randint(4, 10_000, (batch, seq))
    lengths = torch.randint(seq // 2, seq + 1, (batch,))
    lengths[0] = seq
    ids = torch.arange(batch)

    def step() -> None:
        img = encoder.encode_image(images)
        txt = encoder.encode_text(tokens, lengths)
        loss = objective(similarity.scores(img, txt), ids, hardest=True)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()

    return step


def _peak(args: argparse.Namespace, metric: str, block: int | None) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--measure-peak", metric, str(block or 0), *(["--quick"] if args.quick else [])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    parser.add_argument("--measure-peak", nargs=2, metavar=("METRIC", "BLOCK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dim, batch, regions, feat, seq = (256, 32, 12, 256, 12) if args.quick else (1024, 128, 36, 2048, 12)
    repeats, warmup = (3, 1) if args.quick else (8, 2)
    if args.measure_peak:
        metric, block = args.measure_peak[0], int(args.measure_peak[1]) or None
        step = _setup(metric, block if block else None, dim, batch, regions, feat, seq)
        for _ in range(2):
            step()
        print(json.dumps({"peak_mib": peak_rss_mib()}))
        return

    steps = {}
    for metric, block in METRICS:
        block = min(block, dim) if block else None
        steps[metric] = _setup(metric, block, dim, batch, regions, feat, seq)
        for _ in range(warmup):
            steps[metric]()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for metric, step in steps.items():
            start = time.perf_counter()
            step()
            times[metric].append(time.perf_counter() - start)
    base = statistics.median(times["cosine"])
    rows = []
    for metric, block in METRICS:
        med = statistics.median(times[metric])
        rows.append({
            "metric": metric + (f" d={min(block, dim)}" if block else ""),
            "step_ms": 1000 * med,
            "ratio_vs_cosine": med / base,
            "samples_per_s": batch / med,
            "peak_rss_mib": _peak(args, metric, block),
        })  # fmt: skip
    notes = [
        f"D={dim}, B={batch}, regions {regions}x{feat}, captions of {seq} tokens; median of {repeats} interleaved "
        "steps after warm-up. Targets: bdiag and gssf <= 1.10x cosine."
    ]
    report("train_step" + ("_quick" if args.quick else ""), rows, notes)


if __name__ == "__main__":
    main()
