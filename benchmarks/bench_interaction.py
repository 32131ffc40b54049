"""Cost of the interaction-based family (gssf_cli.modeling.interaction): exact evaluation, shortlist evaluation and
a training step, against anchors measured in the same run (a measurement script, not a test).

Why: an interaction model scores every image-caption pair from token similarities, so its evaluation cannot be
one ``[N, D] x [D, kN]`` GEMM; the floor is the GEMM of all token similarities. These figures say how close the
exact path comes to that floor, what a shortlist buys (and misses), and what a training step costs next to the
embedding model's.

1. Exact evaluation at the Flickr30K 1K test shape: 1,000 images x 36 regions, 5,000 captions of 8-16 words
   (padded to the longest), D = 1024. Tokens are unit rows, mildly clustered (shared concepts, a per-image
   instance look, clutter regions, common function words) so that rankings are neither trivial nor random; the
   exact metrics are printed so that this can be seen. The scorer is :func:`gssf_cli.modeling.model.split_scorer`
   itself, on a :class:`~gssf_cli.modeling.model.RetrievalModel` whose towers pass the given tokens through, so the
   row-number + ``score_fn`` scheme is exactly the one ``gssf evaluate`` runs; timed is
   ``evaluate_cross_modal(rows, rows, score_fn=..., protocol="f30k-1k")`` (``all`` below 1,000 images) for
   ``scan-t2i`` with metric cosine (one token-similarity GEMM), ``scan-t2i`` with gssf d=64 at the relevance (two
   GEMMs: cosine for the attention, gssf for the relevance) and ``maxsim`` with gssf d=64 (one GEMM of transformed
   regions). gssf's blocks get small random weights (at initialisation gssf equals cosine).
   Anchor: the bare GEMM of all token similarities, ``[N*R, D] x [D, kN*L]``, in the blocks the interaction
   itself uses (``evaluate_cross_modal``'s image-row chunks, then :data:`~gssf_cli.modeling.interaction.BLOCK_ELEMENTS`
   token pairs per block, the partition of :meth:`Interaction.forward`), output discarded. Each case is
   reported as a ratio to it (target <= 1.5x for the one-GEMM case) and per GEMM it needs.
2. Shortlist (``--shortlist 100``): ``shortlist_metrics`` over the pooled embeddings ``split_scorer`` gives (the
   L2-normalised means of the tokens), k = 100: its speed-up over the exact evaluation of the same case, and the
   exact top-10 items its top 10 missed over ALL queries of both directions (from the exact score matrix, recorded
   during the first exact run), beside the report's own audited figure (a sample of queries).
3. Training: samples/s of one step (forward, backward, gradient clipping, AdamW) of interaction models against
   the embedding model with the same towers and metric (gssf d=64), built as ``gssf train`` builds them
   (:func:`build_model_for` from a precomp-like manifest, :class:`BatchStep`, :func:`make_optimizer`): batch 128,
   36 regions x 2048 features, captions of 28-36 tokens (~32) over a 10k vocabulary, D = 1024, hardest-negative
   triplet loss. Peak memory per model in a fresh subprocess (VmHWM), as ``bench_train.py`` does.

Workloads within a section are timed in alternation (round-robin), so that a change in the machine's load hits
them alike: evaluation best of ``--repeats`` rounds (full mode: 1, as one exact evaluation takes minutes on 2 cores;
the anchor runs before every exact case and once after, best of those), training the median of 5 steps after two
warm-up steps. The first round's exact runs also copy S's rows aside (one ``[N, kN]`` copy, negligible) for the miss
counts. Torch threads: the default.

Run from the repository root:  python benchmarks/bench_interaction.py [--quick] [--repeats N] [--skip-training]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import peak_rss_mib, report

from gssf_cli.evaluation.crossmodal import evaluate_cross_modal
from gssf_cli.evaluation.ranking import DEFAULT_MEMORY_BUDGET_BYTES, rows_per_chunk
from gssf_cli.evaluation.shortlist import AUDIT_QUERIES, TOP, shortlist_metrics
from gssf_cli.modeling.interaction import BLOCK_ELEMENTS, TokenSets, block_shape, make_interaction
from gssf_cli.modeling.model import RetrievalModel, SplitScorer, split_scorer
from gssf_cli.modeling.similarity import GSSFSimilarity, make_similarity

FULL: dict[str, Any] = {
    "images": 1_000, "regions": 36, "words": (8, 16), "dim": 1024, "shortlist": 100, "repeats": 1,
    "train_batch": 128, "train_regions": 36, "train_features": 2048, "train_words": (28, 36),
    "train_repeats": 5, "train_warmup": 2,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "images": 64, "regions": 12, "words": (4, 8), "dim": 128, "shortlist": 16, "repeats": 2,
    "train_batch": 16, "train_regions": 12, "train_features": 128, "train_words": (8, 12),
    "train_repeats": 3, "train_warmup": 1,
}  # fmt: skip
CAPTIONS_PER_IMAGE = 5
BLOCK = 64
CASES = [("scan-t2i", "cosine"), ("scan-t2i", "gssf"), ("maxsim", "gssf")]
"""(interaction, metric) of the evaluation cases; SCAN with ``gssf_at`` relevance, its published λs."""
TRAIN_KINDS = ["none", "scan-t2i", "maxsim"]
"""Training cases: ``none`` is the embedding model (pooled embeddings through the metric head)."""
VOCAB = 10_000

# Token data: concepts shared across images, a per-image instance look, clutter regions and function words.
CONCEPTS = 16
CONCEPTS_PER_IMAGE = 4
FUNCTION_WORDS = 200
CLUTTER_FRACTION = 1 / 3
INSTANCE = 0.15
REGION_NOISE = 1.0
CONTENT_WORD_NOISE = 1.2
FUNCTION_WORD_NOISE = 0.3
CONTENT_WORD_SHARE = 0.5


# ----------------------------------------------------------------------------------------------------------
# Data and the scorer


def unit(x: Tensor) -> Tensor:
    return nn.functional.normalize(x, dim=-1)


def noise(shape: tuple[int, ...], scale: float, gen: torch.Generator) -> Tensor:
    """Gaussian rows of expected norm ``scale`` (so cosines do not depend on D)."""
    return torch.randn(*shape, generator=gen) * (scale / shape[-1] ** 0.5)


def token_sets(n: int, regions: int, words: tuple[int, int], dim: int, seed: int = 0) -> TokenSets:
    """Regions ``[n, R, D]`` and the words of ``5n`` captions ``[5n, L, D]`` (zero past each length, L the longest)
    with their mask: unit rows, mildly clustered (see the constants above)."""
    gen = torch.Generator().manual_seed(seed)
    concepts = unit(torch.randn(CONCEPTS, dim, generator=gen))
    function_words = unit(torch.randn(FUNCTION_WORDS, dim, generator=gen))
    instance = unit(torch.randn(n, dim, generator=gen))
    shown = torch.randint(CONCEPTS, (n, CONCEPTS_PER_IMAGE), generator=gen)

    slot = torch.arange(regions) % CONCEPTS_PER_IMAGE
    region_rows = concepts[shown[:, slot]] + INSTANCE * instance[:, None] + noise((n, regions, dim), REGION_NOISE, gen)
    clutter = max(0, int(regions * CLUTTER_FRACTION))
    if clutter:
        region_rows[:, regions - clutter :] = torch.randn(n, clutter, dim, generator=gen)

    m = CAPTIONS_PER_IMAGE * n
    low, high = words
    lengths = torch.randint(low, high + 1, (m,), generator=gen)
    lengths[0] = high
    owner = torch.arange(m) // CAPTIONS_PER_IMAGE
    pick = shown[owner.unsqueeze(1), torch.randint(CONCEPTS_PER_IMAGE, (m, high), generator=gen)]  # [m, L]
    content = concepts[pick] + INSTANCE * instance[owner][:, None] + noise((m, high, dim), CONTENT_WORD_NOISE, gen)
    common = function_words[torch.randint(FUNCTION_WORDS, (m, high), generator=gen)]
    common = common + noise((m, high, dim), FUNCTION_WORD_NOISE, gen)
    is_content = torch.rand(m, high, generator=gen) < CONTENT_WORD_SHARE
    mask = torch.arange(high) < lengths.unsqueeze(1)
    word_rows = unit(torch.where(is_content.unsqueeze(-1), content, common)) * mask.unsqueeze(-1)
    return TokenSets(unit(region_rows), word_rows, mask)


class _RegionsAsGiven(nn.Module):
    def regions(self, features: Tensor) -> Tensor:
        return features


class _WordsAsGiven(nn.Module):
    def token_states(self, words: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        assert lengths is not None
        return words, torch.arange(words.shape[1]) < lengths.unsqueeze(1)


class _GivenTowers(nn.Module):
    """Towers whose token outputs are the split's rows as they are (``RetrievalModel`` unit-normalises them)."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = _RegionsAsGiven(), _WordsAsGiven()


