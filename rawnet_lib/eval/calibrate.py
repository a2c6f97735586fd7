"""From a cosine score to a log-likelihood ratio and a decision: calibration on a development list.

A cosine of 0.6 means nothing by itself: it depends on the model, the crop protocol and the
data. Logistic regression on a development list's scores (balanced classes, so its log-odds is
the log-likelihood ratio) maps a score to `llr = slope * score + offset`, natural log: llr > 0
favours "same speaker". Saved as JSON beside the checkpoint (`<stem>.calibration.json`), with

* actual Cllr (of the calibrated LLRs) and minimum Cllr (of the best monotone map, by the
  pool-adjacent-violators algorithm): their gap is what calibration still loses, in bits;
* score thresholds at three operating points: the EER, minDCF at P_target 0.01 and a chosen
  false-acceptance rate, read off the development list's DET curve;
* histograms of the target and non-target scores, to show where a new score falls;
* what it was fitted for (`source`): the list, the weights' SHA-1 and the crop protocol. Scores of
  other weights or another protocol have another scale, so a calibration is refused for them
  (`check_calibration`); the fast or exact path, AMP and ONNX change scores only by rounding.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from rawnet_lib.errors import WorkbookError
from rawnet_lib.eval.metrics import DetCurve, validate_trials
from rawnet_lib.io import atomic_write_text

__all__ = ["CalibrationError", "Calibration", "cllr", "min_cllr", "operating_thresholds", "fit_calibration",
           "calibration_path", "load_calibration", "check_calibration", "IDENTITY"]

HIST_BINS = 50
IDENTITY = ("model_sha1", "crop_mode", "n_samples", "eval_hop", "sample_rate")  # what its scores' scale depends on


class CalibrationError(WorkbookError, ValueError):
    """A calibration file that cannot be used, or an operating point it does not hold."""


def cllr(llr: ArrayLike, labels: ArrayLike) -> float:
    """Log-likelihood-ratio cost in bits: 0 perfect, 1 an uninformative system (llr = 0)."""
    llr = np.asarray(llr, dtype=np.float64)
    big = np.finfo(np.float64).max
    _, y = validate_trials(np.clip(llr, -big, big), labels)  # +-inf is a valid LLR (PAV gives it); NaN is not
    # log(1 + e^-llr) for targets, log(1 + e^llr) for non-targets; logaddexp keeps +-inf exact.
    return float((np.logaddexp(0, -llr[y]).mean() + np.logaddexp(0, llr[~y]).mean()) / (2 * np.log(2)))


def min_cllr(scores: ArrayLike, labels: ArrayLike) -> float:
    """Cllr after the best monotone score -> LLR map (PAV): what perfect calibration would reach."""
    s, y = validate_trials(scores, labels)
    posterior = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(s, y.astype(float))
    with np.errstate(divide="ignore"):
        llr = np.log(posterior) - np.log1p(-posterior) - np.log(y.sum() / (~y).sum())
    return cllr(llr, y)


def operating_thresholds(curve: DetCurve, far: float = 0.01) -> dict[str, float]:
    """Score thresholds (accept at score >= threshold) on a development list's DET curve: at the
    EER, at minDCF(P_target 0.01) and the lowest one whose false-acceptance rate is at most `far`."""
    if not 0.0 < far < 1.0:
        raise CalibrationError(f"far={far} must be a rate in (0, 1), e.g. 0.01 for 1 %")
    return {"eer": curve.eer()[1],
            "min_dcf_0.01": float(curve.thresholds[int(np.argmin(curve.detection_costs(0.01)))]),
            f"far_{far:g}": float(curve.thresholds[int(np.argmax(curve.p_fa <= far))])}


@dataclass
class Calibration:
    """llr = slope * score + offset, with the development list's operating points and metrics."""
    slope: float
    offset: float
    thresholds: dict[str, float | None]  # None: no threshold reaches the point (it rejects every trial)
    metrics: dict[str, float | None]
    histogram: dict[str, list[float]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # dev list, checkpoint, crop protocol

    def llr(self, scores: ArrayLike) -> np.ndarray:
        return self.slope * np.asarray(scores, dtype=np.float64) + self.offset

    def threshold(self, operating_point: str) -> float:
        if operating_point not in self.thresholds:
            raise CalibrationError(f"operating point {operating_point!r} is not in this calibration; "
                                   f"choose one of {', '.join(self.thresholds)} (or refit with another far=)")
        value = self.thresholds[operating_point]
        if value is None or not math.isfinite(value):
            raise CalibrationError(f"operating point {operating_point!r} rejects every trial of the development list "
                                   f"{self.source.get('trials', '')} (no score reaches it: the model is too weak "
                                   "there); choose another operating point, or give a score threshold")
        return value

    def save(self, path: str | Path) -> None:
        """Standard JSON (no Infinity or NaN: such a value is written as null), written atomically."""
        values = asdict(self)
        for name in ("thresholds", "metrics"):
            values[name] = {k: v if v is None or math.isfinite(v) else None for k, v in values[name].items()}
        atomic_write_text(path, json.dumps(values, indent=1, allow_nan=False) + "\n")


def fit_calibration(scores: ArrayLike, labels: ArrayLike, far: float = 0.01,
                    source: Mapping[str, Any] | None = None) -> Calibration:
    """Fit the score -> LLR map on a development list (labels 1 = same speaker) and measure it."""
    s, y = validate_trials(scores, labels)
    curve = DetCurve.of(s, y)  # one curve for the thresholds and the metrics
    # Balanced classes: the fitted log-odds is the LLR at a 0.5 prior, whatever the list's mix.
    fit = LogisticRegression(C=1e6, class_weight="balanced", tol=1e-10, max_iter=1000).fit(s[:, None], y)
    thresholds = {k: v if math.isfinite(v) else None for k, v in operating_thresholds(curve, far).items()}
    cal = Calibration(float(fit.coef_[0, 0]), float(fit.intercept_[0]), thresholds, {})
    summary = curve.summary()
    if not cal.slope > 0:  # a higher score would mean "less likely the same speaker"
        raise CalibrationError(f"{dict(source or {}).get('trials', 'the development list')}: the fitted slope is "
                               f"{cal.slope:.3g}, so a higher score would mean a different speaker (EER "
                               f"{summary['eer']:.1%} over {summary['n_target']} same-speaker and "
                               f"{summary['n_nontarget']} different-speaker pairs); check its labels (1 = same "
                               "speaker) or calibrate on a larger list")
    cal.metrics = {"eer": summary["eer"], "min_dcf_0.01": summary["min_dcf_0.01"],
                   "cllr": cllr(cal.llr(s), y), "min_cllr": min_cllr(s, y),
                   "n_target": summary["n_target"], "n_nontarget": summary["n_nontarget"]}
    edges = np.linspace(s.min(), s.max(), HIST_BINS + 1)
    cal.histogram = {"edges": edges.tolist(), "target": np.histogram(s[y], edges)[0].tolist(),
                     "nontarget": np.histogram(s[~y], edges)[0].tolist()}
    cal.source = dict(source or {})
    return cal


def calibration_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's (or an exported model's) calibration lives: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.calibration.json")


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return Calibration(**values)
    except (OSError, ValueError, TypeError) as err:
        raise CalibrationError(f"{path}: not a calibration written by rawnet_lib.eval.calibrate ({err}); delete it "
                               "and calibrate again (python -m rawnet_lib.verify calibrate ...)") from None


def check_calibration(cal: Calibration, now: Mapping[str, Any], where: str | Path) -> None:
    """Refuse a calibration fitted for other weights or another crop protocol than `now` (a
    verifier's): its LLRs and thresholds belong to another score scale. Fields a calibration
    written before they were recorded lacks are not checked."""
    changed = [k for k in IDENTITY if k in cal.source and cal.source[k] != now.get(k)]
    if changed:
        def show(values: Mapping[str, Any]) -> str:
            return ", ".join(f"{k} {str(values.get(k))[:12]}" for k in changed)
        raise CalibrationError(f"{where} was fitted for {show(cal.source)}, but this model has {show(now)} (a "
                               "rewritten checkpoint or other test-time settings); calibrate again (python -m "
                               "rawnet_lib.verify calibrate ... --overwrite, or delete the file), or use the "
                               "settings it was fitted with")
