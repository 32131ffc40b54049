"""Data-parallel training on Ray Train: throughput at 1 and 2 workers on this machine, and what the global-batch
gather costs.

(a) Training throughput (pairs/s of a whole epoch: encode, gather, score, loss, backward, DDP all-reduce, clip,
AdamW; validation and Ray's start-up excluded) of one run at the same global batch and seed: one process with
all the cores as torch threads (``gssf train``, the anchor), one process with one thread, and one Ray Train
worker per core with one thread each (``gssf train --workers N``). The ratio of the last to the first is what
data parallelism buys over torch's own threads on the same cores (on a cluster each worker brings its own
cores or GPU); against one thread it is the scaling per worker.

(b) The gather: forward + backward of :meth:`gssf_cli.modeling.distributed.Shard.gather` for one batch's image and text
embeddings ``[B/2, D]`` per worker in a 2-process gloo group, against one whole data-parallel training step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report


def _dataset(root: Path, args: argparse.Namespace) -> Path:
    from gssf_cli.core.stage_configs import PrepareConfig
    from gssf_cli.stages import prepare

    out = root / "syn"
    prepare.run(
        PrepareConfig(
            dataset="synthetic", out=out, train_images=args.images, dev_images=64, test_images=64,
            regions=args.regions, region_dim=args.region_dim, concepts=32, vocab_size=2000,
        )
    )  # fmt: skip
    return out


def _config(data: Path, root: Path, args: argparse.Namespace, **values: Any) -> Any:
    from gssf_cli.core.config import from_dict
    from gssf_cli.core.stage_configs import TrainConfig

    base = {"data": data, "metric": "gssf", "block_size": 64, "embed_dim": args.dim, "batch_size": args.batch,
            "epochs": args.epochs, "device": "cpu", "runs_dir": root / "runs", "warmup_epochs": 0}  # fmt: skip
    return from_dict(TrainConfig, {**base, **values}, "train")


def _throughput(config: Any) -> float:
    """Pairs/s of the best of ``epochs`` epochs (the first one pays for warming caches and threads)."""
    import uuid

    from gssf_cli.cluster import train_workers
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.training.loop import Trainer

    out = config.runs_dir / uuid.uuid4().hex
    rates: list[float] = []
    trainer = Trainer(config, Dataset(config.data))

    def keep(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        rates.append(metrics["samples_per_s"])

    if config.on_ray():
        with train_workers.data_parallel(config) as workers:
            workers.fit(trainer, out, on_epoch_end=keep)
    else:
        trainer.fit(out, on_epoch_end=keep)
    return max(rates)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _gather_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    from gssf_cli.modeling.distributed import Shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    shard = Shard.current()
    local = [torch.randn(shard.sizes(args.batch)[rank], args.dim, requires_grad=True) for _ in range(2)]
    times = []
    for _ in range(args.repeats + 3):
        dist.barrier()
        started = time.perf_counter()
        gathered = [shard.gather(x, args.batch) for x in local]
        (gathered[0] @ gathered[1].T).sum().backward()
        times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(str(statistics.median(times[3:])))
    dist.destroy_process_group()


def _gather_seconds(args: argparse.Namespace) -> float:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gather")
        mp.start_processes(_gather_worker, args=(_free_port(), args, out), nprocs=2, start_method="spawn")
        return float(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="train images (5 captions each)")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--region-dim", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args, _ = parser.parse_known_args()
    cores = os.cpu_count() or 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="gssf-bench-scale-") as tmp:
        root = Path(tmp)
        data = _dataset(root, args)
        cases = [
            (f"1 process, {cores} threads", {"threads": cores}),
            ("1 process, 1 thread", {"threads": 1}),
            (f"{cores} workers, 1 thread each", {"workers": cores, "threads": 1}),
        ]
        rows: list[dict[str, Any]] = []
        for name, values in cases:
            config = _config(data, root, args, **values)
            rate = _throughput(config)
            rows.append({"case": name, "pairs/s": round(rate, 1)})
        anchor = rows[0]["pairs/s"]
        for row in rows:
            row[f"vs 1 process, {cores} threads"] = round(row["pairs/s"] / anchor, 3)
        step = args.batch / rows[-1]["pairs/s"]
        gather = _gather_seconds(args)
        notes = [
            f"B = {args.batch} pairs, D = {args.dim}, {args.regions} regions x {args.region_dim} features, GSSF head "
            f"(block 64), hardest-negative triplet; {args.images * 5} pairs an epoch, best of {args.epochs} epochs.",
            f"gather (images + texts, [B/2, D] per worker, forward + backward, 2-process gloo): "
            f"{gather * 1e3:.2f} ms = {gather / step:.1%} of a 2-worker step ({step * 1e3:.0f} ms)",
        ]
        report("scale", rows, notes)


if __name__ == "__main__":
    main()
