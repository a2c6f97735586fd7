"""Every measurement in one call, its chart, and the command line (`python -m rawnet_lib.bench`)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rawnet_lib import bench
from rawnet_lib.bench.common import PAPER_CLASSES, PATHS, QUICK
from rawnet_lib.bench.compute import bench_accel, bench_memory, bench_scale, bench_train, matmul_peak
from rawnet_lib.bench.inference import bench_embed
from rawnet_lib.bench.loading import bench_data_scale, bench_load
from rawnet_lib.bench.numerics import bench_subnormals
from rawnet_lib.bench.scoring import bench_gather, bench_score
from rawnet_lib.config import cli_config, cli_parser, load_config, repo_path
from rawnet_lib.io import atomic_write_text
from rawnet_lib.models import fastsinc
from rawnet_lib.views.plots import save_figure

__all__ = ["results_folder", "run_all", "plot_comparison", "summary_table", "speed_figure", "memory_figure", "main"]

SCALE_QUICK = {"speakers": 20, "videos": 2, "utterances": 3, "batches": 4}
SUMMARY_COLUMNS = ["name", "path", "dtype", "processes", "crops_per_s", "seconds", "gflops", "ratio", "peak_rss_mib",
                   "cosine_min"]


def results_folder(out_dir: str | Path) -> Path:
    """A new time-stamped folder under `out_dir` (relative: the repository's) for one benchmark's results."""
    folder = repo_path(out_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_all(preset: str = "paper", batch_size: int = 8, repeats: int = 5, quick: bool = False,
            data_path: str | Path | None = None, scale: bool = True, out: Path | None = None) -> list[dict[str, Any]]:
    """Every measurement; quick: smoke preset, small batch, 2 rounds, small lists, no scaling runs.
    With `out`, the records are also written to `out/records.json`."""
    if quick:
        preset, batch_size, repeats = QUICK["preset"], QUICK["batch"], QUICK["repeats"]
        compiled = fastsinc.set_compile(False)  # no compile time; same results, slower kernels
    try:
        records = _run_all(preset, batch_size, repeats, quick, data_path, scale)
    finally:
        if quick:
            fastsinc.set_compile(compiled)
    if out is not None:
        atomic_write_text(Path(out) / "records.json", json.dumps(records, indent=1))
    return records


def _run_all(preset: str, batch: int, repeats: int, quick: bool, data_path: str | Path | None,
             scale: bool) -> list[dict[str, Any]]:
    dim = load_config(preset).model.embedding_dim
    records = matmul_peak(512 if quick else 2048, repeats)
    records += bench_train(preset, batch, repeats, n_classes=10 if quick else PAPER_CLASSES)
    records += bench_memory(preset, batch, n_classes=10 if quick else PAPER_CLASSES, steps=1 if quick else 2)
    records += bench_embed(preset, 4 * batch, repeats, data_path)
    records += bench_load(preset, batch, 4 if quick else 100, data_path=data_path, augment=True)
    records += bench_score(20_000 if quick else 580_000, 2_000 if quick else 145_000, dim, 1 if quick else 3)
    if scale and not quick:
        records += bench_scale(preset, batch, data_path=str(data_path or ""))
    return records


def plot_comparison(records: list[dict[str, Any]], metric: str = "crops_per_s", ax=None):
    """Bars of `metric` per measurement name, exact next to fast; returns the Figure."""
    if ax is None:
        ax = Figure(figsize=(6, 3.5)).subplots()
    rows = [r for r in records if r.get("path") in PATHS and metric in r]
    names = list(dict.fromkeys(r["name"] for r in rows))
    for j, path in enumerate(PATHS):
        values = [next((r[metric] for r in rows if r["name"] == n and r["path"] == path), 0.0) for n in names]
        bars = ax.bar(np.arange(len(names)) + (j - 0.5) * 0.4, values, 0.4, label=path)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel(metric)
    ax.legend()
    return ax.figure


def summary_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records' main columns, one row per measurement."""
    table = pd.DataFrame(records)
    return table[[c for c in SUMMARY_COLUMNS if c in table]]


def speed_figure(records: list[dict[str, Any]], folder: Path) -> Figure:
    """Training and embedding crops/s, exact next to fast, saved as `folder/speed`."""
    rows = [r for r in records if r["name"] in ("train_step", "embed")]
    fig = plot_comparison(rows, "crops_per_s")
    presets = sorted({r["preset"] for r in rows if "preset" in r})
    fig.axes[0].set_title(f"{', '.join(presets)} preset, crops per second (higher is better)")
    save_figure(fig, folder, "speed")
    return fig


def memory_figure(records: list[dict[str, Any]], folder: Path) -> Figure:
    """Peak RSS of a training step, exact next to fast, saved as `folder/memory`."""
    fig = plot_comparison([r for r in records if r["name"] == "train_memory"], "peak_rss_mib")
    fig.axes[0].set_title("peak RSS of a training step, MiB (lower is better)")
    save_figure(fig, folder, "memory")
    return fig


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    usage = bench.__doc__  # the package's docstring: what each command measures
    parser = cli_parser("python -m rawnet_lib.bench", usage, preset=None, fields=("data_path",),
                        config_help="model preset to time, a name or YAML (default paper; smoke with --quick)")
    parser.add_argument("what", choices=["train", "accel", "memory", "embed", "load", "score", "gather", "peak",
                                         "scale", "scale-data", "subnormals", "all"])
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default 8; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per path (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small and fast: a check that everything runs")
    parser.add_argument("--checkpoint", default="", help="trained weights: embed compares with them, subnormals "
                        "(required) looks at their training step")
    parser.add_argument("--augment", action="store_true", help="load: also the loader with augmentation on")
    args = parser.parse_args(argv)
    custom = bool(args.config or args.batch_size or args.repeats)
    defaults = QUICK if args.quick else {"preset": "paper", "batch": 8, "repeats": 5}
    args.config = preset = args.config or defaults["preset"]
    batch, repeats = args.batch_size or defaults["batch"], args.repeats or defaults["repeats"]
    n_classes = 10 if args.quick else PAPER_CLASSES
    data = cli_config(args).data.data_path or None   # --data_path, else the preset's ('': the demo corpus)
    if args.what == "subnormals" and not args.checkpoint:
        parser.error("subnormals needs --checkpoint, e.g. a run's models/last.pt")
    if args.what == "all":
        return run_all(preset, batch, repeats, args.quick and not custom, data)
    run = {"train": lambda: bench_train(preset, batch, repeats, n_classes),
           "accel": lambda: bench_accel(preset, batch, repeats, n_classes),
           "memory": lambda: bench_memory(preset, batch, n_classes, 1 if args.quick else 2),
           "embed": lambda: bench_embed(preset, 4 * batch, repeats, data, args.checkpoint or None),
           "load": lambda: bench_load(preset, batch, 4 if args.quick else 100, data_path=data, augment=args.augment),
           "score": lambda: bench_score(*((20_000, 2_000) if args.quick else (580_000, 145_000)),
                                        load_config(preset).model.embedding_dim, 1 if args.quick else 3),
           "gather": lambda: bench_gather(*((18_125, 1024, 72_500) if args.quick else (145_000, 1024, 580_000))),
           "peak": lambda: matmul_peak(512 if args.quick else 2048, repeats),
           "scale": lambda: bench_scale(preset, batch, 2 if args.quick else 6, 1 if args.quick else 2,
                                        data_path=str(data or "")),
           "scale-data": lambda: bench_data_scale(preset, data, **(SCALE_QUICK if args.quick else {})),
           "subnormals": lambda: bench_subnormals(args.checkpoint, batch if args.batch_size else 32, data,
                                                  base=preset)}
    return run[args.what]()
