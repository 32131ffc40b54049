"""VSE-style encoders: every tower maps one modality to L2-normalised embeddings ``[B, D]``.

Why this module exists: the GSSF metric (``similarity.py``) scores pairs of unit vectors, so each modality needs
a tower that ends in an L2 norm. The towers follow the host frameworks (VSE++, VSE∞, SGRAF): a linear projection
of precomputed image features (optionally plus VSE∞'s 2-layer MLP residual) pooled over regions, and a word
embedding + bidirectional GRU for captions, the two directions averaged. Style: small ``nn.Module`` classes in the
spirit of open_clip / nanoGPT — plain attributes, a ``forward`` that reads top to bottom, shapes in docstrings,
configuration by one frozen dataclass (:class:`EncoderSpec`) turned into modules by :func:`build_encoder`.

Export is a first-class requirement (``gssf export --onnx`` writes the image and text towers as ONNX graphs with
dynamic batch and sequence axes), which shapes the text tower:

- No packed sequences (``pack_padded_sequence`` exports with neither ONNX exporter). The forward GRU runs on
  the padded batch: padding sits after the valid tokens, so a causal pass never sees it at valid positions.
  The backward direction reverses each sequence *within its own length* with one ``gather`` (indices computed
  from ``lengths``, no loop over the batch), runs a second forward-only GRU, and reverses back. Numerically
  this equals ``nn.GRU(bidirectional=True)`` on packed input (tests: max abs diff < 1e-5).
- No data-dependent Python control flow in ``forward`` (no ``.item()``, no ``if lengths.max() ...``). Only
  static facts (a tensor's rank, a module's configuration) branch.
- Padding is masked in pooling, so outputs do not depend on the padded length or on ids at padded positions.

The export recipe and its traps (a frozen sequence axis above all) live with the exporter in
:mod:`gssf_cli.deploy.bundle`; this module does not import onnx.

Conventions: token id 0 is padding; ``lengths`` count valid tokens (values < 1 are treated as 1, values > L as
L). Image region sets have a fixed count R per batch (precomp features: 36 regions); a global feature
``[B, F]`` is one region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gssf_cli.core import limits
from gssf_cli.core.config import default_of
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import POOLINGS
from gssf_cli.core.stage_configs import TrainConfig

DEFAULT_POOLING: limits.Pooling = default_of(TrainConfig, "pooling")
DEFAULT_MLP: bool = default_of(TrainConfig, "mlp")
DEFAULT_WORD_DIM: int = default_of(TrainConfig, "word_dim")
DEFAULT_GRU_LAYERS: int = default_of(TrainConfig, "gru_layers")


@dataclass(frozen=True)
class TowerShape:
    """How deep and wide a feature tower is: ``layers`` Linear layers (1 = one projection; L >= 2:
    (L - 1) x [Linear(width ``hidden``) -> ReLU], then Linear(-> D)), ``hidden`` their width."""

    layers: int
    hidden: int | None


FEATURE_TOWERS: dict[str, TowerShape] = {
    "features": TowerShape(layers=2, hidden=1024),
    "digits": TowerShape(layers=2, hidden=1024),
}
"""The feature towers' shape when ``--mlp-layers`` / ``--mlp-hidden`` are not given, by dataset kind (the
manifest's ``kind``; a manifest of another kind, or none, gets ``features``' shape). The one place these
defaults are written. A feature tower is the image and the text tower of a ``features`` dataset of pairs and
the single tower of label-based data; region and global image towers (``synthetic``, ``precomp``) keep their
single projection (1 layer), optionally with VSE∞'s residual (``--mlp``, hidden width D/2 unless
``--mlp-hidden``)."""
DEFAULT_FEATURE_TOWER = FEATURE_TOWERS["features"]


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Unit-normalise the last axis; ``eps`` keeps an all-zero vector at zero instead of NaN."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class Projection(nn.Module):
    """``[..., F] -> [..., D]``: ``proj(x)``, or VSE∞'s ``proj(x) + mlp(x)`` when ``mlp=True``.

    The MLP is Linear(F, H) - LayerNorm - ReLU - Linear(H, D), H = ``hidden`` (default D/2). VSE∞ uses
    BatchNorm there; LayerNorm is used instead so that batch size 1, eval mode and export all behave the same as
    training. The projection uses Xavier-uniform weights and zero bias, as VSE++/VSE∞ do for their ``fc`` layer.
    """

    def __init__(self, in_dim: int, out_dim: int, mlp: bool = DEFAULT_MLP, hidden: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.mlp: nn.Sequential | None = None
        if mlp:
            hidden = residual_width(out_dim, hidden)
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=False), nn.Linear(hidden, out_dim)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        if self.mlp is not None:
            y = y + self.mlp(x)
        return y


def residual_width(embed_dim: int, hidden: int | None) -> int:
    """The hidden width of VSE∞'s residual MLP: ``hidden`` if given, else D/2 (at least 1)."""
    return hidden if hidden is not None else max(embed_dim // 2, 1)


def feature_mlp(in_dim: int, out_dim: int, layers: int, hidden: int) -> nn.Sequential:
    """``layers`` >= 2 Linear layers ``[..., F] -> [..., D]``: (L - 1) x [Linear(-> ``hidden``) -> ReLU], then
    Linear(-> D). Hidden layers start with He (Kaiming-uniform, ReLU gain) weights, the last with Xavier-uniform
    like a one-layer projection; biases start at zero."""
    if layers < 2:
        raise ValueError(f"an MLP tower has at least 2 layers, got {layers}")
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        linear = nn.Linear(width, hidden)
        nn.init.kaiming_uniform_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        modules += [linear, nn.ReLU(inplace=False)]
        width = hidden
    last = nn.Linear(width, out_dim)
    nn.init.xavier_uniform_(last.weight)
    nn.init.zeros_(last.bias)
    modules.append(last)
    return nn.Sequential(*modules)


class Pooling(nn.Module):
    """Pool a set ``[B, N, D]`` (with an optional validity mask ``[B, N]``) to ``[B, D]``.

    Modes: ``mean`` and ``max`` over valid items, or ``attention``: one learned linear score per item, softmax
    over the valid items, weighted sum. The scoring layer starts at zero, so attention pooling starts out as
    mean pooling and learns to deviate from it (its gradient is not zero at zero weights).
    """

    def __init__(self, dim: int, mode: str = DEFAULT_POOLING) -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise UserInputError(f"pooling must be one of {', '.join(POOLINGS)}; got {mode!r}")
        self.mode = mode
        self.score: nn.Linear | None = None
        if mode == "attention":
            self.score = nn.Linear(dim, 1)
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)

    def weights(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention weights ``[B, N]`` (sum to 1 over the valid items; 0 at masked ones)."""
        if self.score is None:
            raise RuntimeError(f"{self.mode!r} pooling has no attention weights")
        logits = self.score(x).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits.softmax(dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.mode == "attention":
            return (self.weights(x, mask).unsqueeze(-1) * x).sum(dim=1)
        if self.mode == "max":
            if mask is not None:
                x = x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min)
            return x.amax(dim=1)
        if mask is None:
            return x.mean(dim=1)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class ImageEncoder(nn.Module):
    """Region features ``[B, R, F]`` (or one global feature ``[B, F]``, i.e. R = 1) -> ``[B, D]`` unit vectors.

    Each region is projected (optionally with the MLP residual, see :class:`Projection`), the regions are
    pooled (``mean`` | ``max`` | ``attention``), and the result is L2-normalised.

    Mean pooling of a plain projection (no MLP) pools first: ``mean_r(W x_r + b) = W mean_r(x_r) + b``, so the
    ``[B·R, F] x [F, D]`` GEMM (and its weight gradient) shrinks R-fold to ``[B, F] x [F, D]`` — the same
    function up to float rounding. At the default sizes (R = 36, F = 2048, D = 1024) that GEMM was a quarter
    of a training step (``benchmarks/bench_train_profile.py``). ``pool_first = False`` forces the per-region
    path (the reference the benchmark and tests compare against); it is not saved with the weights.
    """

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        pooling: str = DEFAULT_POOLING,
        mlp: bool = DEFAULT_MLP,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.in_dim, self.embed_dim = in_dim, embed_dim
        self.proj = Projection(in_dim, embed_dim, mlp, hidden)
        self.pool = Pooling(embed_dim, pooling)
        self.pool_first = True

    def regions(self, features: Tensor) -> Tensor:
        """Projected regions ``[B, R, D]`` before pooling (a global feature becomes R = 1)."""
        return self.proj(_as_regions(features))

    def pools_first(self) -> bool:
        """Whether :meth:`forward` takes the pool-then-project shortcut: only when the two commute (mean of a
        linear map) and :attr:`pool_first` allows it."""
        return self.pool_first and self.pool.mode == "mean" and self.proj.mlp is None

    def forward(self, features: Tensor) -> Tensor:
        if self.pools_first():
            return l2_normalize(self.proj(_as_regions(features).mean(dim=1)))
        return l2_normalize(self.pool(self.regions(features)))


def _as_regions(features: Tensor) -> Tensor:
    """``[B, R, F]`` as is; one global feature ``[B, F]`` as one region ``[B, 1, F]``."""
    return features.unsqueeze(1) if features.dim() == 2 else features


class FeatureEncoder(nn.Module):
    """Precomputed embeddings ``[B, F]`` -> ``[B, D]`` unit vectors: a feature tower, then L2 norm.

    The image and text towers of "features" datasets, and the single tower of label-based data (e.g. digits,
    F = 64). ``layers`` = 1: one projection (:class:`Projection`, optionally with VSE∞'s residual ``mlp`` of
    width ``hidden``, default D/2); ``layers`` >= 2: an MLP of width ``hidden`` (:func:`feature_mlp`; the
    residual does not apply). Defaults by dataset kind: :data:`FEATURE_TOWERS`.
    """

    def __init__(
        self, in_dim: int, embed_dim: int, mlp: bool = DEFAULT_MLP, layers: int = 1, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.in_dim, self.embed_dim, self.layers = in_dim, embed_dim, layers
        self.proj: nn.Module
        if layers == 1:
            self.proj = Projection(in_dim, embed_dim, mlp, hidden)
        else:
            if mlp:
                raise UserInputError(MLP_ON_DEEP_TOWER.format(layers=layers))
            self.proj = feature_mlp(in_dim, embed_dim, layers, hidden or DEFAULT_FEATURE_TOWER.hidden or embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        out: Tensor = self.proj(features)
        return l2_normalize(out)


MLP_ON_DEEP_TOWER = (
    "--mlp adds VSE∞'s residual to a one-layer projection, but the feature towers have {layers} layers: "
    "pass --mlp-layers 1 with --mlp, or drop --mlp"
)


def reverse_within_length(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first ``lengths[b]`` steps of each row of ``x [B, L, H]``; steps past the length stay put.

    ``lengths [B]`` must lie in ``[0, L]``. The map is its own inverse, so applying it twice restores ``x``.
    """
    return _gather_steps(x, _reversal_index(lengths, x.shape[1]))


def _reversal_index(lengths: Tensor, seq_len: int) -> Tensor:
    """``[B, L]`` step indices that reverse each row within its length: one gather, no loop over the batch."""
    steps = torch.arange(seq_len, device=lengths.device).unsqueeze(0)
    n = lengths.unsqueeze(1)
    return torch.where(steps < n, n - 1 - steps, steps)


def _gather_steps(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, L, H]`` reordered along L by ``index [B, L]``.

    The expansion takes B and L from ``index`` (``-1``), never from ``x``: when ``x`` is a GRU output, the
    ONNX exporter records its length axis as the example's constant, which would freeze the axis.
    """
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _bidirectional(gru_f: nn.Module, gru_b: nn.Module, x: Tensor, reverse: Tensor) -> tuple[Tensor, Tensor]:
    """One bidirectional layer over padded ``x [B, L, I]``: the forward and the backward states ``[B, L, D]``,
    the backward direction read within each length (``reverse [B, L]`` from :func:`_reversal_index`).

    Why the two directions come back separately: only a next layer reads them concatenated ``[B, L, 2D]``, so
    the last layer never builds that copy.
    """
    fwd, _ = gru_f(x)
    bwd, _ = gru_b(_gather_steps(x, reverse))
    return fwd, _gather_steps(bwd, reverse)


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (0 = padding) and ``lengths [B]`` -> ``[B, D]`` unit vectors.

    Word embedding (``word_dim``) -> bidirectional GRU with hidden size D per direction, the two directions
    averaged -> pooling over valid tokens (``mean`` | ``max`` | ``attention``) -> L2 norm.

    The bidirectional GRU is built from pairs of single-layer, forward-only GRUs (``gru_fwd[k]``,
    ``gru_bwd[k]`` for layer k): layer k > 0 reads both directions of layer k - 1 (``[B, L, 2D]``), as in
    ``nn.GRU(bidirectional=True, num_layers=K)``, whose weights map one to one onto these (``weight_ih_l{k}``
    -> ``gru_fwd[k].weight_ih_l0``, ``weight_ih_l{k}_reverse`` -> ``gru_bwd[k].weight_ih_l0``, same for
    ``weight_hh`` and the biases). See the module docstring for why no packed sequences are used.
    """

    takes_tokens = True
    """Reads token ids and lengths (every other tower reads one float tensor): how callers tell them apart."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        word_dim: int = DEFAULT_WORD_DIM,
        num_layers: int = DEFAULT_GRU_LAYERS,
        pooling: str = DEFAULT_POOLING,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise UserInputError(f"the text GRU needs at least one layer; got {num_layers}")
        self.vocab_size, self.embed_dim, self.word_dim, self.num_layers = vocab_size, embed_dim, word_dim, num_layers
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        inputs = [word_dim] + [2 * embed_dim] * (num_layers - 1)
        self.gru_fwd = nn.ModuleList([nn.GRU(n, embed_dim, batch_first=True) for n in inputs])
        self.gru_bwd = nn.ModuleList([nn.GRU(n, embed_dim, batch_first=True) for n in inputs])
        self.pool = Pooling(embed_dim, pooling)

    def valid_mask(self, tokens: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(lengths clipped to [1, L] [B], mask [B, L])``; without ``lengths``, count the non-zero ids."""
        if lengths is None:
            lengths = (tokens != 0).sum(dim=1)
        steps = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        n = (steps < lengths.unsqueeze(1)).sum(dim=1).clamp_min(1)
        return n, steps < n.unsqueeze(1)

    def token_states(self, tokens: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-token states ``[B, L, D]`` (mean of both directions; garbage at padding) and the mask ``[B, L]``."""
        n, mask = self.valid_mask(tokens, lengths)
        reverse = _reversal_index(n, tokens.shape[1])
        fwd, bwd = _bidirectional(self.gru_fwd[0], self.gru_bwd[0], self.embed(tokens), reverse)
        for gru_f, gru_b in zip(self.gru_fwd[1:], self.gru_bwd[1:], strict=True):
            fwd, bwd = _bidirectional(gru_f, gru_b, torch.cat([fwd, bwd], dim=-1), reverse)
        return (fwd + bwd) / 2, mask

    def forward(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        states, mask = self.token_states(tokens, lengths)
        return l2_normalize(self.pool(states, mask))


class DualEncoder(nn.Module):
    """The two towers of cross-modal retrieval: ``image`` and ``text`` (any of the encoders above).

    ``text`` is a :class:`TextEncoder` (``encode_text(tokens, lengths)``), a :class:`FeatureEncoder`
    (``encode_text(features)``, no lengths), or a :class:`HeadOnlyTower` over either.
    """

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image = image
        self.text = text

    def encode_image(self, images: Tensor) -> Tensor:
        """``[B, R, F]`` or ``[B, F]`` -> ``[B, D]``."""
        out: Tensor = self.image(images)
        return out

    def encode_text(self, text: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Token ids ``[B, L]`` (+ ``lengths [B]``) or text features ``[B, F']`` -> ``[B, D]``."""
        if takes_tokens(self.text):
            out: Tensor = self.text(text, lengths)
            return out
        if lengths is not None:
            raise TypeError("this model's text tower takes precomputed features: pass no lengths")
        out = self.text(text)
        return out

    def forward(self, images: Tensor, text: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(image embeddings [B, D], text embeddings [B', D])``."""
        return self.encode_image(images), self.encode_text(text, lengths)


class SingleTower(nn.Module):
    """One feature tower (a :class:`FeatureEncoder`, or a :class:`HeadOnlyTower`) for label-based retrieval, where queries and gallery share a modality.

    It offers the same ``encode_image`` / ``encode_text`` methods as :class:`DualEncoder` (both the same
    tower), so evaluation code can treat it as a dual encoder; ``forward(x)`` returns ``[B, D]``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, features: Tensor) -> Tensor:
        out: Tensor = self.encoder(features)
        return out

    def encode(self, features: Tensor) -> Tensor:
        """``[B, F]`` -> ``[B, D]``."""
        return self(features)

    encode_image = encode
    encode_text = encode


def takes_tokens(tower: nn.Module) -> bool:
    """Whether ``tower`` reads token ids and lengths (a caption tower) rather than one float tensor."""
    return bool(getattr(tower, "takes_tokens", False))


def adapter_layer(in_dim: int, out_dim: int) -> nn.Linear:
    """A head-only run's adapter, Linear(F -> D), starting where it changes nothing: the identity when F = D
    (zero-padded, ``[I; 0]``, when F < D: inner products, hence cosine, are kept exactly); when F > D, a random
    semi-orthogonal map (orthonormal rows: a random projection, cosine kept approximately). Bias zero."""
    layer = nn.Linear(in_dim, out_dim)
    if in_dim <= out_dim:
        nn.init.eye_(layer.weight)
    else:
        nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class HeadOnlyTower(nn.Module):
    """The tower of a head-only run (``--encoder identity`` or ``frozen``): ``[B, ...] -> [B, D]`` unit vectors.

    ``identity`` (``tower`` None): features ``[B, F]`` -> L2 norm (no parameters), or with an adapter
    L2 -> Linear(F -> D) (:func:`adapter_layer`, starting at the identity) -> L2. ``frozen``: a trained run's
    tower (any of the towers above) embeds the input; its parameters never learn (``requires_grad`` off) and it
    stays in eval mode whatever mode the model is put in; then the optional adapter (D -> D) and L2.

    ``in_dim``: what the tower reads (F for identity; the trained tower's input size, 0 for a caption tower);
    ``feature_dim``: what the adapter reads (F, or the trained tower's D); ``embed_dim``: the output size D.
    ``embedded_inputs``: the inputs are already the frozen tower's outputs (training sets it while it feeds
    embeddings computed once per split, see :class:`gssf_cli.modeling.model.EmbeddedDataset`; not saved with weights).
    """

    def __init__(self, feature_dim: int, embed_dim: int, adapter: bool, tower: nn.Module | None = None) -> None:
        super().__init__()
        if not adapter and feature_dim != embed_dim:
            raise ValueError(f"without an adapter a head-only tower keeps its size ({feature_dim} -> {embed_dim})")
        self.tower = tower
        if tower is not None:
            tower.requires_grad_(False)
            tower.eval()
        self.adapter = adapter_layer(feature_dim, embed_dim) if adapter else None
        self.feature_dim, self.embed_dim = feature_dim, embed_dim
        self.in_dim = int(getattr(tower, "in_dim", 0)) if tower is not None else feature_dim
        self.embedded_inputs = False

    @property
    def takes_tokens(self) -> bool:
        return self.tower is not None and takes_tokens(self.tower) and not self.embedded_inputs

    def train(self, mode: bool = True) -> HeadOnlyTower:
        super().train(mode)
        if self.tower is not None:
            self.tower.eval()
        return self

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.tower is not None and not self.embedded_inputs:
            x = self.tower(x, lengths) if takes_tokens(self.tower) else self.tower(x)
        return self.adapt(x)

    def adapt(self, features: Tensor) -> Tensor:
        """What the tower does after its frozen part: ``[B, feature_dim]`` -> L2 (-> adapter -> L2) ``[B, D]``.
        (A frozen tower's outputs are unit vectors already: the first L2 norm keeps them.)"""
        x = l2_normalize(features)
        if self.adapter is not None:
            x = l2_normalize(self.adapter(x))
        return x


def head_only_towers(model: nn.Module) -> list[HeadOnlyTower]:
    """The :class:`HeadOnlyTower` s of an encoder (none for trained towers)."""
    return [m for m in model.modules() if isinstance(m, HeadOnlyTower)]


def encoder_kind(model: nn.Module) -> tuple[str, bool]:
    """What an encoder's towers are, as ``--encoder`` says it (``trained``, ``identity``, ``frozen``), and whether
    they have adapters."""
    towers = head_only_towers(model)
    if not towers:
        return "trained", False
    return ("identity" if towers[0].tower is None else "frozen"), any(t.adapter is not None for t in towers)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per direct child (e.g. ``image``, ``text``), ``own`` for the model's direct parameters if
    any, and ``total``; the parts sum to ``total``. Shared parameters are counted once, at first sight."""
    seen: set[int] = set()

    def count(params: Any) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    counts = {name: count(child.parameters()) for name, child in model.named_children()}
    own = count(model.parameters(recurse=False))
    if own:
        counts["own"] = own
    counts["total"] = sum(counts.values())
    return counts
