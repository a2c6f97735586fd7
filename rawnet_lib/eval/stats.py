"""Confidence intervals for comparing recipes: over seeds (t-based) and over trials (bootstrap).

One seed decides nothing on a small corpus (seeds of one recipe differ by up to 40 % relative
EER), so a sweep reports the mean over seeds with a 95 % t-interval, the paired difference of
each arm to the first over the same seeds, and, per run, bootstrap intervals over trials, over
enrolment speakers and over speakers on both sides of the trials, which show how much of the
spread the test list alone would explain.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

from rawnet_lib.eval.metrics import eer

__all__ = ["t_interval", "paired_difference", "bootstrap_interval", "bootstrap_eer"]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean; low = high = nan with fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = sps.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return mean, float(mean - half), float(mean + half)


def paired_difference(baseline: Sequence[float], other: Sequence[float],
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of other - baseline over paired values (the same seeds)."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    return t_interval(b - a, confidence)


def bootstrap_interval(statistic: Callable[..., float], groups: Sequence[np.ndarray], n_boot: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*groups)`, each group resampled with
    replacement on its own (stratified: target and non-target trials keep their counts).
    Resamples where the statistic is undefined (nan) are left out; (nan, nan) if all are."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g) for g in groups]
    draws = np.array([statistic(*(g[rng.integers(0, len(g), len(g))] for g in groups)) for _ in range(n_boot)])
    if np.isnan(draws).all():
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    return float(np.nanquantile(draws, alpha)), float(np.nanquantile(draws, 1 - alpha))


def bootstrap_eer(scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                  seed: int = 0, groups: Sequence | None = None,
                  test_groups: Sequence | None = None) -> tuple[float, float]:
    """Bootstrap interval of the EER (a fraction): over trials, targets and non-targets resampled
    apart; given `groups` (a label per trial, e.g. its enrollment speaker), over whole groups;
    given `test_groups` too (the test side's label per trial), over groups drawn for both sides.

    Trials that share a speaker are not independent, so the trial bootstrap is too narrow for
    the question "another set of test speakers": on the demo's O list the bootstrap over
    enrolment voices is about 3 times as wide (20 voices; corpus version 1, 20 speakers: 3.5
    times). It is one-way: a voice left out of a draw still appears as the test side of other
    voices' non-target trials, so it is narrower than resampling voices on both sides. The
    two-way draw takes as many groups as either side names, with replacement: a trial between
    groups a != b counts m_a * m_b times (each drawn copy of a against each copy of b), one
    within a group m_a times (each copy's own trials; two copies of a voice are not two
    speakers), and one with a group not drawn drops out. A draw without a target or a
    non-target trial has no EER and is left out (few groups only)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels).astype(bool)
    if groups is None:
        if test_groups is not None:
            raise ValueError("test_groups needs groups (the enrolment side's label per trial) beside it")

        def stat(target: np.ndarray, nontarget: np.ndarray) -> float:
            return eer(np.concatenate([target, nontarget]),
                       np.concatenate([np.ones(len(target)), np.zeros(len(nontarget))]))
        return bootstrap_interval(stat, [scores[labels], scores[~labels]], n_boot, confidence, seed)

    sides = [np.asarray(g) for g in (groups, test_groups) if g is not None]
    if any(len(side) != len(scores) for side in sides):
        raise ValueError(f"groups need one label per trial ({len(scores)}), got {[len(g) for g in sides]}")
    _, codes = np.unique(np.concatenate(sides), return_inverse=True)
    n_groups, enroll = int(codes.max()) + 1, codes[:len(scores)]
    if test_groups is None:
        members = np.split(np.argsort(enroll, kind="stable"), np.cumsum(np.bincount(enroll))[:-1])

        def one_way(picked: np.ndarray) -> float:
            return _draw_eer(*(x[np.concatenate([members[i] for i in picked])] for x in (scores, labels)))
        return bootstrap_interval(one_way, [np.arange(n_groups)], n_boot, confidence, seed)

    test = codes[len(scores):]
    within = enroll == test

    def two_way(picked: np.ndarray) -> float:
        drawn = np.bincount(picked, minlength=n_groups)
        weight = np.where(within, drawn[enroll], drawn[enroll] * drawn[test])
        return _draw_eer(np.repeat(scores, weight), np.repeat(labels, weight))
    return bootstrap_interval(two_way, [np.arange(n_groups)], n_boot, confidence, seed)


def _draw_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """The EER of a resample of groups; nan for one without a target or a non-target trial."""
    return eer(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
