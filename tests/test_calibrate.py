"""Calibration against examples worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rawnet_lib.eval.calibrate import (Calibration, CalibrationError, calibration_path, cllr, fit_calibration,
                                       load_calibration, min_cllr, operating_thresholds)
from rawnet_lib.eval.metrics import DetCurve

# Targets score +1 three times and -1 once; non-targets the mirror image. P(target | +1) = 3/4,
# so the best LLR is +-ln 3 at +-1: slope ln 3, offset 0; and Cllr (bits) of those LLRs is
# [3 log2(1 + 1/3) + log2(1 + 3)] / 4 for each class.
SCORES = np.array([1, 1, 1, -1, -1, -1, -1, 1], dtype=float)
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
HAND_CLLR = (3 * math.log2(4 / 3) + 2) / 4


def test_cllr_of_known_llrs() -> None:
    assert cllr(np.zeros(4), [1, 0, 1, 0]) == pytest.approx(1.0)          # uninformative: 1 bit
    assert cllr([np.inf, -np.inf], [1, 0]) == 0.0                          # certain and right
    assert cllr(math.log(3) * SCORES, LABELS) == pytest.approx(HAND_CLLR)


def test_min_cllr_is_the_cllr_of_the_best_monotone_map() -> None:
    assert min_cllr(SCORES, LABELS) == pytest.approx(HAND_CLLR)
    assert min_cllr([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.0             # separable
    assert min_cllr([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(1.0)          # one score for all


def test_logistic_regression_finds_the_hand_made_llr(tmp_path) -> None:
    cal = fit_calibration(SCORES, LABELS, far=0.3)
    # C=1e6 pulls the slope by about 1/C; the solver stops at a gradient of 1e-10.
    assert cal.slope == pytest.approx(math.log(3), abs=1e-4) and cal.offset == pytest.approx(0.0, abs=1e-4)
    assert cal.metrics["cllr"] == pytest.approx(HAND_CLLR, abs=1e-6)
    assert cal.metrics["min_cllr"] == pytest.approx(HAND_CLLR)
    assert sum(cal.histogram["target"]) == 4 and sum(cal.histogram["nontarget"]) == 4
    path = calibration_path(tmp_path / "best_opt_eval.pt")
    assert path.name == "best_opt_eval.calibration.json"
    cal.save(path)
    again = load_calibration(path)
    assert again.llr(1.0) == pytest.approx(math.log(3), abs=1e-4) and again.thresholds == cal.thresholds


def test_balanced_weights_make_the_llr_independent_of_the_class_mix() -> None:
    more_nontargets = fit_calibration(np.r_[SCORES, SCORES[4:]], np.r_[LABELS, LABELS[4:]])
    assert more_nontargets.slope == pytest.approx(math.log(3), abs=1e-4)
    assert more_nontargets.offset == pytest.approx(0.0, abs=1e-4)


def test_operating_thresholds_by_hand() -> None:
    # targets 0.6 0.8 0.9, non-targets 0.1 0.2 0.7 (accept at score >= threshold):
    # at 0.7 one target is missed and one non-target accepted: EER 1/3 there; minDCF(0.01) wants
    # no false accept with the fewest misses: 0.8; p_fa <= 0.34 first holds at 0.6.
    curve = DetCurve.of([0.6, 0.8, 0.9, 0.1, 0.2, 0.7], [1, 1, 1, 0, 0, 0])
    assert operating_thresholds(curve, far=0.34) == pytest.approx({"eer": 0.7, "min_dcf_0.01": 0.8, "far_0.34": 0.6})
    with pytest.raises(CalibrationError, match="far=1.5"):
        operating_thresholds(curve, far=1.5)


def test_a_broken_calibration_file_is_named(tmp_path) -> None:
    bad = tmp_path / "x.calibration.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="x.calibration.json"):
        load_calibration(bad)
    cal = fit_calibration(SCORES, LABELS)
    with pytest.raises(CalibrationError, match="min_dcf_0.01"):
        cal.threshold("far_0.5")


def test_an_inverted_development_list_is_refused() -> None:
    with pytest.raises(CalibrationError, match=r"dev\.txt: the fitted slope is -.*check its labels"):
        fit_calibration(SCORES, 1 - LABELS, source={"trials": "dev.txt"})


def test_an_unreachable_operating_point_is_null_in_standard_json(tmp_path) -> None:
    # The top score is a non-target's: at P_target 0.01 accepting it costs 99 x 1/4 against 1 for
    # rejecting everything, so minDCF's threshold lies above every score (+inf on the curve).
    scores, labels = [0.6, 0.7, 0.8, 0.85, 0.1, 0.2, 0.3, 0.9], [1, 1, 1, 1, 0, 0, 0, 0]
    assert operating_thresholds(DetCurve.of(scores, labels))["min_dcf_0.01"] == np.inf
    cal = fit_calibration(scores, labels, source={"trials": "dev.txt"})
    assert cal.thresholds["min_dcf_0.01"] is None
    path = tmp_path / "x.calibration.json"
    cal.save(path)
    assert '"min_dcf_0.01": null' in path.read_text() and "Infinity" not in path.read_text()
    again = load_calibration(path)
    with pytest.raises(CalibrationError, match=r"'min_dcf_0.01' rejects every trial of the development list dev"):
        again.threshold("min_dcf_0.01")
    assert again.threshold("eer") == cal.thresholds["eer"]


def test_a_calibration_of_other_weights_or_crops_is_refused() -> None:
    from rawnet_lib.eval.calibrate import check_calibration
    fitted = {"model_sha1": "a" * 40, "crop_mode": "reference", "n_samples": 59049, "eval_hop": 47239,
              "sample_rate": 16000, "amp": "bf16", "path": "fast"}
    cal = fit_calibration(SCORES, LABELS, source={"trials": "dev.txt", **fitted})
    check_calibration(cal, {**fitted, "amp": "off", "path": "exact"}, "c.json")  # rounding only: accepted
    with pytest.raises(CalibrationError, match=r"c\.json was fitted for model_sha1 aaaa.*eval_hop 47239, but this "
                                               r"model has model_sha1 bbbb.*eval_hop 1000.*--overwrite"):
        check_calibration(cal, {**fitted, "model_sha1": "b" * 40, "eval_hop": 1000}, "c.json")
    old = Calibration(cal.slope, cal.offset, cal.thresholds, cal.metrics, source={"trials": "dev.txt"})
    check_calibration(old, {**fitted, "model_sha1": "b" * 40}, "c.json")  # written before the identity: unchecked
