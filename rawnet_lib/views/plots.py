"""Figures for the workbook: DET curves, score histograms, training history, audio, filters.

Every function takes plain data and an optional ``ax``, draws with matplotlib's
object-oriented API and returns the ``Figure``. Nothing here calls ``show()``, imports
pyplot or picks a backend, so notebooks control display and tests run headless.
Figures made here are plain ``matplotlib.figure.Figure`` objects (not registered with
pyplot), so they are freed when dropped and a notebook shows each one once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy.signal import spectrogram
from scipy.stats import norm

from rawnet_lib.eval.metrics import det_curve, eer_threshold, validate_trials
from rawnet_lib.io import atomic_open

__all__ = [
    "DET_TICKS",
    "det_plot",
    "det_seeds_plot",
    "score_histogram",
    "history_plot",
    "loader_plot",
    "waveform_spectrogram",
    "filter_responses",
    "frequency_response",
    "fms_plot",
    "duration_histogram",
    "save_figure",
]

DET_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9)
_HISTORY_PANELS = (  # column, y label, scale
    ("loss", "training loss", 1.0),
    ("accuracy", "training accuracy", 1.0),
    ("val_eer", "validation EER (%)", 100.0),
)


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Use the caller's axes, or make a stand-alone figure with one."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def _axes_list(
    ax: Axes | Sequence[Axes] | None, n: int, figsize: tuple[float, float], **grid
) -> tuple[Figure, list[Axes]]:
    """Use the caller's n axes, or make a figure with n stacked/side-by-side panels."""
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        axes = fig.subplots(**grid, squeeze=False).ravel().tolist()
        return fig, axes
    axes = [ax] if isinstance(ax, Axes) else list(ax)
    if len(axes) != n:
        raise ValueError(f"ax must hold {n} Axes for this plot, got {len(axes)}; pass ax=None")
    return axes[0].figure, axes


def _probit(p: np.ndarray) -> np.ndarray:
    """Normal deviate of a rate, clipped so 0 and 1 land off-axis rather than at inf."""
    return norm.ppf(np.clip(p, 1e-9, 1 - 1e-9))


