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


def score_distributions(positives: np.ndarray, negatives: np.ndarray, title: str) -> Any:
    """Histograms of matching-pair and non-matching-pair scores (GSSF paper, Fig. 5).

    Well-separated distributions mean a margin between positives and negatives; overlap is where
    retrieval errors come from.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    low = float(min(positives.min(), negatives.min()))
    high = float(max(positives.max(), negatives.max()))
    bins = np.linspace(low, high if high > low else low + 1.0, 60)
    ax.hist(negatives, bins=bins, density=True, alpha=0.6, label=f"negative pairs (n={len(negatives):,})")
    ax.hist(positives, bins=bins, density=True, alpha=0.6, label=f"positive pairs (n={len(positives):,})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
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


def close(fig: Any) -> None:
    _pyplot().close(fig)


def metric_heatmap(matrix: np.ndarray, name: str, max_channels: int = 256) -> Any:
    """The learned W ⊙ U as a heatmap (GSSF paper, Fig. 4): where channels interact, and how strongly.

    Large D is shown as its top-left ``max_channels`` x ``max_channels`` corner so blocks stay visible.
    """
    plt = _pyplot()
    shown = matrix[:max_channels, :max_channels]
    limit = float(np.abs(shown).max()) or 1.0
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    corner = "" if shown.shape == matrix.shape else f" (first {shown.shape[0]} of {matrix.shape[0]} channels)"
    ax.set_title(f"learned W ⊙ U, {name}{corner}")
    ax.set_xlabel("text channel")
    ax.set_ylabel("image channel")
    fig.tight_layout()
    return fig


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
