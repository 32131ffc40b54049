"""One training step's forward, as DistributedDataParallel wraps it: encode this worker's rows, gather the global
batch, score it ``[B, B]`` (pooled embeddings through the head, or token sets through the interaction) and apply
the objective.
"""

from __future__ import annotations

import torch

from gssf_cli.modeling.distributed import Shard
from gssf_cli.modeling.interaction import TokenSets
from gssf_cli.modeling.model import RetrievalModel


class BatchStep(torch.nn.Module):
    """One training step's forward: encode this worker's rows of the batch, gather the embeddings of the global
    batch (:meth:`~gssf_cli.modeling.distributed.Shard.gather`: one process has them all already), score them ``[B, B]``
    and apply the objective, so hardest negatives are mined over the global batch.

    A module so that DistributedDataParallel wraps the whole step: its gradient hooks then cover the encoders, the
    head and the objective's own parameters (a learned temperature, distillation's λ). Under ``--amp`` the encoders
    and the head run in ``amp`` precision; the embeddings are gathered, and the loss computed, in float32.
    """

    def __init__(
        self, model: RetrievalModel, objective: torch.nn.Module, shard: Shard, amp: torch.dtype | None, metric: bool
    ) -> None:
        super().__init__()
        self.model, self.objective, self.shard, self.amp, self.distill_on_metric = model, objective, shard, amp, metric

    def forward(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        lengths: torch.Tensor | None,
        ids: torch.Tensor,
        hardest: bool,
        teachers: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """This worker's rows (``images [b, ...]``, ``texts [b, ...]``, ``lengths [b]``) and the global batch's
        ``ids [B]`` → the objective's parts over all ``B`` pairs (``loss`` and ``struct``). ``teachers``: this
        worker's rows of the distillation teachers (``[b, Fi]``, ``[b, Ft]``)."""
        batch = ids.shape[0]
        if self.model.interaction is not None:
            scores = self._token_scores(images, texts, lengths, batch)
            pooled = None  # the interaction's scores are its only relations between the pairs
        else:
            scores, pooled = self._embedding_scores(images, texts, lengths, batch)
        distill = None
        if teachers is not None:
            t_img, t_txt = (self.shard.gather(t, batch) for t in teachers)
            student = scores if self.distill_on_metric or pooled is None else pooled[0] @ pooled[1].T
            distill = (student, t_img, t_txt)
        return self.objective(scores, ids, hardest=hardest, distill_inputs=distill)

    def _embedding_scores(
        self, images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``[B, B]`` head scores of the global batch and its embeddings ``([B, D], [B, D])``."""
        device = images.device
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            local_images = self.model.encode_images(images).float()
            local_texts = self.model.encode_texts(texts, lengths).float()
        embedded_images = self.shard.gather(local_images, batch)
        embedded_texts = self.shard.gather(local_texts, batch)
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            scores = self.model.scores(embedded_images, embedded_texts).float()
        return scores, (embedded_images, embedded_texts)

    def _token_scores(
        self, images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor | None, batch: int
    ) -> torch.Tensor:
        """``[B, B]`` interaction scores of the global batch from this worker's token sets. Workers pad their
        words to the global batch's longest caption before the gather (their own batches' lengths differ); the
        interaction's student scores are also what distillation reads."""
        device = images.device
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            local = self.model.encode_tokens(images, texts, lengths)
        regions, words, mask = local.regions.float(), local.words.float(), local.mask
        if self.shard.world > 1:
            width = torch.full((words.shape[0],), words.shape[1], device=device)
            longest = int(self.shard.gather(width, batch).max())
            extra = longest - words.shape[1]
            words = torch.nn.functional.pad(words, (0, 0, 0, extra))
            mask = torch.nn.functional.pad(mask, (0, extra))
            regions, words = self.shard.gather(regions, batch), self.shard.gather(words, batch)
            mask = self.shard.gather(mask.float(), batch) > 0.5
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.model.token_scores(TokenSets(regions, words, mask)).float()
