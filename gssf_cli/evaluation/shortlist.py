"""Shortlist evaluation of an interaction model: rank by the pooled embeddings, re-score the top K exactly.

Why: exact interaction scoring touches every image–caption pair at token level; a shortlist touches K per query.
It is approximate — an item outside a query's top K by the pooled embeddings can never come back — so the result
says so, and says how many of the exact top-10 items the shortlist's top 10 missed on an audited set of queries
(scored exactly, all pairs of those queries).

Ranking: a query's K candidates come first, ordered by their interaction scores; every other item follows in the
pooled order. The ranks then go through the same code as exact evaluation
(:func:`gssf_cli.evaluation.crossmodal.cross_modal_ranks` on a ready matrix, the pessimistic tie rule included),
in float64 so that lifting the candidates above the rest cannot create ties.

Shapes: pooled ``images [N, D]``, ``texts [kN, D]``; ``score_fn(image rows [b, 1], caption rows [m, 1]) -> [b, m]``
(the interaction on the split's row numbers, as :class:`gssf_cli.modeling.model.SplitScorer` gives it). Candidate
pairs are scored grouped by image — one image against the captions that need it — so each image's regions are
transformed once, whichever direction asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gssf_cli.evaluation.crossmodal import (
    CrossModalRanks,
    cross_modal_metrics,
    cross_modal_ranks,
    protocol_folds,
)

ScoreFn = Callable[[Tensor, Tensor], Tensor]
AUDIT_QUERIES = 100
"""Queries per direction whose exact top 10 is computed to count what the shortlist missed (all, when fewer)."""
TOP = 10
LIFT = 1e6
"""Added to a candidate's interaction score (float64) so that every candidate ranks above every other item."""


@dataclass(frozen=True)
class ShortlistReport:
    """What a shortlist evaluation missed: of the exact top-``TOP`` items of ``queries`` audited queries per
    direction (``image→text``, ``text→image``), how many its own top ``TOP`` did not hold."""

    k: int
    queries: dict[str, int]
    missed: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "approximate": True,
            "audited_queries": self.queries,
            "missed_top10": self.missed,
            "of_top10": {d: TOP * n for d, n in self.queries.items()},
        }


@torch.no_grad()
def shortlist_metrics(
    images: Tensor,
    texts: Tensor,
    score_fn: ScoreFn,
    *,
    k: int,
    captions_per_image: int,
    protocol: str,
    ks: Sequence[int],
) -> tuple[dict[str, Any], ShortlistReport]:
    """The :func:`~gssf_cli.evaluation.crossmodal.evaluate_cross_modal` keys of the shortlist ranking (per fold
    of ``protocol``, then their mean) and what it missed (:class:`ShortlistReport`)."""
    c = captions_per_image
    folds, queries, missed = [], {"image→text": 0, "text→image": 0}, {"image→text": 0, "text→image": 0}
    rng = np.random.default_rng(0)

    def pair_fn(image_rows: Tensor, caption_rows: Tensor) -> Tensor:
        return matched_scores(score_fn, image_rows, caption_rows)

    for start, stop in protocol_folds(images.shape[0], protocol):
        image_rows, caption_rows = torch.arange(start, stop), torch.arange(c * start, c * stop)
        pooled = (images[start:stop] @ texts[c * start : c * stop].T).double()  # [n, cn]
        i2t = _lifted(pooled, pair_fn, image_rows, caption_rows, k)
        t2i = _lifted(pooled.T.contiguous(), lambda t, i: pair_fn(i, t), caption_rows, image_rows, k).T
        ranks_i2t = cross_modal_ranks(scores=i2t, captions_per_image=c, dtype=torch.float64)
        ranks_t2i = cross_modal_ranks(scores=t2i, captions_per_image=c, dtype=torch.float64)
        folds.append(cross_modal_metrics(CrossModalRanks(ranks_i2t.i2t, ranks_t2i.t2i, ranks_i2t.i2t_ap), ks))
        for direction, lifted, rows, columns, exact in (
            ("image→text", i2t, image_rows, caption_rows, score_fn),
            ("text→image", t2i.T, caption_rows, image_rows, lambda a, b: score_fn(b, a).T),
        ):
            audit = np.sort(rng.choice(len(rows), size=min(AUDIT_QUERIES, len(rows)), replace=False))
            exact_scores = exact(rows[audit].float().unsqueeze(1), columns.float().unsqueeze(1))
            queries[direction] += len(audit)
            missed[direction] += _missed(exact_scores, lifted[torch.from_numpy(audit)])
    summary: dict[str, Any] = {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}
    summary["protocol"], summary["folds"] = protocol, folds
    return summary, ShortlistReport(k, queries, missed)


def matched_scores(score_fn: ScoreFn, image_rows: Tensor, caption_rows: Tensor) -> Tensor:
    """``[P]``: pair ``p`` (image ``image_rows[p]``, caption ``caption_rows[p]``) scored by ``score_fn``, one call
    per distinct image against just the captions paired with it."""
    out = torch.empty(image_rows.shape[0], dtype=torch.float64)
    order = torch.argsort(image_rows, stable=True)
    images, counts = torch.unique_consecutive(image_rows[order], return_counts=True)
    for image, group in zip(images.tolist(), torch.split(order, counts.tolist()), strict=True):
        row = torch.tensor([[float(image)]])
        out[group] = score_fn(row, caption_rows[group].float().unsqueeze(1))[0].double()
    return out


def _lifted(
    pooled: Tensor, pair_fn: Callable[[Tensor, Tensor], Tensor], rows: Tensor, columns: Tensor, k: int
) -> Tensor:
    """``pooled [q, g]`` (float64) with each row's top-``k`` columns replaced by ``LIFT`` + their interaction
    score. ``rows``/``columns``: the split's row numbers of the queries and the gallery."""
    top = pooled.topk(min(k, pooled.shape[1]), dim=1).indices  # [q, k]
    query = torch.arange(pooled.shape[0]).unsqueeze(1).expand_as(top)
    rescored = pair_fn(rows[query.reshape(-1)], columns[top.reshape(-1)]).double().view_as(top)
    lifted = pooled.clone()
    lifted[query, top] = LIFT + rescored
    return lifted


def _missed(exact: Tensor, lifted: Tensor) -> int:
    """Exact top-``TOP`` items per row of ``exact [q, g]`` absent from the top ``TOP`` of ``lifted [q, g]``."""
    top = min(TOP, exact.shape[1])
    truth = exact.topk(top, dim=1).indices
    found = lifted.topk(top, dim=1).indices
    hits = (truth.unsqueeze(2) == found.unsqueeze(1)).any(dim=2).sum()
    return int(truth.numel() - hits)
