"""What the train notebook shows of a finished run: its curves per epoch, its eers.txt, and whether
the loader kept up. A performance-mode run validates nothing and keeps no history: its summary is
its report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from IPython.display import display

from rawnet_lib.views.plots import history_plot, loader_plot, save_figure

__all__ = ["training_report", "loader_report"]


def _history(run: Path) -> list[dict[str, Any]]:
    return json.loads((run / "history.json").read_text())


def _columns(history: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The per-epoch values a figure drew, as arrays saved beside it (nan where an epoch lacks one)."""
    return {name: np.array([h.get(name, np.nan) for h in history], dtype=float)
            for name in names if any(name in h for h in history)}


def training_report(run: Path, summary: dict[str, Any]) -> None:
    """Loss, accuracy and validation EER per epoch (saved as `<run>/figures/history`) and the
    run's eers.txt."""
    if not summary:  # launch's summary on a node without global rank 0, which writes no run files
        print("this machine holds no global rank 0: the run's files and report are on the node that does "
              "(the host named in the run's run.json)")
        return
    if summary.get("mode") == "performance":
        print("performance mode: no curves (it validates nothing); its figures are the summary above")
        return
    history = _history(run)
    fig = history_plot(history)
    save_figure(fig, run / "figures", "history", _columns(history, ("epoch", "loss", "accuracy", "val_eer")))
    display(fig)
    print((run / "eers.txt").read_text())


def loader_report(run: Path, summary: dict[str, Any]) -> None:
    """Training rate against the loader's own rate and the share of step time spent waiting for
    data, per epoch (saved as `<run>/figures/loader`): a loader near the training rate, or a large
    wait, is what limits training. A performance-mode run's summary holds its rates instead."""
    if not summary or summary.get("mode") == "performance":
        return
    history = _history(run)
    fig = loader_plot(history)
    save_figure(fig, run / "figures", "loader",
                _columns(history, ("epoch", "crops_per_s", "loader_crops_per_s", "data_wait_share")))
    display(fig)
    for h in history:
        print(f"epoch {h['epoch']}: {h['crops_per_s']:.1f} crops/s, loader alone {h['loader_crops_per_s']:.0f} "
              f"crops/s, waiting for data {100 * h['data_wait_share']:.0f} %")