class _TokenSplit:
    """The part of a cross-modal :class:`~gssf_cli.data.dataset.Split` that ``split_scorer`` reads: batches of
    "features" (here the regions themselves) and of "token ids" (here the words themselves) with lengths."""

    task = "cross_modal"

    def __init__(self, tokens: TokenSets) -> None:
        self.tokens = tokens
        self.lengths = tokens.mask.sum(dim=1)
        self.num_images, self.num_pairs = tokens.regions.shape[0], tokens.words.shape[0]

    def image_batch(self, rows: Any) -> Tensor:
        return self.tokens.regions[torch.as_tensor(rows)]

    def text_batch(self, rows: Any) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(rows)
        return self.tokens.words[index], self.lengths[index]


def scorer(kind: str, metric: str, tokens: TokenSets) -> SplitScorer:
    """``split_scorer`` of an interaction model over ``tokens`` (gssf: small random blocks, so not cosine)."""
    dim = tokens.regions.shape[2]
    similarity = make_similarity(metric, dim, BLOCK if metric != "cosine" else None)
    if isinstance(similarity, GSSFSimilarity):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            similarity.blocks.copy_(0.02 * torch.randn(similarity.blocks.shape, generator=gen))
    interaction = make_interaction(kind, similarity)
    model = RetrievalModel(_GivenTowers(), similarity, "cross_modal", interaction)
    return split_scorer(model, _TokenSplit(tokens), torch.device("cpu"))  # type: ignore[arg-type]


