"""Speaker-verification metrics on plain score/label arrays (numpy only).

Conventions (see reference/rawnet2.md, "Metrics conventions"):

* ``labels``: 1 = same speaker (target trial), 0 = different speakers (non-target).
* A trial is accepted when ``score >= threshold``; higher score = more likely same speaker.
* EER is returned as a *fraction* in [0, 1]; ``summarize`` also gives it in percent.
* minDCF is NIST-normalised: C_det / min(C_miss*P_tar, C_fa*(1-P_tar)).

Every metric is computed from one DET curve built with a single sort and cumulative
sums, so a 580k-trial list costs one ``argsort``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DetCurve",
    "validate_trials",
    "det_curve",
    "eer",
    "eer_threshold",
    "min_dcf",
    "summarize",
]


@dataclass(frozen=True)
class DetCurve:
    """Operating points ordered by increasing threshold (p_miss rises, p_fa falls).

    The first point is accept-all (threshold = lowest score, p_miss = 0, p_fa = 1),
    the last is reject-all (threshold = +inf, p_miss = 1, p_fa = 0).
    """

    p_miss: np.ndarray
    p_fa: np.ndarray
    thresholds: np.ndarray
    n_target: int
    n_nontarget: int

    @classmethod
    def of(cls, scores: ArrayLike, labels: ArrayLike) -> DetCurve:
        """The curve of a trial list (validated; labels 1 = same speaker), to read several metrics off."""
        return _det(*validate_trials(scores, labels))

    def eer(self) -> tuple[float, float]:
        """EER (fraction) and its threshold at the p_miss = p_fa crossing, interpolating linearly."""
        d = self.p_miss - self.p_fa  # rises from -1 (accept-all) to +1 (reject-all)
        i = int(np.argmax(d >= 0))
        if d[i] == 0:
            return float(self.p_miss[i]), float(self.thresholds[i])
        alpha = -d[i - 1] / (d[i] - d[i - 1])  # i >= 1 because d[0] == -1
        rate = self.p_miss[i - 1] + alpha * (self.p_miss[i] - self.p_miss[i - 1])
        lo, hi = self.thresholds[i - 1], self.thresholds[i]
        threshold = lo if np.isinf(hi) else lo + alpha * (hi - lo)
        return float(rate), float(threshold)

    def detection_costs(self, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> np.ndarray:
        """NIST-normalised detection cost at every operating point (1 = no better than a constant decision)."""
        _check_costs(p_target, c_miss, c_fa)
        c_det = c_miss * p_target * self.p_miss + c_fa * (1.0 - p_target) * self.p_fa
        return c_det / min(c_miss * p_target, c_fa * (1.0 - p_target))

    def summary(self) -> dict[str, float | int]:
        """EER (fraction and %), its threshold, minDCF at P_tar 0.01/0.05 and trial counts."""
        rate, threshold = self.eer()
        return {
            "eer": rate,
            "eer_percent": 100.0 * rate,
            "eer_threshold": threshold,
            "min_dcf_0.01": float(self.detection_costs(0.01).min()),
            "min_dcf_0.05": float(self.detection_costs(0.05).min()),
            "n_target": self.n_target,
            "n_nontarget": self.n_nontarget,
        }


def validate_trials(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check a trial list and return (float64 scores, bool labels; True = same speaker).

    Raises ValueError naming the problem, since a silent NaN or a 1/2 label coding
    would otherwise give a plausible-looking but wrong EER.
    """
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}; "
            "flatten them with np.ravel"
        )
    if s.shape != y.shape:
        raise ValueError(
            f"scores and labels differ in length ({s.size} vs {y.size}); "
            "pass one label per trial"
        )
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        n_nan = int(np.isnan(s).sum())
        raise ValueError(
            f"scores contain {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values "
            f"out of {s.size}; drop or fix those trials before scoring"
        )
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"labels must be 0/1 or bool, got dtype {y.dtype}")
        values = np.unique(y)
        odd = values[(values != 0) & (values != 1)]
        if odd.size:
            raise ValueError(
                f"labels must be 0 (different speaker) or 1 (same speaker), "
                f"found values {odd[:10].tolist()}; recode them to 0/1"
            )
        y = y == 1
    n_target = int(y.sum())
    if n_target == 0 or n_target == y.size:
        raise ValueError(
            f"need both target and non-target trials, got {n_target} target and "
            f"{y.size - n_target} non-target; check the trial list and label coding"
        )
    return s, y


def _det(s: np.ndarray, y: np.ndarray) -> DetCurve:
    """DET curve of already-validated arrays: one sort, cumulative sums."""
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    n_target = int(y_sorted.sum())
    n_nontarget = y_sorted.size - n_target
    # First index of each run of equal scores: thresholds only between distinct values,
    # so tied trials are always accepted or rejected together.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    cum_target = np.r_[0, np.cumsum(y_sorted)]
    missed = cum_target[starts]  # targets with score < threshold
    rejected_non = starts - missed  # non-targets with score < threshold
    p_miss = np.r_[missed, n_target] / n_target
    p_fa = np.r_[n_nontarget - rejected_non, 0] / n_nontarget
    thresholds = np.r_[s_sorted[starts], np.inf]
    return DetCurve(p_miss, p_fa, thresholds, n_target, n_nontarget)


def det_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (p_miss, p_fa, thresholds) by increasing threshold; labels 1 = same speaker.

    One point per distinct score (accept at score >= threshold) plus reject-all at +inf,
    so ties are never split and the curve matches sklearn's un-thinned ROC.
    """
    curve = _det(*validate_trials(scores, labels))
    return curve.p_miss, curve.p_fa, curve.thresholds


def eer_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Return (EER as a fraction, threshold); labels 1 = same speaker.

    Interpolation: find the two adjacent DET operating points where p_miss - p_fa
    changes sign and intersect the straight segment between them with p_miss = p_fa
    (the usual ROC-crossing convention). The threshold is interpolated with the same
    weight; if the upper point is reject-all (+inf) the lower threshold is returned.
    """
    return DetCurve.of(scores, labels).eer()


def eer(scores: ArrayLike, labels: ArrayLike) -> float:
    """Equal error rate as a fraction in [0, 1]; labels 1 = same speaker.

    Linear interpolation at the p_miss/p_fa crossing; see ``eer_threshold``.
    """
    return eer_threshold(scores, labels)[0]


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    """Reject priors/costs for which the normalised DCF is undefined."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}; VoxSRC uses 0.01 and 0.05")
    if not (c_miss > 0 and c_fa > 0):
        raise ValueError(f"c_miss and c_fa must be positive, got c_miss={c_miss}, c_fa={c_fa}")


def min_dcf(
    scores: ArrayLike,
    labels: ArrayLike,
    p_target: float,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> float:
    """NIST-normalised minimum DCF in [0, 1]; labels 1 = same speaker.

    C_det = c_miss*p_target*P_miss + c_fa*(1-p_target)*P_fa, divided by
    min(c_miss*p_target, c_fa*(1-p_target)) so that 1 means "no better than always
    accepting or always rejecting"; minimised over all thresholds, both extremes included.
    """
    return float(DetCurve.of(scores, labels).detection_costs(p_target, c_miss, c_fa).min())


def summarize(scores: ArrayLike, labels: ArrayLike) -> dict[str, float | int]:
    """EER (fraction and %), its threshold, minDCF at P_tar 0.01/0.05 and trial counts.

    Builds the DET curve once and reads every metric off it; labels 1 = same speaker.
    """
    return DetCurve.of(scores, labels).summary()
