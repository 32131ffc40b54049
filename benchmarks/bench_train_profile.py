"""Where one training step's time goes, phase by phase, for the GSSF head against cosine, before and after the
step's two speed-ups — at the README's default sizes (D = 1024, 36 regions x 2048 features, captions of 12 tokens
over a 10k vocabulary, batch 128).

Phases of one step (timed inside the step): image projection (``encode_image``), text GRU (``encode_text``),
metric head (``similarity.scores``), loss, backward, gradient clipping, optimizer step. Backward is one autograd
pass, so it is attributed separately: each piece (image tower, text tower, head + loss on detached embeddings) is
run forward and then backward on its own, and its backward timed.

"before" is the reference path — per-region projection then mean pooling (``ImageEncoder.pool_first = False``)
and AdamW's per-tensor loop (``make_optimizer(fused=False)``); "after" is the library's default — pool, then
project, and the fused AdamW. All four variants (gssf d=64 / cosine x before / after) start from the same seed
and are timed round-robin over repeats, so machine noise hits them alike; figures are medians (``--stat min``:
the least-disturbed repeat, for a busy machine).

    .venv/bin/python benchmarks/bench_train_profile.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

METRICS = [("gssf", 64), ("cosine", None)]
PATHS = ("before", "after")
STEP_PHASES = [
    ("image", "image proj (encode_image)"),
    ("text", "text GRU (encode_text)"),
    ("head", "metric head (scores)"),
    ("loss", "loss"),
    ("backward", "backward"),
    ("clip", "grad clipping"),
    ("optim", "optimizer step"),
    ("step", "step total"),
]
BACKWARD_PHASES = [
    ("bwd_image", "bwd: image tower (alone)"),
    ("bwd_text", "bwd: text tower (alone)"),
    ("bwd_head", "bwd: head + loss (alone)"),
]

Times = dict[str, list[float]]
STATS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


class Variant:
    """One metric on one path: a model, its objective and optimizer, and a fixed batch; ``step`` and ``pieces``
    append seconds per phase to a :data:`Times`."""

    def __init__(self, metric: str, block: int | None, path: str, sizes: dict[str, int]) -> None:
        import torch

        from gssf_cli.core.stage_configs import TrainConfig
        from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
        from gssf_cli.modeling.model import RetrievalModel
        from gssf_cli.modeling.similarity import make_similarity
        from gssf_cli.training.loop import make_optimizer

        torch.manual_seed(0)
        dim, batch, seq = sizes["dim"], sizes["batch"], sizes["seq"]
        spec = EncoderSpec(image_dim=sizes["feat"], vocab_size=sizes["vocab"], embed_dim=dim)
        encoder = build_encoder(spec)
        encoder.image.pool_first = path == "after"
        self.model = RetrievalModel(encoder, make_similarity(metric, dim, block), "cross_modal")
        config = TrainConfig(data=Path("."), metric=metric, block_size=block or 64, embed_dim=dim)
        self.objective = _objective()
        self.optimizer = make_optimizer(self.model, self.objective, config, fused=path == "after")
        self.params = list(self.model.parameters())
        self.clip = config.grad_clip
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(batch, sizes["regions"], sizes["feat"], generator=generator)
        self.tokens = torch.randint(4, sizes["vocab"], (batch, seq), generator=generator)
        self.lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=generator)
        self.lengths[0] = seq
        self.ids = torch.arange(batch)
        self.grad = torch.randn(batch, dim, generator=generator)

    def step(self, times: Times) -> None:
        """One training step as :class:`gssf_cli.training.loop.Trainer` takes it, timed phase by phase."""
        import torch

        model, clock = self.model, _Clock(times)
        images = clock("image", lambda: model.encode_images(self.images))
        texts = clock("text", lambda: model.encode_texts(self.tokens, self.lengths))
        scores = clock("head", lambda: model.scores(images, texts))
        loss = clock("loss", lambda: self.objective(scores, self.ids, hardest=True)["loss"])
        self.optimizer.zero_grad(set_to_none=True)
        clock("backward", loss.backward)
        clock("clip", lambda: torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        clock("optim", self.optimizer.step)
        times["step"].append(sum(times[key][-1] for key, _ in STEP_PHASES[:-1]))

    def pieces(self, times: Times) -> None:
        """Backward of each piece on its own, the forward before it untimed (gradients are cleared after)."""

        model, clock = self.model, _Clock(times)
        images = model.encode_images(self.images)
        clock("bwd_image", lambda: images.backward(self.grad))
        texts = model.encode_texts(self.tokens, self.lengths)
        clock("bwd_text", lambda: texts.backward(self.grad))
        images, texts = images.detach().requires_grad_(True), texts.detach().requires_grad_(True)
        loss = self.objective(model.scores(images, texts), self.ids, hardest=True)["loss"]
        clock("bwd_head", loss.backward)
        self.optimizer.zero_grad(set_to_none=True)

    def image_embeddings(self) -> Any:
        import torch

        with torch.no_grad():
            return self.model.encode_images(self.images)


class _Clock:
    """Appends the seconds each call takes to a :data:`Times` and returns what the call returned."""

    def __init__(self, times: Times) -> None:
        self.times = times

    def __call__(self, key: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.times[key].append(time.perf_counter() - start)
        return out


def _objective() -> Any:
    from gssf_cli.modeling.losses import make_objective

    return make_objective("triplet")


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"dim": 256, "batch": 32, "regions": 12, "feat": 256, "seq": 12, "vocab": 10_000}
    return {"dim": 1024, "batch": 128, "regions": 36, "feat": 2048, "seq": 12, "vocab": 10_000}


def _measure(variants: dict[str, Variant], repeats: int, warmup: int) -> dict[str, Times]:
    """Round-robin: each repeat runs every variant's step, then every variant's pieces."""
    for variant in variants.values():
        for _ in range(warmup):
            variant.step(defaultdict(list))
            variant.pieces(defaultdict(list))
    times: dict[str, Times] = {name: defaultdict(list) for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            variant.step(times[name])
        for name, variant in variants.items():
            variant.pieces(times[name])
    return times


def _rows(times: dict[str, Times], batch: int, stat: Callable[[list[float]], float]) -> list[dict[str, Any]]:
    """One row per phase (ms per variant by ``stat`` over repeats, the after/before speed-up of gssf), then
    samples/s and the GSSF/cosine step ratio per path."""
    med = {name: {k: 1000 * stat(v) for k, v in t.items()} for name, t in times.items()}
    rows: list[dict[str, Any]] = []
    for key, label in STEP_PHASES + BACKWARD_PHASES:
        row: dict[str, Any] = {"phase": label, "unit": "ms"}
        row.update({name: med[name][key] for name in med})
        row["gssf after/before"] = med["gssf after"][key] / med["gssf before"][key]
        rows.append(row)
    rate = {name: 1000 * batch / med[name]["step"] for name in med}
    rows.append({"phase": "step throughput", "unit": "samples/s", **rate,
                 "gssf after/before": rate["gssf after"] / rate["gssf before"]})  # fmt: skip
    ratio = {f"gssf {path}": med[f"gssf {path}"]["step"] / med[f"cosine {path}"]["step"] for path in PATHS}
    rows.append({"phase": "GSSF/cosine step ratio", "unit": "x", **ratio})
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 8; 3 with --quick)")
    parser.add_argument(
        "--stat",
        choices=sorted(STATS),
        default="median",
        help="per-phase statistic over repeats; min = the least-disturbed repeat, for a busy shared machine",
    )
    args = parser.parse_args()
    sizes = _sizes(args.quick)
    repeats = args.repeats or (3 if args.quick else 8)
    variants = {
        f"{metric} {path}": Variant(metric, min(block, sizes["dim"]) if block else None, path, sizes)
        for metric, block in METRICS
        for path in PATHS
    }
    drift = (variants["gssf after"].image_embeddings() - variants["gssf before"].image_embeddings()).abs().max()
    times = _measure(variants, repeats, warmup=1)
    rows = _rows(times, sizes["batch"], STATS[args.stat])
    notes = [
        f"D={sizes['dim']}, B={sizes['batch']}, regions {sizes['regions']}x{sizes['feat']}, captions of "
        f"{sizes['seq']} tokens over a {sizes['vocab']} vocab; gssf d=64; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.stat} ms of {repeats} interleaved repeats after warm-up.",
        "before = per-region projection + AdamW per-tensor loop; after = pool-then-project + fused AdamW.",
        "Backward rows: each piece's backward run on its own (they sum to about the one-pass backward).",
        f"after vs before image embeddings, same weights: max abs diff {float(drift):.2e}.",
        "Target: GSSF/cosine step ratio <= 1.10.",
    ]
    report("train_profile" + ("_quick" if args.quick else ""), rows, notes)


if __name__ == "__main__":
    main()
