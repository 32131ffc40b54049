"""Figures a person would rather look at than read; logged to MLflow as artifacts.

Matplotlib is imported lazily with the non-interactive Agg backend (no display on servers or CI).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gssf_cli.evaluation.seeds import spread


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class ScoreSample:
    """Scores of one system on a sample of a split's pairs: ``positives [P]`` (an image and its own captions,
    or two items of one label) and ``negatives [M]`` (every other pair of the sampled rows); ``label`` names the
    system in its panel, ``score`` what scored the pairs (the x axis)."""

    label: str
    positives: np.ndarray
    negatives: np.ndarray
    score: str = "score"

    def auc(self) -> float:
        """P(a positive outscores a negative), ties half: 1 is a clean margin, 0.5 no separation at all."""
        ordered = np.sort(self.negatives)
        below = np.searchsorted(ordered, self.positives, side="left")
        ties = np.searchsorted(ordered, self.positives, side="right") - below
        return float((below + 0.5 * ties).sum() / (len(self.positives) * len(self.negatives)))

    def d_prime(self) -> float:
        """The gap between the means in pooled standard deviations: separation on any score's scale."""
        spread = np.sqrt((self.positives.var() + self.negatives.var()) / 2)
        return float((self.positives.mean() - self.negatives.mean()) / spread) if spread > 0 else float("nan")


