"""Tests for rawnet_lib.eval.metrics against hand-computed lists and scikit-learn's roc_curve."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_curve

from rawnet_lib.eval.metrics import det_curve, eer, eer_threshold, min_dcf, summarize, validate_trials


def _sk_curve(scores, labels):
    """sklearn's full curve (no thinning) as (p_miss, p_fa, thr) by increasing threshold."""
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    return (1.0 - tpr)[::-1], fpr[::-1], thr[::-1]


def _sk_eer(scores, labels) -> float:
    """EER from sklearn's curve with the same linear interpolation at the sign change."""
    p_miss, p_fa, _ = _sk_curve(scores, labels)
    d = p_miss - p_fa
    i = int(np.argmax(d >= 0))
    if d[i] == 0:
        return float(p_miss[i])
    alpha = -d[i - 1] / (d[i] - d[i - 1])
    return float(p_miss[i - 1] + alpha * (p_miss[i] - p_miss[i - 1]))


def _sk_min_dcf(scores, labels, p_target) -> float:
    p_miss, p_fa, _ = _sk_curve(scores, labels)
    cost = p_target * p_miss + (1 - p_target) * p_fa
    return float(cost.min() / min(p_target, 1 - p_target))


def _random_trials(rng, n, tie_decimals=None):
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.5 * labels
    if tie_decimals is not None:
        scores = np.round(scores, tie_decimals)
    return scores, labels.astype(int)


# --- hand-computed lists ---------------------------------------------------------


def test_four_trials_exact_crossing():
    # T = target, N = non-target; accept when score >= t.
    #   t=0.1: P_miss 0,   P_fa 1     (accept all)
    #   t=0.4: P_miss 0,   P_fa 1/2
    #   t=0.6: P_miss 1/2, P_fa 1/2   -> crossing hit exactly: EER 0.5 at t=0.6
    #   t=0.9: P_miss 1/2, P_fa 0
    #   t=inf: P_miss 1,   P_fa 0     (reject all)
    # minDCF(0.01): best point (1/2, 0): 0.01*0.5 / min(0.01, 0.99) = 0.5; same for 0.05.
    scores = [0.9, 0.6, 0.4, 0.1]
    labels = [1, 0, 1, 0]
    assert eer_threshold(scores, labels) == (0.5, 0.6)
    assert min_dcf(scores, labels, 0.01) == pytest.approx(0.5)
    assert min_dcf(scores, labels, 0.05) == pytest.approx(0.5)


def test_four_trials_interpolated_crossing():
    # Targets 0.9, 0.5, 0.2; non-target 0.6.
    #   t=0.2: (P_miss, P_fa) = (0, 1)       d = -1
    #   t=0.5: (1/3, 1)                      d = -2/3
    #   t=0.6: (2/3, 1)                      d = -1/3
    #   t=0.9: (2/3, 0)                      d = +2/3
    # Segment 0.6 -> 0.9: alpha = (1/3) / 1 = 1/3, EER = 2/3, threshold 0.6 + 0.3/3 = 0.7.
    # minDCF(0.01): best (2/3, 0) -> 0.01*(2/3)/0.01 = 2/3; for 0.05 also 2/3.
    scores = [0.9, 0.5, 0.2, 0.6]
    labels = [1, 1, 1, 0]
    rate, threshold = eer_threshold(scores, labels)
    assert rate == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.7)
    assert min_dcf(scores, labels, 0.01) == pytest.approx(2 / 3)
    assert min_dcf(scores, labels, 0.05) == pytest.approx(2 / 3)


def test_det_curve_points_and_ties():
    # Tie at 0.5 between a target and a non-target: they move together.
    scores = np.array([0.5, 0.5, 0.9, 0.1])
    labels = np.array([1, 0, 1, 0])
    p_miss, p_fa, thr = det_curve(scores, labels)
    np.testing.assert_allclose(thr, [0.1, 0.5, 0.9, np.inf])
    np.testing.assert_allclose(p_miss, [0, 0, 0.5, 1])
    np.testing.assert_allclose(p_fa, [1, 0.5, 0, 0])


def test_perfect_separation_gives_zero():
    scores = [0.1, 0.2, 0.8, 0.9]
    labels = [0, 0, 1, 1]
    rate, threshold = eer_threshold(scores, labels)
    assert rate == 0.0
    assert 0.2 < threshold <= 0.8
    assert min_dcf(scores, labels, 0.01) == 0.0


def test_inverted_scores_give_one():
    scores = [0.0, 1.0, 2.0, 3.0]
    labels = [1, 1, 0, 0]
    assert eer(scores, labels) == 1.0
    assert min_dcf(scores, labels, 0.05) == 1.0  # no better than a trivial system


def test_all_scores_equal_is_chance():
    rate, threshold = eer_threshold([0.3] * 4, [1, 0, 1, 0])
    assert rate == 0.5
    assert threshold == 0.3


# --- against scikit-learn --------------------------------------------------------


