"""Data parallelism over ``torch.distributed``: which rows of a global batch a worker encodes, and the gather that
gives every worker the embeddings of the whole batch, gradients included.

Why gather: the triplet loss mines each query's hardest negative among the batch, so a worker that saw only its
own ``B / W`` rows would mine among fewer, easier negatives than a single process with the same global batch —
a different objective, not just a faster one. As large-batch contrastive trainers do (CLIP, open_clip), each of
the ``W`` workers encodes its own rows, all-gathers the embeddings of every worker, and computes the score
matrix ``[B, B]`` and the loss of the **whole** batch; the encoders (the expensive part) are split, the head and
the loss (``O(B² D)``) are computed by every worker.

Why the gradients come out exactly those of one process: every worker computes the same loss ``L``. The
gather's backward sums the workers' gradients of the gathered ``[B, D]`` (an all-reduce) and keeps this worker's
rows, so worker ``w``'s embeddings get ``W · ∂L/∂e_w``; DistributedDataParallel then averages the parameter
gradients over the ``W`` workers, so the encoders get ``Σ_w ∂L/∂e_w · ∂e_w/∂θ = ∂L/∂θ`` and the head (whose
gradient is already the full ``∂L/∂head`` on every worker) gets it unchanged. Clipping and AdamW then see the
single-process gradient, up to the order of float summation.

Rows are split as evenly as possible in contiguous ranges (``np.array_split``'s rule): worker ``r`` of ``W``
takes rows ``[start_r, start_r + size_r)`` of a batch of ``B``. Uneven shards are padded to the largest for
the collective and trimmed after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    """This worker's place in a data-parallel group: ``rank`` of ``world`` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The process group this process belongs to (set up by Ray Train or ``torchrun``), else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def primary(self) -> bool:
        """The worker that writes checkpoints and reports: rank 0 (every worker validates)."""
        return self.rank == 0

    def sizes(self, batch: int) -> list[int]:
        """Rows of a ``batch``-row global batch per worker: ``[W]``, summing to ``batch``."""
        base, extra = divmod(batch, self.world)
        return [base + (1 if r < extra else 0) for r in range(self.world)]

    def rows(self, batch: int) -> slice:
        """This worker's rows of a ``batch``-row global batch."""
        sizes = self.sizes(batch)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def gather(self, local: Tensor, batch: int) -> Tensor:
        """``local [b_r, ...]`` (this worker's rows) → ``[batch, ...]``, every worker's rows in rank order, with
        gradients flowing back to each worker's own rows (see the module docstring). One process: ``local``."""
        if self.world == 1:
            return local
        return _GatherRows.apply(local, self.sizes(batch), self.rank)


class _GatherRows(torch.autograd.Function):
    """All-gather of row shards of unequal length (padded to the longest); backward all-reduces the gradient of
    the gathered tensor and returns this worker's rows."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, sizes: list[int], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None