def similarity_distributions(samples: Sequence[ScoreSample], title: str) -> Any:
    """Density histograms of positive- and negative-pair scores, one panel per system side by side (GSSF paper,
    Fig. 5): the further apart the two, the wider the margin; where they overlap, retrieval errs.

    Each panel has its own x axis (a learned metric need not score on cosine's scale) and says how well its
    scores separate the pairs on a scale-free footing: AUC (P(positive > negative)) and d′ (the gap between
    the means in pooled standard deviations), so panels compare whatever their scales.
    """
    plt = _pyplot()
    columns = min(len(samples), 3)
    rows = -(-len(samples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows + 0.6), squeeze=False)
    for ax, sample in zip(axes.ravel(), samples, strict=False):
        low = float(min(sample.positives.min(), sample.negatives.min()))
        high = float(max(sample.positives.max(), sample.negatives.max()))
        bins = np.linspace(low, high if high > low else low + 1.0, 60)
        for scores, name, colour in (
            (sample.negatives, "negative", "tab:red"),
            (sample.positives, "positive", "tab:blue"),
        ):
            ax.hist(
                scores, bins=bins, density=True, alpha=0.55, color=colour, label=f"{name} pairs (n = {len(scores):,})"
            )
            mean = float(np.mean(scores))
            ax.axvline(mean, color=colour, linestyle="--", linewidth=1.0, label=f"{name} mean {mean:.3g}")
        ax.set_title(f"{sample.label}\nAUC {sample.auc():.3f}, d′ {sample.d_prime():.2f}", fontsize="small")
        ax.set_xlabel(sample.score)
        ax.set_ylabel("density")
        ax.legend(fontsize="x-small", loc="best")
    for ax in axes.ravel()[len(samples) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return fig


def recall_curve(curves: Mapping[str, Mapping[int, float]], title: str, ylabel: str = "R@K (%)") -> Any:
    """R@K against K, one line per direction (e.g. image→text, text→image)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def epoch_curves(panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], title: str) -> Any:
    """Per-epoch values of a few scalars, one panel each, side by side: ``panels[scalar][condition]`` holds one
    sequence per seed (epoch 1 first). Each condition is a line, the mean over its seeds, with the seeds' range
    shaded, so a reader sees both where a learned scalar goes and how much the seeds agree."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (scalar, conditions) in zip(axes[0], panels.items(), strict=True):
        for index, (condition, seeds) in enumerate(conditions.items()):
            length = min(len(values) for values in seeds)
            rows = np.array([values[:length] for values in seeds], dtype=float)
            epochs = np.arange(1, length + 1)
            colour = colours[index % len(colours)]
            ax.plot(epochs, rows.mean(axis=0), color=colour, label=condition)
            if len(rows) > 1:
                ax.fill_between(epochs, rows.min(axis=0), rows.max(axis=0), color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_title(scalar)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    _pyplot().close(fig)


HEATMAP_SIZE = 64
"""Channels per side of the heatmap's regular-interval view (as the GSSF paper reduces its Fig. 4)."""
MIN_BLOCK_PIXELS = 4
"""Channels of each block the regular view must keep for its blocks to be read there (then their boundaries are
drawn); with fewer, lines would come every pixel or two and a block shows at most a couple of its entries."""
ZOOM_BLOCKS = 8
"""Whole blocks the heatmap shows at full resolution when its regular view cannot: few enough to read each."""


def metric_heatmap(
    matrix: np.ndarray, name: str, block_size: int | None = None, run: str | None = None, size: int = HEATMAP_SIZE
) -> Any:
    """The learned W ⊙ U ``[D, D]`` of a metric head (GSSF paper, Fig. 4): which channels interact, how strongly.

    The diagonal (near 1) and the entries off it (inside the blocks, often |w| of a few hundredths) are on scales
    an order of magnitude apart, so each gets a panel and a symmetric colour scale of its own: a strip of the
    diagonal ``w_mm`` and the matrix with its diagonal masked. Large D is reduced to ``size`` x ``size`` at
    regular intervals (every s-th channel, s = ceil(D / size)), as the paper does; small D is shown whole.
    Block boundaries (every d channels) are drawn where the view keeps at least ``MIN_BLOCK_PIXELS`` channels of
    each block. Where it keeps fewer (d < 4s; for d < 2s no two channels of the view share a block, so its
    off-diagonal is all zeros) a third panel shows a few whole blocks, picked at regular intervals along the
    diagonal, at full resolution on the same scale, so what the blocks learned stays visible.

    ``block_size``: d (``None`` for members without blocks: then d = 1 if nothing is off the diagonal, else D);
    ``run``: what the title calls the run (its name and id).
    """
    plt = _pyplot()
    dim = matrix.shape[0]
    off = _off_diagonal(matrix)
    block = block_size or (1 if not np.any(off) else dim)
    stride = -(-dim // size)
    picked = np.arange(0, dim, stride)
    off_limit = float(np.abs(off).max()) or 1.0
    zoom = _zoom_channels(dim, block, stride, size)
    lines = 1 < block < dim and block >= MIN_BLOCK_PIXELS * stride
    side, left, top, gap = 4.2, 2.75, 0.95, 1.0
    bottom = 1.3 if zoom is not None and len(zoom[1]) > 4 else 0.7
    width = left + side + (gap + side if zoom is not None else 0.0) + 1.4
    height = bottom + side + top
    fig = plt.figure(figsize=(width, height))

    def box(x: float, w: float) -> Any:
        return fig.add_axes((x / width, bottom / height, w / width, side / height))

    _diagonal_strip(fig, box(1.35, 0.4), box(0.95, 0.15), np.diag(matrix), picked)
    matrix_ax = box(left, side)
    image = matrix_ax.imshow(
        _masked_diagonal(matrix[np.ix_(picked, picked)]), cmap=_off_cmap(plt), vmin=-off_limit, vmax=off_limit,
        interpolation="nearest",
    )  # fmt: skip
    starts = [-(-b * block // stride) for b in range(dim // block)] if lines and dim // block <= 8 else None
    _channel_ticks(matrix_ax.xaxis, picked, starts)
    _channel_ticks(matrix_ax.yaxis, picked, starts)
    matrix_ax.set_ylabel("image channel m")
    matrix_ax.set_xlabel("text channel n" + (f" (one in {stride} of {dim})" if stride > 1 else ""))
    reduced = "" if stride == 1 else f"\n{len(picked)} x {len(picked)} at regular intervals"
    if zoom is not None:
        few = f"it keeps only {block // stride} channels of each block" if block >= 2 * stride else ""
        reduced += f": {few or 'no two of its channels share a block'} (d = {block}, s = {stride})"
    nothing = "" if np.any(off) else ": all zero, no channel interacts with another"
    matrix_ax.set_title(f"off the diagonal (diagonal masked{nothing}){reduced}", fontsize="small")
    if lines:
        _block_lines(matrix_ax, [-(-b * block // stride) - 0.5 for b in range(1, dim // block)])
    right = left + side
    if zoom is not None:
        _zoom_panel(box(right + gap, side), matrix, zoom, block, off_limit)
        right += gap + side
    fig.colorbar(image, cax=box(right + 0.25, 0.15)).set_label("w_mn, m ≠ n")
    title = f"learned W ⊙ U, {name}: d = {block}, N = D/d = {dim // block} blocks, D = {dim}"
    fig.suptitle(title + (f"\nrun {run}" if run else ""), fontsize="medium", y=1 - 0.12 / height, va="top")
    return fig


def _diagonal_strip(fig: Any, ax: Any, cax: Any, diagonal: np.ndarray, picked: np.ndarray) -> None:
    """The diagonal ``[D]`` at the view's channels ``picked`` as a column beside the matrix (its rows), on a
    symmetric scale of its own; the title gives its range over all D channels."""
    limit = float(np.abs(diagonal).max()) or 1.0
    strip = ax.imshow(
        diagonal[picked][:, None], cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"diagonal w_mm\n{diagonal.min():.3g} to {diagonal.max():.3g}", fontsize="small")
    colorbar = fig.colorbar(strip, cax=cax)
    cax.yaxis.set_ticks_position("left")
    cax.yaxis.set_label_position("left")
    colorbar.set_label("w_mm")


def _zoom_panel(ax: Any, matrix: np.ndarray, zoom: tuple[np.ndarray, list[int], int], block: int, limit: float) -> None:
    """Whole blocks (``zoom``: see :func:`_zoom_channels`) at full resolution, diagonal masked, on the
    off-diagonal panel's scale ``±limit``; ticks name each block's channels."""
    channels, blocks, per_block = zoom
    ax.imshow(
        _masked_diagonal(matrix[np.ix_(channels, channels)]), cmap=_off_cmap(_pyplot()), vmin=-limit, vmax=limit,
        interpolation="nearest",
    )  # fmt: skip
    _block_lines(ax, [k * per_block - 0.5 for k in range(1, len(blocks))])
    centres = [k * per_block + (per_block - 1) / 2 for k in range(len(blocks))]
    names = [f"{b * block}–{(b + 1) * block - 1}" for b in blocks]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(centres)
        axis.set_ticklabels(names, fontsize="x-small")
    if len(names) > 4:
        ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel("text channels (one block each)")
    dim = matrix.shape[0]
    ax.set_title(
        f"inside {len(blocks)} of the {dim // block} blocks\n(regular intervals, full resolution)", fontsize="small"
    )


def _off_diagonal(matrix: np.ndarray) -> np.ndarray:
    return matrix - np.diag(np.diag(matrix))


def _masked_diagonal(matrix: np.ndarray) -> np.ma.MaskedArray:
    return np.ma.masked_array(matrix, mask=np.eye(len(matrix), dtype=bool))


def _off_cmap(plt: Any) -> Any:
    """The diverging map of the off-diagonal panels, the masked diagonal in grey (not white, which means 0)."""
    return plt.get_cmap("RdBu_r").with_extremes(bad="0.75")


def _zoom_channels(dim: int, block: int, stride: int, size: int) -> tuple[np.ndarray, list[int], int] | None:
    """Channels of whole blocks (at most ``ZOOM_BLOCKS``, at most ``size`` channels, a block strided to fit when
    d > ``size``) picked at regular intervals along the diagonal, the blocks, and channels kept per block;
    ``None`` when the regular view already shows the inside of the blocks (d >= ``MIN_BLOCK_PIXELS`` s) or
    there are no blocks."""
    if not 1 < block < dim or block >= MIN_BLOCK_PIXELS * stride:
        return None
    step = -(-block // size)
    count = max(1, min(size // block, ZOOM_BLOCKS))
    blocks = sorted({int(b) for b in np.linspace(0, dim // block - 1, count).round()})
    channels = np.concatenate([np.arange(b * block, (b + 1) * block, step) for b in blocks])
    return channels, blocks, len(range(0, block, step))


def _channel_ticks(axis: Any, picked: np.ndarray, positions: Sequence[int] | None = None) -> None:
    """Ticks of a reduced view (at ``positions``, else every quarter and the last) labelled with the original
    channel numbers."""
    if positions is None:
        step = max(1, len(picked) // 4)
        positions = list(range(0, len(picked), step))
        if len(picked) - 1 - positions[-1] >= step / 2:
            positions.append(len(picked) - 1)
    axis.set_ticks(positions)
    axis.set_ticklabels([str(picked[p]) for p in positions])


def _block_lines(ax: Any, positions: Sequence[float]) -> None:
    for position in sorted(set(positions)):
        ax.axhline(position, color="0.2", linewidth=0.6, alpha=0.6, gid="block boundary")
        ax.axvline(position, color="0.2", linewidth=0.6, alpha=0.6, gid="block boundary")


@dataclass(frozen=True)
class BlockSizeTrial:
    """One tune trial as the block-size figure draws it: plain values, so plotting needs no tune types."""

    block_size: int
    metric: float
    head_params: int
    finished: bool
    """It ran its whole budget (those make the mean ± std when sizes ran with several seeds)."""
    stopped_early: bool
    """The scheduler stopped it before its budget (drawn hollow)."""
    family: str = "embedding"
    """What scored pairs: ``embedding`` (pooled embeddings) or the interaction (``scan-t2i``, ...): with several
    families in one search, each is a series of its own, against N = D/d as in the paper's Fig. 3."""


@dataclass(frozen=True)
class BlockSizeAxes:
    """What the axes say: the metric tuned (``mode`` max or min), the embedding width D and the title's subject."""

    metric: str
    mode: str
    embed_dim: int
    subject: str


def block_size_figure(trials: Sequence[BlockSizeTrial], axes: BlockSizeAxes) -> Any:
    """The metric against the block size (log2 axis; every trial a dot — hollow if the scheduler stopped it
    before its budget — and the best per size a line, or, when a size ran with several seeds, the mean over its
    finished trials with ± one sample std as error bars) with the metric head's parameter count on a second
    axis: the accuracy/size trade-off of the GSSF paper's Fig. 3. ``--scheduler fifo`` gives every size the
    full budget, which is what that figure compares."""
    if not trials:
        return None
    if len({t.family for t in trials}) > 1:
        return _families_figure(trials, axes)

    plt = _pyplot()

    pick = max if axes.mode == "max" else min
    sizes = sorted({t.block_size for t in trials})
    best = [pick(t.metric for t in trials if t.block_size == size) for size in sizes]
    params = [max(t.head_params for t in trials if t.block_size == size) for size in sizes]
    finished = {
        size: spread(t.metric for t in trials if t.block_size == size and t.finished)
        for size in sizes
        if any(t.block_size == size and t.finished for t in trials)
    }
    seeded = any(s.n > 1 for s in finished.values())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _trial_dots(ax, trials)
    if seeded:
        shown = sorted(finished)
        ax.errorbar(
            shown,
            [finished[size].mean for size in shown],
            yerr=[finished[size].std for size in shown],
            color="tab:blue",
            capsize=4,
            label=f"{axes.metric}, mean ± std over finished trials (n = {min(s.n for s in finished.values())}"
            f"–{max(s.n for s in finished.values())})",
        )
    else:
        ax.plot(sizes, best, color="tab:blue", label=f"{axes.metric}, best per size")
    _log2_axes(ax, sizes, f"block size d (D = {axes.embed_dim})", axes)
    twin = _parameter_axis(ax, sizes, params)
    handles, labels = ax.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    ax.legend(handles + twin_handles, labels + twin_labels, loc="best", fontsize="small")
    ax.set_title(f"block-size search, {axes.subject}")
    fig.tight_layout()
    return fig


FAMILY_COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:purple")


def _families_figure(trials: Sequence[BlockSizeTrial], axes: BlockSizeAxes) -> Any:
    """Both families of the GSSF paper in one figure: the metric against N = D/d (blocks; d = 1 is N = D, the
    diagonal end), one series per family — its best per size, or the mean ± std of its finished trials when a
    size ran with several seeds — every trial a dot in the family's colour (hollow if stopped early)."""

    plt = _pyplot()
    pick = max if axes.mode == "max" else min
    fig, ax = plt.subplots(figsize=(6.5, 4))
    blocks = sorted({axes.embed_dim // t.block_size for t in trials})
    for family, colour in zip(sorted({t.family for t in trials}), FAMILY_COLOURS * 4, strict=False):
        own = [t for t in trials if t.family == family]
        sizes = sorted({t.block_size for t in own}, reverse=True)
        n = [axes.embed_dim // size for size in sizes]
        finished = {size: spread(t.metric for t in own if t.block_size == size and t.finished) for size in sizes
                    if any(t.block_size == size and t.finished for t in own)}  # fmt: skip
        if any(s.n > 1 for s in finished.values()):
            shown = sorted(finished, reverse=True)
            ax.errorbar([axes.embed_dim // size for size in shown], [finished[size].mean for size in shown],
                        yerr=[finished[size].std for size in shown], color=colour, capsize=4,
                        label=f"{family}, mean ± std")  # fmt: skip
        else:
            best = [pick(t.metric for t in own if t.block_size == size) for size in sizes]
            ax.plot(n, best, color=colour, label=f"{family}, best per N")
        for stopped in (False, True):
            group = [t for t in own if t.stopped_early == stopped]
            if group:
                ax.scatter([axes.embed_dim // t.block_size for t in group], [t.metric for t in group], s=30,
                           zorder=3, facecolors="white" if stopped else colour, edgecolors=colour)  # fmt: skip
    _log2_axes(ax, blocks, f"blocks N = D/d (D = {axes.embed_dim}; N = D is the diagonal, N = 1 one dense block)", axes)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(f"block-size search, embedding and interaction families ({axes.subject})")
    fig.tight_layout()
    return fig


def _log2_axes(ax: Any, ticks: list[int], xlabel: str, axes: BlockSizeAxes) -> None:
    """A block-size figure's axes: x on a log2 scale with exactly ``ticks`` labelled, y the tuned metric."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{axes.metric} ({'higher' if axes.mode == 'max' else 'lower'} is better)")
    ax.grid(True, which="both", alpha=0.3)


def _trial_dots(ax: Any, trials: Sequence[BlockSizeTrial]) -> None:
    """Every trial a dot at (block size, metric): filled if it ran its budget, hollow if stopped early."""
    for stopped in (False, True):
        group = [t for t in trials if t.stopped_early == stopped]
        if group:
            ax.scatter(
                [t.block_size for t in group],
                [t.metric for t in group],
                s=40,
                zorder=3,
                facecolors="white" if stopped else "tab:blue",
                edgecolors="tab:blue",
                label="trial stopped early" if stopped else "trial",
            )


def _parameter_axis(ax: Any, sizes: list[int], params: list[int]) -> Any:
    """A second y axis on ``ax``: the metric head's parameter count per block size (log scale when all are > 0)."""
    from matplotlib.ticker import NullFormatter

    twin = ax.twinx()
    twin.plot(sizes, params, marker="s", linestyle="--", color="tab:orange", label="metric-head parameters")
    twin.set_ylabel("metric-head parameters")
    if all(p > 0 for p in params):
        twin.set_yscale("log")
        twin.yaxis.set_minor_formatter(NullFormatter())
    twin.set_yticks(params)
    twin.set_yticklabels([f"{p:,}" for p in params])
    return twin


def forest_plot(rows: list[Any], title: str) -> Any:
    """Differences (compared - baseline) with their confidence intervals, one panel per metric (each on its
    own scale: recalls in %, rSum, ranks, fractions) and one row per compared run: a filled dot where the
    difference is significant, hollow where not, and a line at zero. ``rows``:
    :class:`gssf_cli.evaluation.comparison.MetricComparison` objects."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(row.metric for row in rows))
    compared = list(dict.fromkeys(row.compared for row in rows))
    height = max(2.5, 0.35 * len(compared) * len(metrics) + 0.45 * len(metrics) + 1.0)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, height), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        mine = [row for row in rows if row.metric == metric]
        ys = np.arange(len(mine))[::-1]
        for y, row in zip(ys, mine, strict=True):
            color = "tab:blue" if row.verdict == "n.s." else ("tab:green" if row.verdict == "better" else "tab:red")
            ax.errorbar(
                row.difference,
                y,
                xerr=[[row.difference - row.ci_low], [row.ci_high - row.difference]],
                fmt="o",
                color=color,
                markerfacecolor=color if row.significant else "white",
                capsize=3,
            )
            ax.annotate(
                f"p={row.p_value:.3g}", (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                textcoords="offset points", va="center", fontsize="x-small",
            )  # fmt: skip
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        reach = max(max(abs(row.ci_low), abs(row.ci_high), abs(row.difference)) for row in mine)
        ax.set_xlim(-1.15 * reach, 1.15 * reach) if reach > 0 else ax.set_xlim(-1.0, 1.0)  # zero in the middle
        ax.set_yticks(ys)
        ax.set_yticklabels([row.compared for row in mine] if len(compared) > 1 else [""] * len(mine), fontsize="small")
        ax.set_ylim(-0.7, len(mine) - 0.3)
        direction = "higher" if mine[0].higher_is_better else "lower"
        ax.set_ylabel(f"{metric}\n({direction} better)", rotation=0, ha="right", va="center", fontsize="small")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0, 0].set_title(title, fontsize="medium")
    axes[-1, 0].set_xlabel("difference (compared - baseline)")
    fig.tight_layout()
    return fig
