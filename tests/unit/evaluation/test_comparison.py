"""gssf_cli.evaluation.comparison: per-query units whose means are exactly evaluate's metrics, and the paired
statistics (coverage, null calibration, exact sign-flip enumeration). The per-query ranks the units are made of are
tested with their modules (test_crossmodal.py, test_labels.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.evaluation import comparison, crossmodal
from gssf_cli.evaluation import labels as label_metrics
from gssf_cli.evaluation.comparison import Units, bootstrap_means, compare_units, sign_flip_pvalues
from tests.unit.evaluation.references import _asymmetric, _labelled, _pairs

# ----------------------------------------------------------------------------------------------------------
# Units: their means are what gssf evaluate reports


def _assert_means_equal_evaluation(units: Units, evaluated: dict[str, object]) -> None:
    means = units.means()
    for name, value in means.items():
        assert value == pytest.approx(evaluated[name], rel=1e-12, abs=1e-12), name
    tested = set(means) | set(comparison.NOT_TESTED)
    assert {key for key, value in evaluated.items() if isinstance(value, float)} <= tested


@pytest.mark.parametrize("ks", [(1, 5, 10), (2, 3)])
def test_cross_modal_unit_means_equal_evaluate(ks: tuple[int, ...]) -> None:
    images, texts = _pairs(30, 5)
    score_fn = _asymmetric()
    units = comparison.embedding_units("cross_modal", images, texts, captions_per_image=5, score_fn=score_fn, ks=ks)
    evaluated = crossmodal.evaluate_cross_modal(images, texts, captions_per_image=5, score_fn=score_fn, ks=ks)
    assert units.size == 30 and units.unit == "image with its 5 captions" and units.metrics[0] == "rsum"
    _assert_means_equal_evaluation(units, evaluated)


def test_coco_1k_unit_means_equal_the_mean_over_folds() -> None:
    """Each image is ranked within its fold; the folds are equal, so the mean over units is the fold mean."""
    images, texts = _pairs(5000, 2, d=4, noise=1.5, seed=5)
    units = comparison.embedding_units("cross_modal", images, texts, captions_per_image=2, protocol="coco-1k")
    evaluated = crossmodal.evaluate_cross_modal(images, texts, captions_per_image=2, protocol="coco-1k")
    _assert_means_equal_evaluation(units, evaluated)
    whole = comparison.embedding_units("cross_modal", images, texts, captions_per_image=2, protocol="coco-5k")
    assert whole.means()["rsum"] < units.means()["rsum"]  # 5,000 candidates are harder than 1,000


@pytest.mark.parametrize("full_map", [False, True])
def test_label_unit_means_equal_evaluate(full_map: bool) -> None:
    feats, labels = _labelled()
    units = comparison.embedding_units("labels", feats, labels=labels, ks=(1, 3), full_map=full_map)
    evaluated = label_metrics.evaluate_labels(feats, labels, ks=(1, 3), full_map=full_map)
    assert units.size == len(labels) - 1 == evaluated["num_queries"] - evaluated["num_skipped"]
    assert ("map" in units.metrics) is full_map
    _assert_means_equal_evaluation(units, evaluated)


def test_units_refuse_what_cannot_be_ranked() -> None:
    images, texts = _pairs(20, 2)
    with pytest.raises(UserInputError, match="protocol f30k-1k needs 1,000 images"):
        comparison.embedding_units("cross_modal", images, texts, captions_per_image=2, protocol="f30k-1k")
    with pytest.raises(UserInputError, match="no query has a relevant gallery item"):
        comparison.embedding_units("labels", images, labels=np.arange(20))


def test_groups_are_averaged_per_unit_and_must_pair() -> None:
    a = Units("labels", ("map_at_r",), np.array([[0.0], [1.0]]), np.arange(2), "query")
    b = Units("labels", ("map_at_r",), np.array([[1.0], [0.0]]), np.arange(2), "query")
    assert comparison.average_units([a, b]).values.tolist() == [[0.5], [0.5]]
    other_units = Units("labels", ("map_at_r",), np.array([[1.0], [0.0]]), np.array([0, 2]), "query")
    with pytest.raises(UserInputError, match="not measured on the same units"):
        comparison.average_units([a, other_units])


# ----------------------------------------------------------------------------------------------------------
# The statistics


def _units(values: np.ndarray, metrics: tuple[str, ...] = ("map_at_r",)) -> Units:
    values = values.reshape(len(values), -1)
    return Units("labels", metrics, values.astype(np.float64), np.arange(len(values)), "query")


def test_identical_systems_differ_by_zero_with_p_one() -> None:
    values = np.random.default_rng(0).random((200, 2))
    result = compare_units(
        _units(values, ("map_at_r", "r_precision")), {"same": _units(values, ("map_at_r", "r_precision"))}
    )
    for row in result.rows:
        assert row.difference == 0.0 and row.ci_low == 0.0 and row.ci_high == 0.0
        assert row.p_value == 1.0 and row.p_exact and row.verdict == "n.s."


def test_a_strongly_better_system_is_significant_in_its_direction() -> None:
    rng = np.random.default_rng(1)
    base = rng.random((300, 2))
    better = base + np.array([0.1, -5.0]) + 0.05 * rng.normal(size=(300, 2))
    metrics = ("map_at_r", "i2t_meanr")  # i2t_meanr: lower is better
    result = compare_units(_units(base, metrics), {"b": _units(better, metrics)}, bootstrap=2000, permutations=2000)
    by_metric = {row.metric: row for row in result.rows}
    assert all(row.p_value < 0.01 and row.significant for row in result.rows)
    assert by_metric["map_at_r"].verdict == "better" and by_metric["map_at_r"].ci_low > 0
    assert by_metric["i2t_meanr"].verdict == "better" and by_metric["i2t_meanr"].ci_high < 0
    assert by_metric["map_at_r"].p_value == pytest.approx(1 / 2001)  # the smallest a sampled test reports
    worse = compare_units(_units(better, metrics), {"a": _units(base, metrics)}, bootstrap=200, permutations=200)
    assert {row.verdict for row in worse.rows} == {"worse"}


def test_bootstrap_intervals_cover_the_true_difference_at_about_the_nominal_rate() -> None:
    """300 test sets of 80 units drawn from a population whose mean difference is 0.3: the 95% interval
    should hold it in about 95% of them (the percentile bootstrap runs a little narrow at small n)."""
    rng = np.random.default_rng(7)
    covered = 0
    trials = 300
    for trial in range(trials):
        base = rng.normal(size=80)
        other = base + 0.3 + rng.standard_t(df=5, size=80)  # heavy-ish tails, population mean difference 0.3
        row = compare_units(_units(base), {"o": _units(other)}, bootstrap=1000, permutations=1, seed=trial).rows[0]
        covered += row.ci_low <= 0.3 <= row.ci_high
    assert 0.90 <= covered / trials <= 0.985, covered / trials


def test_sign_flip_test_is_calibrated_under_the_null() -> None:
    rng = np.random.default_rng(11)
    p = np.array(
        [sign_flip_pvalues(rng.normal(size=(40, 1)), 500, np.random.default_rng(seed))[0][0] for seed in range(300)]
    )
    assert 0.02 <= float(np.mean(p < 0.05)) <= 0.09
    assert 0.4 <= float(np.mean(p)) <= 0.6


def _enumerated_p(d: np.ndarray) -> float:
    observed = abs(d.sum())
    sums = [
        abs(sum(s * x for s, x in zip(signs, d, strict=True))) for signs in itertools.product((1, -1), repeat=len(d))
    ]
    return sum(total >= observed - 1e-9 for total in sums) / len(sums)


def test_sign_flip_p_is_exact_for_few_units() -> None:
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(size=(9, 3)), 2)
    d[:4, 2] = 0.0  # zeros do not change under a flip
    p, exact = sign_flip_pvalues(d, 10_000, np.random.default_rng(0))
    assert exact.all()
    for column in range(3):
        assert p[column] == pytest.approx(_enumerated_p(d[:, column]), abs=1e-15)


def test_sampled_sign_flip_p_is_close_to_the_enumeration() -> None:
    d = np.random.default_rng(4).normal(0.25, 1.0, size=(14, 1))
    p, exact = sign_flip_pvalues(d, 20_000, np.random.default_rng(0))  # 2^14 > 10,000: sampled
    sampled, sampled_exact = sign_flip_pvalues(d, 10_000, np.random.default_rng(0))
    assert exact[0] and not sampled_exact[0]
    assert p[0] == pytest.approx(_enumerated_p(d[:, 0]), abs=1e-15)
    assert abs(sampled[0] - p[0]) < 4 * np.sqrt(p[0] * (1 - p[0]) / 10_000) + 1e-4


def test_bootstrap_means_resample_whole_units() -> None:
    rng = np.random.default_rng(5)
    d = rng.normal(size=(50, 2))
    d[:, 1] = 3.0  # a constant column resamples to itself
    means = bootstrap_means(d, 3000, np.random.default_rng(0))
    assert means.shape == (3000, 2)
    np.testing.assert_allclose(means[:, 1], 3.0, rtol=1e-12)
    assert means[:, 0].mean() == pytest.approx(d[:, 0].mean(), abs=0.02)
    assert means[:, 0].std() == pytest.approx(d[:, 0].std() / np.sqrt(50), rel=0.08)


def test_results_are_seeded_and_do_not_depend_on_the_other_systems() -> None:
    rng = np.random.default_rng(6)
    base, b, c = (_units(rng.random((120, 1))) for _ in range(3))
    one = compare_units(base, {"b": b}, bootstrap=500, permutations=500, seed=1).rows[0]
    again = compare_units(base, {"b": b}, bootstrap=500, permutations=500, seed=1).rows[0]
    two = compare_units(base, {"b": b, "c": c}, bootstrap=500, permutations=500, seed=1).rows[0]
    other_seed = compare_units(base, {"b": b}, bootstrap=500, permutations=500, seed=2).rows[0]
    assert one == again
    assert (two.ci_low, two.ci_high, two.p_value) == pytest.approx((one.ci_low, one.ci_high, one.p_value), rel=1e-12)
    assert (other_seed.ci_low, other_seed.p_value) != (one.ci_low, one.p_value)


def test_bad_settings_are_refused() -> None:
    units = _units(np.zeros(3))
    with pytest.raises(UserInputError, match="confidence"):
        compare_units(units, {"b": units}, confidence=1.0)
    with pytest.raises(UserInputError, match="nothing to compare"):
        compare_units(units, {})


def test_markdown_table() -> None:
    row = compare_units(_units(np.zeros(4)), {"b": _units(np.ones(4))}, bootstrap=10, permutations=16).rows[0]
    payload = {
        "dataset": {"name": "syn"}, "split": "test", "protocol": None, "units": 4, "unit": "query",
        "baseline": {"label": "a", "runs": [{"run_id": "r1"}]},
        "settings": {"confidence": 0.95, "bootstrap": 10, "permutations": 16, "seed": 0},
        "rows": [row.to_json()], "not_tested": {},
    }  # fmt: skip
    table = comparison.markdown_table(payload)
    assert "| map_at_r | b | 0.0000 | 1.0000 | 1.0000 | [1.0000, 1.0000] | 0.1250 | n.s. |" in table
