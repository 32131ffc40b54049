"""gssf_cli.evaluation.plots: the tune's block-size figure (mean ± std over seeds as error bars; both families
against N = D/d), the learned W ⊙ U (diagonal and off-diagonal on scales of their own, reduced at regular
intervals, blocks drawn) and the positive/negative score distributions side by side."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gssf_cli.training.tune_results import block_size_axes, block_size_trials
from tests.unit.training.test_tune_results import _trial


def test_the_block_size_figure_draws_error_bars_over_seeds() -> None:
    from types import SimpleNamespace

    from gssf_cli.evaluation import plots

    trials = [_trial(i, block, seed, 250.0 + block + seed) for i, (block, seed) in enumerate(
        [(4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (8, 2)]
    )]  # fmt: skip
    plan = SimpleNamespace(
        mode="max", metric="rsum", base=SimpleNamespace(embed_dim=64, metric="bdiag", embeds_to_embed_dim=lambda: True)
    )
    plan.tunes = lambda name: False
    figure = plots.block_size_figure(block_size_trials(trials), block_size_axes(plan))  # type: ignore[arg-type]
    try:
        ax = figure.axes[0]
        assert any("mean ± std" in text.get_text() for text in ax.get_legend().get_texts())
        assert ax.containers, "error bars expected"
    finally:
        plots.close(figure)


def test_with_both_families_the_figure_draws_one_curve_each_against_the_number_of_blocks() -> None:
    from gssf_cli.evaluation import plots

    trials = [
        plots.BlockSizeTrial(block, 200.0 + block + (100.0 if family != "embedding" else 0.0), 0, True, False, family)
        for family in ("embedding", "scan-t2i")
        for block in (2, 8, 32)
    ]
    axes = plots.BlockSizeAxes(metric="rsum", mode="max", embed_dim=64, subject="gssf")
    figure = plots.block_size_figure(trials, axes)
    try:
        ax = figure.axes[0]
        curves = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        assert set(curves) == {"embedding, best per N", "scan-t2i, best per N"}
        assert all(sorted(x) == [2, 8, 32] for x in curves.values())  # N = 64 / d for d = 32, 8, 2
        assert ax.get_xlabel().startswith("blocks N = D/d (D = 64")
        heights = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert heights["scan-t2i, best per N"] == [332.0, 308.0, 302.0]  # d = 32, 8, 2 in order of N
    finally:
        plots.close(figure)


def test_trials_take_their_family_from_the_tuned_interaction_or_the_base() -> None:
    from gssf_cli.training.tune_results import family_of

    assert family_of("none") == "embedding" and family_of("maxsim") == "maxsim"
    tuned = [_trial(0, 8, 0, 1.0)]
    tuned[0].values["interaction"] = "scan-i2t"
    assert [t.family for t in block_size_trials(tuned)] == ["scan-i2t"]
    assert [t.family for t in block_size_trials([_trial(1, 8, 0, 1.0)], "maxsim")] == ["maxsim"]


def _block_matrix(dim: int, block: int, diagonal: float = 1.0, entry: float = 0.05) -> np.ndarray:
    """W ⊙ U with ``diagonal`` on the diagonal and ±``entry`` (a checkerboard of signs) elsewhere in the blocks."""
    signs = np.where(np.add.outer(np.arange(block), np.arange(block)) % 2 == 0, entry, -entry)
    matrix = np.kron(np.eye(dim // block), signs)
    np.fill_diagonal(matrix, diagonal)
    return matrix


def _images(figure: Any) -> dict[str, Any]:
    """The heatmap's images by what their axes show: ``diagonal``, ``off`` (the regular view), ``inside``."""
    found = {}
    for ax in figure.axes:
        title = ax.get_title()
        for image in ax.get_images():
            key = "diagonal" if title.startswith("diagonal") else "off" if title.startswith("off") else "inside"
            found[key] = image
    return found


def _boundaries(image: Any) -> list[float]:
    """Where the block boundaries cross the y axis (the horizontal lines; the vertical ones mirror them)."""
    lines = [line for line in image.axes.lines if line.get_gid() == "block boundary"]
    return sorted(float(line.get_ydata()[0]) for line in lines if line.get_ydata()[0] == line.get_ydata()[1])


def test_the_heatmap_puts_the_off_diagonal_on_its_own_scale_with_the_blocks_drawn() -> None:
    from gssf_cli.evaluation import plots

    matrix = _block_matrix(64, 16)
    figure = plots.metric_heatmap(matrix, "gssf", block_size=16, run="train-gssf-d16 (1a2b3c4d)")
    try:
        images = _images(figure)
        assert set(images) == {"diagonal", "off"}, "64 channels are shown whole: no third panel"
        assert images["off"].get_clim() == pytest.approx((-0.05, 0.05)), "the scale of the blocks, not of 1.0"
        assert images["diagonal"].get_clim() == pytest.approx((-1.0, 1.0))
        shown = images["off"].get_array()
        assert shown.shape == (64, 64) and shown.mask.diagonal().all() and not shown.mask.sum() - 64
        assert _boundaries(images["off"]) == [15.5, 31.5, 47.5]
        title = figure.texts[0].get_text()
        assert "d = 16" in title and "N = D/d = 4" in title and "train-gssf-d16 (1a2b3c4d)" in title
        assert images["off"].colorbar.ax is not images["diagonal"].colorbar.ax, "a colorbar each"
    finally:
        plots.close(figure)