@pytest.mark.parametrize("tie_decimals", [None, 1, 0])
def test_matches_sklearn(tie_decimals):
    rng = np.random.default_rng(tie_decimals or 7)
    scores, labels = _random_trials(rng, 5000, tie_decimals)
    p_miss, p_fa, thr = det_curve(scores, labels)
    sk_miss, sk_fa, sk_thr = _sk_curve(scores, labels)
    np.testing.assert_allclose(p_miss, sk_miss, atol=1e-12)
    np.testing.assert_allclose(p_fa, sk_fa, atol=1e-12)
    np.testing.assert_array_equal(thr, sk_thr)
    assert thr.size == np.unique(scores).size + 1  # one point per distinct score + reject-all
    assert eer(scores, labels) == pytest.approx(_sk_eer(scores, labels), abs=1e-12)
    for p in (0.01, 0.05):
        assert min_dcf(scores, labels, p) == pytest.approx(_sk_min_dcf(scores, labels, p), abs=1e-12)


def test_large_trial_list_matches_sklearn():
    rng = np.random.default_rng(580)
    scores, labels = _random_trials(rng, 580_000)
    result = summarize(scores, labels)
    assert result["eer"] == pytest.approx(_sk_eer(scores, labels), abs=1e-6)
    assert result["min_dcf_0.01"] == pytest.approx(_sk_min_dcf(scores, labels, 0.01), abs=1e-6)
    assert result["n_target"] + result["n_nontarget"] == 580_000


def test_summarize_keys_and_consistency():
    rng = np.random.default_rng(1)
    scores, labels = _random_trials(rng, 2000)
    result = summarize(scores, labels)
    assert set(result) == {
        "eer", "eer_percent", "eer_threshold", "min_dcf_0.01", "min_dcf_0.05", "n_target", "n_nontarget",
    }
    assert result["eer_percent"] == pytest.approx(100 * result["eer"])
    assert (result["eer"], result["eer_threshold"]) == eer_threshold(scores, labels)
    assert result["min_dcf_0.05"] == min_dcf(scores, labels, 0.05)
    assert result["n_target"] == int(labels.sum())


# --- properties -------------------------------------------------------------------

trial_lists = st.lists(
    st.tuples(st.integers(-20, 20), st.booleans()), min_size=2, max_size=60
).filter(lambda t: 0 < sum(lab for _, lab in t) < len(t))


@settings(max_examples=150, deadline=None)
@given(trial_lists, st.sampled_from([0.01, 0.05, 0.5]))
def test_properties(trials, p_target):
    scores = np.array([s for s, _ in trials], dtype=float)
    labels = np.array([lab for _, lab in trials])
    rate = eer(scores, labels)
    cost = min_dcf(scores, labels, p_target)
    assert 0.0 <= rate <= 1.0
    assert 0.0 <= cost <= 1.0 + 1e-12
    assert rate == pytest.approx(_sk_eer(scores, labels), abs=1e-12)
    # Strictly increasing transforms keep the order, hence every metric.
    for transformed in (2.0 * scores - 3.0, np.exp(scores / 5.0)):
        assert eer(transformed, labels) == pytest.approx(rate, abs=1e-12)
        assert min_dcf(transformed, labels, p_target) == pytest.approx(cost, abs=1e-12)
    # Swapping classes and negating scores swaps P_miss and P_fa at every cut.
    assert eer(-scores, ~labels) == pytest.approx(rate, abs=1e-12)
    assert min_dcf(-scores, ~labels, 1 - p_target) == pytest.approx(cost, abs=1e-12)


# --- validation --------------------------------------------------------------------


def test_accepts_bool_int_float_labels():
    scores = [0.9, 0.6, 0.4, 0.1]
    for labels in ([True, False, True, False], [1, 0, 1, 0], np.array([1.0, 0.0, 1.0, 0.0])):
        assert eer(scores, labels) == 0.5
    _, y = validate_trials(scores, [1.0, 0.0, 1.0, 0.0])
    assert y.dtype == np.bool_


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, np.nan, np.nan, 0.2], [1, 0, 1, 0], "2 NaN"),
        ([0.1, np.inf, 0.3, 0.2], [1, 0, 1, 0], "1 infinite"),
        ([0.1, 0.2, 0.3], [1, 2, 1], r"\[2\]"),
        ([0.1, 0.2, 0.3], [1, -1, 1], r"\[-1\]"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "0 non-target"),
        ([0.1, 0.2, 0.3], [1, 0], "differ in length"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
        ([], [], "both target"),
        (["a", "b"], [1, 0], "real numbers"),
    ],
)
def test_invalid_input_raises(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        summarize(scores, labels)


@pytest.mark.parametrize("p_target", [0.0, 1.0, -0.1, 1.5])
def test_invalid_p_target(p_target):
    with pytest.raises(ValueError, match="p_target"):
        min_dcf([0.1, 0.9], [0, 1], p_target)


def test_invalid_costs():
    with pytest.raises(ValueError, match="c_miss"):
        min_dcf([0.1, 0.9], [0, 1], 0.01, c_miss=0.0)
