"""What every measurement shares: the model's GFLOP count, the machine, memory readings, one
JSON record per measurement, and paths timed in turns so that load from other work cancels out."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rawnet_lib.config import Config, ModelConfig, load_config
from rawnet_lib.eval.embed import cpu_amp

__all__ = ["PATHS", "QUICK", "PAPER_CLASSES", "VOX2_FILES", "model_gflop", "environment", "rss_mib", "status_kib",
           "reset_peak", "record", "path_config", "alternate", "sig", "speed_records"]

PATHS = {"exact": {"fast": False, "amp": "off"}, "fast": {"fast": True, "amp": cpu_amp()}}
QUICK = {"preset": "smoke", "batch": 4, "repeats": 2}
PAPER_CLASSES = 5994  # VoxCeleb2 dev speakers: the output layer of the paper model
VOX2_FILES = 1_092_009  # VoxCeleb2 dev utterances


def model_gflop(mcfg: ModelConfig, n_classes: int = 0) -> dict[str, float]:
    """Forward GFLOP per crop by layer (2 FLOP per multiply-add), plus `total` and `train` (3x)."""
    t = mcfg.n_samples - mcfg.sinc_kernel + 1
    out = {"sinc": 2 * mcfg.sinc_filters * mcfg.sinc_kernel * t}
    t //= 3
    widths = [mcfg.sinc_filters, *mcfg.blocks]
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        flop = 2 * 3 * t * (c_in * c_out + c_out * c_out) + 2 * c_out * c_out  # conv1, conv2, FMS
        if c_in != c_out:
            flop += 2 * c_in * c_out * t                                       # conv_downsample
        out[f"block{i}"] = flop
        t //= 3
    h = mcfg.gru_units
    out["gru"] = sum(2 * 3 * ((widths[-1] if l == 0 else h) * h + h * h) * t for l in range(mcfg.gru_layers))
    out["fc"] = 2 * h * mcfg.embedding_dim + 2 * mcfg.embedding_dim * n_classes
    out = {k: v / 1e9 for k, v in out.items()}
    out["total"] = sum(out.values())
    out["train"] = 3 * out["total"]
    return out


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def record(name: str, **fields: Any) -> dict[str, Any]:
    rec = {"name": name, **fields, "peak_rss_mib": fields.get("peak_rss_mib", round(rss_mib(), 1)),
           **environment()}
    print(json.dumps(rec), flush=True)
    return rec


def path_config(preset: str, path: str) -> Config:
    cfg = load_config(preset)
    cfg.model.fast, cfg.train.amp = PATHS[path]["fast"], PATHS[path]["amp"]
    return cfg


def alternate(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions taking turns within a round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: fixed decimals would print a small model's rate as 0."""
    return float(f"{x:.{digits}g}")


def speed_records(name: str, times: dict[str, list[float]], crops: int, gflop_per_crop: float,
                   **extra: Any) -> list[dict[str, Any]]:
    """One record per path: median crops/s, GFLOP/s and the median per-round ratio to the first
    (the exact path; float32 where the paths are AMP modes)."""
    out, base = [], next(iter(times.values()))
    for path, secs in times.items():
        ratios = [e / s for e, s in zip(base, secs)]
        rate = crops / statistics.median(secs)
        amp = PATHS[path]["amp"] if path in PATHS else path
        out.append(record(name, path=path, amp=amp, crops_per_s=sig(rate),
                           seconds=round(statistics.median(secs), 4), gflops=sig(rate * gflop_per_crop),
                           gflop_per_crop=sig(gflop_per_crop), ratio=sig(statistics.median(ratios)),
                           ratio_min=sig(min(ratios)), ratio_max=sig(max(ratios)),
                           rounds=[round(s, 4) for s in secs], **extra))
    return out