def test_a_large_matrix_is_reduced_at_regular_intervals_not_cut_to_its_corner() -> None:
    from gssf_cli.evaluation import plots

    dim, block = 512, 64
    matrix = _block_matrix(dim, block)
    matrix[np.arange(0, dim, 8), np.arange(0, dim, 8)] = 2.0
    matrix[dim - 8, dim - 16] = 0.5
    figure = plots.metric_heatmap(matrix, "gssf", block_size=block)
    try:
        images = _images(figure)
        off, diagonal = images["off"].get_array(), images["diagonal"].get_array()
        assert off.shape == (64, 64) and diagonal.shape == (64, 1)
        assert np.all(diagonal == 2.0), "every 8th channel (512 / 64), from channel 0"
        assert off[63, 62] == 0.5, "the last block is in the view: not the top-left corner"
        assert images["off"].get_clim() == pytest.approx((-0.5, 0.5))
        assert _boundaries(images["off"]) == [8 * k - 0.5 for k in range(1, 8)], "every d = 64 channels, / 8"
    finally:
        plots.close(figure)


def test_blocks_the_regular_view_cannot_resolve_are_shown_whole_beside_it() -> None:
    """D = 1024, d = 16: one channel in 16 keeps one channel of each block, so the view's off-diagonal is all
    zeros and no lines are drawn there; a third panel shows whole blocks at full resolution, on the same scale."""
    from gssf_cli.evaluation import plots

    figure = plots.metric_heatmap(_block_matrix(1024, 16), "bdiag", block_size=16)
    try:
        images = _images(figure)
        assert set(images) == {"diagonal", "off", "inside"}
        assert not np.any(images["off"].get_array()) and not _boundaries(images["off"])
        inside = images["inside"].get_array()
        assert inside.shape == (64, 64) and np.abs(inside).max() == pytest.approx(0.05)
        assert images["inside"].get_clim() == images["off"].get_clim() == pytest.approx((-0.05, 0.05))
        assert _boundaries(images["inside"]) == [15.5, 31.5, 47.5]
        assert [t.get_text() for t in images["inside"].axes.get_xticklabels()] == [
            "0–15", "336–351", "672–687", "1008–1023",
        ]  # fmt: skip
    finally:
        plots.close(figure)


def test_a_metric_without_blocks_draws_no_boundaries() -> None:
    from gssf_cli.evaluation import plots

    for matrix, block in ((np.diag(np.linspace(0.5, 1.5, 32)), "d = 1,"), (np.full((32, 32), 0.1), "d = 32,")):
        figure = plots.metric_heatmap(matrix, "m")
        try:
            assert set(_images(figure)) == {"diagonal", "off"} and not _boundaries(_images(figure)["off"])
            assert block in figure.texts[0].get_text()
        finally:
            plots.close(figure)


def test_similarity_distributions_draw_one_panel_per_system_with_its_separation() -> None:
    from gssf_cli.evaluation import plots

    rng = np.random.default_rng(0)
    samples = [
        plots.ScoreSample(name, rng.normal(gap, 0.1, 200), rng.normal(0.0, 0.1, 5000), f"score ({name})")
        for name, gap in (("cosine", 0.2), ("gssf-d8", 0.4))
    ]
    assert samples[1].auc() > samples[0].auc() > 0.8 and samples[1].d_prime() == pytest.approx(4.0, rel=0.1)
    assert plots.ScoreSample("tie", np.zeros(3), np.zeros(5)).auc() == 0.5
    figure = plots.similarity_distributions(samples, "test split")
    try:
        panels = [ax for ax in figure.axes if ax.get_visible()]
        assert [ax.get_xlabel() for ax in panels] == ["score (cosine)", "score (gssf-d8)"]
        for ax in panels:
            assert [" ".join(t.get_text().split()[:2]) for t in ax.get_legend().get_texts()] == [
                "negative pairs", "negative mean", "positive pairs", "positive mean",
            ]  # fmt: skip
            assert "AUC" in ax.get_title() and "d′" in ax.get_title()
    finally:
        plots.close(figure)


def test_epoch_curves_draw_each_conditions_seed_mean_with_its_range_in_a_panel_per_scalar() -> None:
    from gssf_cli.evaluation import plots

    panels = {
        "λ": {"balanced": [[0.6, 0.5, 0.4], [0.8, 0.7, 0.6]], "noisy": [[0.6, 0.4], [0.2, 0.1, 0.0]]},
        "τ": {"balanced": [[0.05, 0.04, 0.03], [0.05, 0.04, 0.03]], "noisy": [[0.05, 0.05], [0.05, 0.05, 0.05]]},
    }
    figure = plots.epoch_curves(panels, "distillation's learned scalars")
    try:
        lam, tau = figure.axes
        assert [ax.get_title() for ax in (lam, tau)] == ["λ", "τ"]
        balanced, noisy = lam.get_lines()
        np.testing.assert_allclose(balanced.get_ydata(), [0.7, 0.6, 0.5])
        np.testing.assert_allclose(noisy.get_xdata(), [1, 2])  # the seeds' common epochs
        np.testing.assert_allclose(noisy.get_ydata(), [0.4, 0.25])
        assert len(lam.collections) == 2, "each condition's range over its seeds is shaded"
        assert [t.get_text() for t in lam.get_legend().get_texts()] == ["balanced", "noisy"]
    finally:
        plots.close(figure)