def case_label(case: tuple[str, str]) -> str:
    kind, metric = case
    return f"{kind} {metric}" + (f" d={BLOCK}" if metric != "cosine" else "")


def gemms(kind: str, metric: str) -> int:
    """Token-similarity GEMMs per block: SCAN at the relevance with a learned metric needs cosine and gssf."""
    return 2 if kind != "maxsim" and metric != "cosine" else 1


def token_gemm(tokens: TokenSets) -> None:
    """The anchor: every token similarity ``[N*R, D] x [D, kN*L]`` in the interaction's blocks, discarded."""
    regions, words = tokens.regions, tokens.words
    n, r, d = regions.shape
    m, length, _ = words.shape
    chunk = rows_per_chunk(m, regions.element_size(), DEFAULT_MEMORY_BUDGET_BYTES)
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = regions[start : start + chunk]
            images_per_block, captions_per_block = block_shape(part.shape[0], r, m, length)
            for i in range(0, part.shape[0], images_per_block):
                left = part[i : i + images_per_block].reshape(-1, d)
                for t in range(0, m, captions_per_block):
                    left @ words[t : t + captions_per_block].reshape(-1, d).T


def recording(score_fn: Callable[[Tensor, Tensor], Tensor], into: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``score_fn`` that also copies every block of whole rows of S into ``into [N, kN]``."""

    def fn(image_rows: Tensor, text_rows: Tensor) -> Tensor:
        block = score_fn(image_rows, text_rows)
        if text_rows.shape[0] == into.shape[1]:
            into[image_rows[:, 0].long()] = block
        return block

    return fn


def missed_top10(exact: Tensor, pooled: Tensor, k: int) -> int:
    """Exact top-10 items per query (row of ``exact``) absent from the shortlist's top 10: the top 10 by exact
    score among the query's top ``k`` by ``pooled`` (the shortlist re-scores those exactly and lifts them above
    every other item)."""
    candidates = pooled.topk(min(k, pooled.shape[1]), dim=1).indices
    shortlisted = torch.full_like(exact, float("-inf")).scatter(1, candidates, exact.gather(1, candidates))
    top = min(TOP, exact.shape[1])
    truth = exact.topk(top, dim=1).indices
    found = shortlisted.topk(top, dim=1).indices
    return int(truth.numel() - (truth.unsqueeze(2) == found.unsqueeze(1)).any(dim=2).sum())


# ----------------------------------------------------------------------------------------------------------
# 1 + 2: exact and shortlist evaluation


def measure_evaluation(sizes: dict[str, Any], repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    n, r, d, k = sizes["images"], sizes["regions"], sizes["dim"], sizes["shortlist"]
    tokens = token_sets(n, r, sizes["words"], d)
    m, length = tokens.words.shape[:2]
    protocol = "f30k-1k" if n == 1_000 else "all"
    shape = f"{n:,} img x {r} reg, {m:,} cap x <= {length} words, D={d}"
    scorers = {case: scorer(*case, tokens) for case in CASES}
    scores = {case: torch.full((n, m), float("nan")) for case in CASES}
    results: dict[str, Any] = {}

    def anchor_run(first: bool) -> None:
        token_gemm(tokens)

    def exact(case: tuple[str, str], first: bool) -> None:
        s = scorers[case]
        fn = recording(s.score_fn, scores[case]) if first else s.score_fn
        results[f"exact {case}"] = evaluate_cross_modal(
            s.images, s.texts, captions_per_image=CAPTIONS_PER_IMAGE, protocol=protocol, score_fn=fn
        )

    def shortlist(case: tuple[str, str], first: bool) -> None:
        s = scorers[case]
        results[f"shortlist {case}"] = shortlist_metrics(
            *s.pooled, s.score_fn, k=k, captions_per_image=CAPTIONS_PER_IMAGE, protocol=protocol, ks=(1, 5, 10)
        )

    # The anchor runs before every exact case and once after them: it is short next to them, and a ratio then
    # rests on anchors measured minutes apart at most, not on one.
    schedule: list[tuple[str, Callable[[bool], None]]] = []
    for case in CASES:
        schedule += [("anchor", anchor_run), (f"exact {case}", partial(exact, case))]
    schedule.append(("anchor", anchor_run))
    schedule += [(f"shortlist {case}", partial(shortlist, case)) for case in CASES]
    times: dict[str, list[float]] = {name: [] for name, _ in schedule}
    for round_ in range(repeats):
        for name, work in schedule:
            start = time.perf_counter()
            work(round_ == 0)
            times[name].append(time.perf_counter() - start)
            print(f"  round {round_ + 1}/{repeats}: {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    best = {name: min(values) for name, values in times.items()}
    anchor = best["anchor"]

    rows: list[dict[str, Any]] = [{"case": "anchor: token GEMM", "seconds": anchor, "x anchor": 1.0, "x/GEMM": 1.0}]
    notes = [f"evaluation: {shape}, protocol {protocol}, captions padded to the longest ({length} words)."]
    for case in CASES:
        kind, metric = case
        seconds = best[f"exact {case}"]
        metrics = results[f"exact {case}"]
        rows.append({"case": f"exact {case_label(case)}", "seconds": seconds, "x anchor": seconds / anchor,
                     "x/GEMM": seconds / anchor / gemms(kind, metric), "rsum": metrics["rsum"]})  # fmt: skip
        notes.append(
            f"exact {case_label(case)}: R@1 i2t {metrics['i2t_r1']:.1f}, t2i {metrics['t2i_r1']:.1f}, "
            f"rsum {metrics['rsum']:.1f}."
        )
    for case in CASES:
        seconds = best[f"shortlist {case}"]
        metrics, shortlist_report = results[f"shortlist {case}"]
        s, exact_scores = scorers[case], scores[case]
        assert not torch.isnan(exact_scores).any(), "the recording missed rows of S"
        pooled = s.pooled[0] @ s.pooled[1].T
        missed_i2t = missed_top10(exact_scores, pooled, k)
        missed_t2i = missed_top10(exact_scores.T.contiguous(), pooled.T.contiguous(), k)
        audited = shortlist_report.to_json()
        audit_missed, audit_of = sum(audited["missed_top10"].values()), sum(audited["of_top10"].values())
        of_all = min(TOP, m) * n + min(TOP, n) * m
        rows.append({"case": f"shortlist {k} {case_label(case)}", "seconds": seconds, "x anchor": seconds / anchor,
                     "speed-up": best[f"exact {case}"] / seconds, "rsum": metrics["rsum"],
                     "missed top-10: all | audited": f"{100 * (missed_i2t + missed_t2i) / of_all:.1f}% | "
                                                     f"{100 * audit_missed / max(1, audit_of):.1f}%"})  # fmt: skip
        notes.append(
            f"shortlist {k} {case_label(case)}: R@1 i2t {metrics['i2t_r1']:.1f}, t2i {metrics['t2i_r1']:.1f}; "
            f"missed exact top-10 items over ALL queries: image→text {missed_i2t}/{min(TOP, m) * n}, "
            f"text→image {missed_t2i}/{min(TOP, n) * m}; the report's audit: image→text "
            f"{audited['missed_top10']['image→text']}/{audited['of_top10']['image→text']}, text→image "
            f"{audited['missed_top10']['text→image']}/{audited['of_top10']['text→image']}."
        )
    one_gemm = best[f"exact {CASES[0]}"] / anchor
    ib, cb = block_shape(min(n, rows_per_chunk(m, 4, DEFAULT_MEMORY_BUDGET_BYTES)), r, m, length)
    notes[1:1] = [
        f"anchor: [N*R, D] x [D, kN*L] in the interaction's blocks ({ib} images x {cb} captions, BLOCK_ELEMENTS = "
        f"{BLOCK_ELEMENTS:,}). exact {case_label(CASES[0])} / anchor = {one_gemm:.2f}x (target <= 1.5x); x/GEMM "
        "divides by the token-similarity GEMMs a case needs (2 for SCAN with gssf at the relevance).",
        f"shortlist: k = {k}; its time includes its audit (exact scores of {min(AUDIT_QUERIES, n):,} images and "
        f"{min(AUDIT_QUERIES, m):,} captions against every item of the other side); 'missed top-10': share of the "
        "exact top-10 items absent from the shortlist's top 10, over all queries of both directions (from the exact "
        "S recorded in the first exact run) | on the report's audited queries.",
        f"best of {repeats} interleaved round(s) (the anchor: best of its {len(times['anchor'])} runs, one before each "
        f"exact case and one after); torch threads: {torch.get_num_threads()}.",
    ]
    return rows, notes


# ----------------------------------------------------------------------------------------------------------
# 3: training step


def train_step(kind: str, sizes: dict[str, Any]) -> Callable[[], None]:
    """One training step of model ``kind`` (``none``: the embedding model), built as ``gssf train`` builds it."""
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.modeling.distributed import Shard
    from gssf_cli.modeling.model import build_model_for, build_objective, resolve_config
    from gssf_cli.training.batch_step import BatchStep
    from gssf_cli.training.loop import make_optimizer

    batch, regions, features = sizes["train_batch"], sizes["train_regions"], sizes["train_features"]
    low, high = sizes["train_words"]
    manifest = {
        "task": "cross_modal",
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "modalities": {
            "image": {"type": "regions", "shape": [regions, features], "dtype": "float32"},
            "text": {"type": "captions", "vocab_size": VOCAB},
        },
    }
    config = TrainConfig(
        data=Path("synthetic"), metric="gssf", block_size=BLOCK, embed_dim=sizes["dim"], interaction=cast(Any, kind),
        batch_size=batch, device="cpu",
    )  # fmt: skip
    config = resolve_config(config, manifest)
    torch.manual_seed(0)
    model = build_model_for(manifest, config)
    objective = build_objective(config)
    optimizer = make_optimizer(model, objective, config)
    assert optimizer is not None
    forward = BatchStep(model, objective, Shard(), None, config.distill_use_metric)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, regions, features, generator=gen)
    tokens = torch.randint(4, VOCAB, (batch, high), generator=gen)
    lengths = torch.randint(low, high + 1, (batch,), generator=gen)
    lengths[0] = high
    ids = torch.arange(batch)

    def step() -> None:
        parts = forward(images, tokens, lengths, ids, True)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    return step


def train_label(kind: str) -> str:
    return f"embedding gssf d={BLOCK}" if kind == "none" else f"{kind} gssf d={BLOCK}"


def train_peak(kind: str, quick: bool) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--measure-train-peak", kind, *(["--quick"] if quick else [])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def measure_training(sizes: dict[str, Any], quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    repeats = sizes["train_repeats"]
    steps = {kind: train_step(kind, sizes) for kind in TRAIN_KINDS}
    for step in steps.values():
        for _ in range(sizes["train_warmup"]):
            step()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(repeats):
        for kind, step in steps.items():
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
    batch = sizes["train_batch"]
    base = statistics.median(times["none"])
    shape = (
        f"B={batch}, {sizes['train_regions']} reg x {sizes['train_features']}, "
        f"{sizes['train_words'][0]}-{sizes['train_words'][1]} words, D={sizes['dim']}"
    )
    rows = []
    for kind in TRAIN_KINDS:
        med = statistics.median(times[kind])
        rows.append({"case": f"train {train_label(kind)}", "seconds": med, "samples/s": batch / med,
                     "x embed": med / base, "peak MiB": train_peak(kind, quick)})  # fmt: skip
    notes = [
        f"training: {shape}; median of {repeats} interleaved steps after {sizes['train_warmup']} warm-up step(s) "
        "each (forward, backward, clipping, AdamW; hardest-negative triplet); x embed: step time / the embedding "
        "model's; peak MiB: peak RSS of each in a fresh subprocess after two steps."
    ]
    return rows, notes


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (seconds)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of the evaluation timings (best of)")
    parser.add_argument("--skip-training", action="store_true", help="measure the evaluation only")
    parser.add_argument("--measure-train-peak", metavar="KIND", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.measure_train_peak:
        step = train_step(args.measure_train_peak, sizes)
        for _ in range(2):
            step()
        print(json.dumps({"peak_mib": peak_rss_mib()}))
        return
    rows, notes = measure_evaluation(sizes, args.repeats or sizes["repeats"])
    if not args.skip_training:
        train_rows, train_notes = measure_training(sizes, args.quick)
        rows, notes = rows + train_rows, notes + train_notes
    report("interaction" + ("_quick" if args.quick else ""), rows, notes)


if __name__ == "__main__":
    main()