def det_plot(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    ax: Axes | None = None,
    limits: tuple[float, float] | None = None,
) -> Figure:
    """DET curves (miss vs false-acceptance rate) on normal-deviate axes, ticks in %.

    ``curves`` maps a legend name to (scores, labels) with labels 1 = same speaker.
    Each curve's EER is shown in the legend and marked on the curve; the diagonal
    P_miss = P_fa is drawn so the EER points are easy to read off. ``limits`` default
    to 0.05-50 %, the upper end widened to twice the largest EER (up to 95 %) so that a
    weak system's EER point stays well inside the axes.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(
            f"curves must be a non-empty mapping name -> (scores, labels), got {type(curves).__name__}"
        )
    rates = {name: eer_threshold(scores, labels)[0] for name, (scores, labels) in curves.items()}
    fig, ax = _axes(ax, (5.0, 5.0))
    for name, (scores, labels) in curves.items():
        p_miss, p_fa, _ = det_curve(scores, labels)
        (line,) = ax.plot(_probit(p_fa), _probit(p_miss), label=f"{name} (EER {100 * rates[name]:.2f} %)")
        ax.plot(_probit(rates[name]), _probit(rates[name]), "o", color=line.get_color(), label="_eer_marker")
    _det_axes(ax, limits, max(rates.values()))
    return fig


def det_seeds_plot(
    arms: Mapping[str, Sequence[tuple[ArrayLike, ArrayLike]]],
    ax: Axes | None = None,
    limits: tuple[float, float] | None = None,
) -> Figure:
    """DET curves of recipes trained with several seeds: each seed's curve thin, and per recipe the
    average of its seeds' miss rates in normal-deviate space at each false-acceptance rate (thick),
    marked at the mean of the seeds' EERs. Scores of different models are never pooled: each
    model's scores have their own scale, so one curve of all of them would be no model's.

    ``arms`` maps a legend name to one (scores, labels) per seed, labels 1 = same speaker.
    """
    if not isinstance(arms, Mapping) or not arms or not all(len(runs) for runs in arms.values()):
        raise ValueError("arms must be a non-empty mapping name -> [(scores, labels) per seed], none empty")
    rates = {name: [eer_threshold(s, y)[0] for s, y in runs] for name, runs in arms.items()}
    lo, hi = _det_limits(limits, max(max(r) for r in rates.values()))
    grid = np.linspace(norm.ppf(lo), norm.ppf(hi), 400)
    fig, ax = _axes(ax, (5.0, 5.0))
    for name, runs in arms.items():
        misses = []
        color = None
        for scores, labels in runs:
            p_miss, p_fa, _ = det_curve(scores, labels)
            x, y = _probit(p_fa)[::-1], _probit(p_miss)[::-1]  # by increasing false-acceptance rate
            (line,) = ax.plot(x, y, color=color, linewidth=0.6, alpha=0.45, label="_seed")
            color = line.get_color()
            misses.append(np.interp(grid, x, y))
        mean = float(np.mean(rates[name]))
        ax.plot(grid, np.mean(misses, axis=0), color=color, linewidth=1.8,
                label=f"{name}: {len(runs)} seed{'s' if len(runs) > 1 else ''}, mean EER {100 * mean:.2f} %")
        ax.plot(_probit(mean), _probit(mean), "o", color=color, label="_eer_marker")
    _det_axes(ax, (lo, hi), 0.0)
    return fig


def _det_limits(limits: tuple[float, float] | None, worst: float) -> tuple[float, float]:
    lo, hi = limits or (0.0005, float(np.clip(2 * worst, 0.5, 0.95)))
    if not 0 < lo < hi < 1:
        raise ValueError(f"limits must satisfy 0 < low < high < 1, got {limits}")
    return lo, hi


def _det_axes(ax: Axes, limits: tuple[float, float] | None, worst: float) -> None:
    """Normal-deviate axes between `limits` (see det_plot), ticks in %, the EER diagonal, the legend."""
    lo, hi = _det_limits(limits, worst)
    edge = norm.ppf([lo, hi])
    ax.plot(edge, edge, "--", color="0.6", linewidth=0.8, label="_diagonal")
    ticks = [t for t in DET_TICKS if lo <= t <= hi]
    tick_labels = [f"{100 * t:g}%" for t in ticks]
    ax.set_xticks(norm.ppf(ticks), tick_labels)
    ax.set_yticks(norm.ppf(ticks), tick_labels)
    ax.tick_params(labelsize="small")
    ax.tick_params(axis="x", labelrotation=45)  # low-end ticks are close together
    ax.set_xlim(edge)
    ax.set_ylim(edge)
    ax.set_aspect("equal")
    ax.set_xlabel("false acceptance rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.grid(True, linewidth=0.4)
    ax.legend(loc="lower left", fontsize="small")  # DET curves leave that corner empty


def score_histogram(
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float | None = None,
    ax: Axes | None = None,
    bins: int = 60,
) -> Figure:
    """Target and non-target score densities with a threshold line (default: EER threshold).

    Densities, not counts, because non-targets usually outnumber targets by far.
    """
    s, y = validate_trials(scores, labels)
    if threshold is None:
        _, threshold = eer_threshold(s, y)
        line_label = f"EER threshold {threshold:.3g}"
    else:
        line_label = f"threshold {threshold:.3g}"
    fig, ax = _axes(ax, (6.0, 3.5))
    low, high = float(s.min()), float(s.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    ax.hist(s[~y], bins=edges, density=True, alpha=0.5, label=f"non-target (n={int((~y).sum())})")
    ax.hist(s[y], bins=edges, density=True, alpha=0.5, label=f"target (n={int(y.sum())})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1.0, label=line_label)
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return fig


def history_plot(
    history: Sequence[Mapping[str, float]] | pd.DataFrame, ax: Axes | Sequence[Axes] | None = None
) -> Figure:
    """Per-epoch training loss, accuracy and validation EER (%) side by side.

    ``history`` is a list of per-epoch dicts or a DataFrame with columns among
    epoch, loss, accuracy, val_eer (a fraction, as ``metrics.eer`` returns).
    Missing or all-NaN columns are skipped; ``ax`` (if given) holds one Axes per panel.
    """
    frame = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    panels = [
        p for p in _HISTORY_PANELS
        if p[0] in frame and pd.to_numeric(frame[p[0]], errors="coerce").notna().any()
    ]
    if not panels:
        raise ValueError(
            f"history has none of the columns {[p[0] for p in _HISTORY_PANELS]} "
            f"(found {list(frame.columns)}); log them per epoch"
        )
    epochs = frame["epoch"].to_numpy(float) if "epoch" in frame else np.arange(1, len(frame) + 1.0)
    fig, axes = _axes_list(ax, len(panels), (3.2 * len(panels), 3.0), nrows=1, ncols=len(panels))
    for axis, (column, ylabel, scale) in zip(axes, panels):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(float) * scale
        keep = np.isfinite(values)
        axis.plot(epochs[keep], values[keep], "o-", markersize=3)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.grid(True, linewidth=0.4)
    return fig


def loader_plot(
    history: Sequence[Mapping[str, float]] | pd.DataFrame, ax: Axes | Sequence[Axes] | None = None
) -> Figure:
    """Per epoch: the training rate next to the loader's own rate (crops/s), and the share of
    step time spent waiting for data. A loader rate near the training rate, or a large wait
    share, says the loader (disk, decoding, too few workers) is what limits training.

    ``history`` holds epoch, crops_per_s, loader_crops_per_s and data_wait_share (a fraction).
    """
    frame = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    needed = ["crops_per_s", "loader_crops_per_s", "data_wait_share"]
    missing = [c for c in needed if c not in frame]
    if missing:
        raise ValueError(f"history lacks {missing} (found {list(frame.columns)}); runs record them from "
                         "this version on: train again to see the loader's figures")
    epochs = frame["epoch"].to_numpy(float) if "epoch" in frame else np.arange(1, len(frame) + 1.0)
    fig, (rates, wait) = _axes_list(ax, 2, (6.4, 3.0), nrows=1, ncols=2)
    rates.plot(epochs, frame["crops_per_s"].to_numpy(float), "o-", markersize=3, label="training")
    rates.plot(epochs, frame["loader_crops_per_s"].to_numpy(float), "s--", markersize=3, label="loader alone")
    rates.set_ylabel("crops/s")
    rates.set_yscale("log")
    rates.legend()
    wait.plot(epochs, 100 * frame["data_wait_share"].to_numpy(float), "o-", markersize=3)
    wait.set_ylabel("waiting for data (% of step time)")
    wait.set_ylim(0, 100)
    for axis in (rates, wait):
        axis.set_xlabel("epoch")
        axis.grid(True, linewidth=0.4)
    return fig


def waveform_spectrogram(
    wave: np.ndarray, sr: int = 16000, title: str = "", ax: Sequence[Axes] | None = None
) -> Figure:
    """Small waveform-over-spectrogram picture for listening tables.

    25 ms Hann frames with a 10 ms hop (the front end's own scale), power in dB
    clipped to 80 dB below the peak. ``ax`` (if given) is (waveform_ax, spectrogram_ax).
    """
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"wave must be 1-D with at least 2 samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"wave has {int((~np.isfinite(x)).sum())} non-finite samples")
    if sr <= 0:
        raise ValueError(f"sr must be a positive sample rate in Hz, got {sr}")
    fig, (wave_ax, spec_ax) = _axes_list(
        ax, 2, (4.0, 3.0), nrows=2, ncols=1, sharex=True, height_ratios=(1, 2)
    )
    wave_ax.plot(np.arange(x.size) / sr, x, linewidth=0.5)
    wave_ax.set_ylabel("amplitude")
    if title:
        wave_ax.set_title(title, fontsize="medium")
    nperseg = min(int(0.025 * sr), x.size)
    hop = max(1, int(0.010 * sr))
    freqs, times, power = spectrogram(
        x, fs=sr, window="hann", nperseg=nperseg, noverlap=max(0, nperseg - hop)
    )
    db = 10.0 * np.log10(power + 1e-12)
    spec_ax.pcolormesh(times, freqs / 1000.0, db, shading="auto", vmin=db.max() - 80.0, vmax=db.max())
    spec_ax.set_ylim(0.0, sr / 2000.0)
    spec_ax.set_xlim(0.0, x.size / sr)
    spec_ax.set_xlabel("time (s)")
    spec_ax.set_ylabel("frequency (kHz)")
    return fig


def filter_responses(low_hz: ArrayLike, high_hz: ArrayLike, ax: Axes | None = None) -> Figure:
    """SincNet band-pass filter bank as shaded passbands [low, high] plus centre frequency.

    Arrays have shape (n_filters,) in Hz (detach torch tensors first); plotting against
    filter index shows at a glance how training moved and widened the bands.
    """
    low = np.asarray(low_hz, dtype=np.float64)
    high = np.asarray(high_hz, dtype=np.float64)
    if low.ndim != 1 or low.shape != high.shape or low.size == 0:
        raise ValueError(
            f"low_hz and high_hz must be 1-D arrays of equal length, got {low.shape} and {high.shape}"
        )
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError("low_hz and high_hz must be finite")
    if (low < 0).any() or (high < low).any():
        bad = np.flatnonzero((low < 0) | (high < low))
        raise ValueError(f"need 0 <= low_hz <= high_hz; filters {bad[:10].tolist()} violate it")
    fig, ax = _axes(ax, (6.0, 3.5))
    index = np.arange(low.size)
    ax.fill_between(index, low, high, step="mid", alpha=0.35, label="passband [low, high]")
    ax.plot(index, (low + high) / 2.0, linewidth=1.0, label="centre frequency")
    ax.set_xlabel("filter index")
    ax.set_ylabel("frequency (Hz)")
    ax.legend(fontsize="small")
    return fig


def frequency_response(
    filters: np.ndarray,
    sr: int = 16000,
    ax: Axes | None = None,
    highlight: Sequence[int] | None = None,
) -> Figure:
    """Magnitude response (dB re each filter's peak) of filter taps of shape (n, taps).

    All filters are drawn faintly; ``highlight`` (default: 4 evenly spaced) in colour.
    """
    taps = np.asarray(filters, dtype=np.float64)
    if taps.ndim != 2 or taps.shape[0] == 0 or taps.shape[1] < 2:
        raise ValueError(f"filters must have shape (n_filters, taps >= 2), got {taps.shape}")
    if not np.isfinite(taps).all():
        raise ValueError("filters contain non-finite taps")
    if sr <= 0:
        raise ValueError(f"sr must be a positive sample rate in Hz, got {sr}")
    n = taps.shape[0]
    if highlight is None:
        highlight = np.unique(np.linspace(0, n - 1, min(4, n)).round().astype(int)).tolist()
    out_of_range = [i for i in highlight if not 0 <= i < n]
    if out_of_range:
        raise ValueError(f"highlight indices {out_of_range} out of range for {n} filters")
    n_fft = max(1024, 1 << (taps.shape[1] - 1).bit_length())
    magnitude = np.abs(np.fft.rfft(taps, n=n_fft, axis=1))
    peak = magnitude.max(axis=1, keepdims=True)
    db = 20.0 * np.log10(magnitude / np.where(peak > 0, peak, 1.0) + 1e-10)
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    fig, ax = _axes(ax, (6.0, 3.5))
    ax.plot(freqs, db.T, color="0.75", linewidth=0.4)
    for i in highlight:
        ax.plot(freqs, db[i], linewidth=1.2, label=f"filter {i}")
    ax.set_ylim(-80.0, 5.0)
    ax.set_xlim(0.0, sr / 2.0)
    ax.set_xlabel("frequency (Hz)")
    ax.set_ylabel("magnitude (dB re peak)")
    ax.legend(fontsize="small")
    return fig


def fms_plot(scales: Mapping[str, np.ndarray], ax: Axes | None = None) -> Figure:
    """FMS gates per block (one row per block, one column per filter): what each block scales."""
    if not scales:
        raise ValueError("scales is empty; pass {block name: gate values} from summary.fms_scales")
    width = max(len(v) for v in scales.values())
    grid = np.full((len(scales), width), np.nan)
    for row, values in enumerate(scales.values()):
        grid[row, : len(values)] = values
    fig, ax = _axes(ax, (7.0, 0.45 * len(scales) + 1.5))
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(scales)), list(scales))
    ax.set_xlabel("filter")
    fig.colorbar(image, ax=ax, label="sigmoid gate s (x * s + s)")
    return fig


def duration_histogram(seconds: Mapping[str, np.ndarray], ax: Axes | None = None,
                       crop_s: float | None = None) -> Figure:
    """Utterance durations per folder; crop_s marks the training crop (shorter files are tiled)."""
    fig, ax = _axes(ax, (6.0, 3.5))
    for name, values in seconds.items():
        ax.hist(np.asarray(values, dtype=float), bins=40, alpha=0.6, label=f"{name} ({len(values)})")
    if crop_s:
        ax.axvline(crop_s, color="k", linestyle="--", linewidth=1, label=f"training crop {crop_s:.2f} s")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.legend(fontsize="small")
    return fig


def save_figure(
    fig: Figure, folder: Path, name: str, data: Mapping[str, np.ndarray] | None = None
) -> list[Path]:
    """Save ``name``.png and .svg (and .npz of ``data``) into ``folder``; return the paths.

    The arrays behind a figure are kept next to it so it can be redrawn without rerunning.
    """
    if not name or Path(name).name != name or name in {".", ".."}:
        raise ValueError(f"name must be a plain file stem without folders, got {name!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "svg"):
        path = folder / f"{name}.{fmt}"
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    if data is not None:
        arrays = {str(k): np.asarray(v) for k, v in data.items()}
        path = folder / f"{name}.npz"
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)
        paths.append(path)
    return paths
