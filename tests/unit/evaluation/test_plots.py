"""gssf_cli.evaluation.plots: the tune's block-size figure (mean ± std over seeds as error bars; both families
against N = D/d)."""

from __future__ import annotations

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
