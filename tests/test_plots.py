"""Tests for rawnet_lib.views.plots: return types, probit DET axes, EER labels, atomic saving."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless; the library itself never picks a backend

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy.stats import norm

from rawnet_lib.eval.metrics import det_curve, eer, eer_threshold
from rawnet_lib.views.plots import (det_plot, det_seeds_plot, filter_responses, frequency_response, history_plot,
                                    save_figure, score_histogram, waveform_spectrogram)


def _trials(seed: int, shift: float, n: int = 3000):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    return rng.normal(size=n) + shift * labels, labels.astype(int)


def _tick_texts(fig: Figure) -> list[str]:
    fig.canvas.draw()
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]


def test_module_import_does_not_touch_pyplot():
    code = "import sys, rawnet_lib.views.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_det_plot_probit_axes_and_eer_legend():
    curves = {"baseline": _trials(0, 1.5), "rawnet2": _trials(1, 3.0)}
    fig = det_plot(curves)
    assert isinstance(fig, Figure)
    texts = _tick_texts(fig)
    assert "0.1%" in texts and "40%" in texts
    assert all(t.endswith("%") for t in texts)
    ax = fig.axes[0]
    # Probit scaling: tick positions are normal deviates of the labelled rates.
    np.testing.assert_allclose(ax.get_xticks()[:2], norm.ppf([0.001, 0.002]))
    np.testing.assert_allclose(ax.get_xlim(), norm.ppf([0.0005, 0.5]))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 2
    for name, (scores, labels) in curves.items():
        rate = eer(scores, labels)
        assert any(name in t and f"EER {100 * rate:.2f} %" in t for t in legend)
        # EER marker sits on the diagonal at probit(EER).
        markers = [ln for ln in ax.lines if ln.get_marker() == "o"]
        assert any(np.allclose(ln.get_xydata(), norm.ppf(rate)) for ln in markers)
    assert any(ln.get_linestyle() == "--" for ln in ax.lines)  # diagonal


def test_det_plot_uses_given_axes():
    fig = Figure()
    ax = fig.subplots()
    assert det_plot({"sys": _trials(2, 2.0)}, ax=ax) is fig
    assert len(ax.lines) == 3  # curve, EER marker, diagonal


@pytest.mark.parametrize("curves", [{}, [(np.zeros(3), np.array([0, 1, 0]))]])
def test_det_plot_rejects_non_mapping(curves):
    with pytest.raises(ValueError, match="mapping"):
        det_plot(curves)


def test_det_seeds_plot_averages_seeds_without_pooling_their_scores():
    """Two seeds whose scores sit on different scales: pooled, their curve would be no model's; the
    average of their miss rates in normal-deviate space is each model's curve where they agree."""
    scores, labels = _trials(4, 3.0)
    seeds = [(scores, labels), (10 * scores + 5, labels)]  # the same model up to a monotone map: one DET
    fig = det_seeds_plot({"arm": seeds, "other": [_trials(5, 1.5)]})
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    rate = eer(scores, labels)
    assert legend == [f"arm: 2 seeds, mean EER {100 * rate:.2f} %",
                      f"other: 1 seed, mean EER {100 * eer(*_trials(5, 1.5)):.2f} %"]
    thin = [ln for ln in ax.lines if ln.get_label() == "_seed"]
    assert len(thin) == 3 and thin[0].get_color() == thin[1].get_color() != thin[2].get_color()
    average = next(ln for ln in ax.lines if ln.get_label().startswith("arm:"))
    x, y = average.get_xydata().T
    p_miss, p_fa, _ = det_curve(scores, labels)
    np.testing.assert_allclose(y, np.interp(x, norm.ppf(np.clip(p_fa, 1e-9, 1))[::-1],
                                            norm.ppf(np.clip(p_miss, 1e-9, 1 - 1e-9))[::-1]))
    marker = next(ln for ln in ax.lines if ln.get_marker() == "o")
    np.testing.assert_allclose(marker.get_xydata(), norm.ppf(rate))
    with pytest.raises(ValueError, match="none empty"):
        det_seeds_plot({"arm": []})


def test_score_histogram_marks_eer_threshold():
    scores, labels = _trials(3, 2.0)
    fig = score_histogram(scores, labels)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    _, threshold = eer_threshold(scores, labels)
    vline = [ln for ln in ax.lines if ln.get_linestyle() == "--"][0]
    assert vline.get_xdata()[0] == pytest.approx(threshold)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("EER threshold" in t for t in legend)
    assert any(f"target (n={labels.sum()})" in t for t in legend)
    # Two density histograms, each integrating to 1.
    heights = np.array([p.get_height() for p in ax.patches])
    width = ax.patches[0].get_width()
    assert heights.sum() * width == pytest.approx(2.0)


