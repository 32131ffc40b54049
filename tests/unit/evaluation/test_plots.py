"""gssf_cli.evaluation.plots: the tune's block-size figure (mean ± std over seeds as error bars)."""

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