def test_score_histogram_explicit_threshold():
    scores, labels = _trials(4, 2.0)
    fig = score_histogram(scores, labels, threshold=0.25)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "threshold 0.25" in legend


def test_history_plot_list_and_frame():
    history = [
        {"epoch": 1, "loss": 5.0, "accuracy": 0.1, "val_eer": 0.20},
        {"epoch": 2, "loss": 4.0, "accuracy": 0.3},  # no validation this epoch
        {"epoch": 3, "loss": 3.5, "accuracy": 0.4, "val_eer": 0.10},
    ]
    for data in (history, pd.DataFrame(history)):
        fig = history_plot(data)
        assert isinstance(fig, Figure)
        assert [a.get_ylabel() for a in fig.axes] == [
            "training loss", "training accuracy", "validation EER (%)"
        ]
        eer_line = fig.axes[2].lines[0]
        np.testing.assert_allclose(eer_line.get_xdata(), [1, 3])
        np.testing.assert_allclose(eer_line.get_ydata(), [20.0, 10.0])


def test_history_plot_skips_missing_columns():
    fig = history_plot(pd.DataFrame({"epoch": [1, 2], "loss": [2.0, 1.0]}))
    assert [a.get_ylabel() for a in fig.axes] == ["training loss"]
    with pytest.raises(ValueError, match="val_eer"):
        history_plot([{"epoch": 1, "lr": 0.1}])


def test_waveform_spectrogram():
    sr = 16000
    t = np.arange(sr // 2) / sr
    wave = np.sin(2 * np.pi * 440 * t)
    fig = waveform_spectrogram(wave, sr=sr, title="id10001 utt 1")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_title() == "id10001 utt 1"
    assert fig.axes[1].get_ylim()[1] == pytest.approx(sr / 2 / 1000)  # kHz up to Nyquist
    power = np.asarray(fig.axes[1].collections[0].get_array())  # (freq bins, frames), 40 Hz bins
    assert np.argmax(power.mean(axis=1)) * 40 == pytest.approx(440, abs=40)
    with pytest.raises(ValueError, match="1-D"):
        waveform_spectrogram(np.zeros((2, 100)))


def test_filter_responses():
    low = np.linspace(30, 6000, 20)
    high = low + np.linspace(50, 1500, 20)
    fig = filter_responses(low, high)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), (low + high) / 2)
    assert ax.get_xlabel() == "filter index"
    with pytest.raises(ValueError, match=r"filters \[3\]"):
        bad_high = high.copy()
        bad_high[3] = low[3] - 1
        filter_responses(low, bad_high)


def test_frequency_response_highlights():
    rng = np.random.default_rng(5)
    filters = rng.normal(size=(10, 251))
    fig = frequency_response(filters, sr=16000, highlight=[0, 9])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 12  # 10 faint + 2 highlighted
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["filter 0", "filter 9"]
    assert max(ln.get_ydata().max() for ln in ax.lines) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[10\]"):
        frequency_response(filters, highlight=[10])


def test_save_figure_writes_atomically(tmp_path):
    scores, labels = _trials(6, 2.0)
    fig = det_plot({"sys": (scores, labels)})
    folder = tmp_path / "run" / "figures"
    paths = save_figure(fig, folder, "det", data={"scores": scores, "labels": labels})
    assert [p.name for p in paths] == ["det.png", "det.svg", "det.npz"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()
    with np.load(paths[2]) as saved:
        np.testing.assert_array_equal(saved["scores"], scores)
    assert sorted(p.name for p in folder.iterdir()) == ["det.npz", "det.png", "det.svg"]


def test_save_figure_without_data_and_bad_name(tmp_path):
    fig = score_histogram(*_trials(7, 2.0))
    paths = save_figure(fig, tmp_path, "hist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png", "hist.svg"]
    assert len(paths) == 2
    with pytest.raises(ValueError, match="plain file stem"):
        save_figure(fig, tmp_path, "sub/hist")


def test_det_axes_widen_for_a_weak_system_and_the_legend_stays_clear_of_it() -> None:
    strong, weak = _trials(3, 2.5), _trials(4, 0.6)  # EER about 11 % and 38 %
    fig = det_plot({"strong": strong, "weak": weak})
    ax = fig.axes[0]
    weak_eer = eer(*weak)
    assert norm.ppf(2 * weak_eer) == pytest.approx(ax.get_xlim()[1], abs=1e-6)  # twice the largest EER
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x1 < axes.x0 + 0.6 * axes.width and legend.y1 < axes.y0 + 0.5 * axes.height  # lower left, clear of EER points
    assert det_plot({"strong": strong}).axes[0].get_xlim()[1] == pytest.approx(norm.ppf(0.5))
    assert det_plot({"weak": weak}, limits=(0.01, 0.4)).axes[0].get_xlim()[1] == pytest.approx(norm.ppf(0.4))
