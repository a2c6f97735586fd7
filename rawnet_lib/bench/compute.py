"""The compute side: on the CPU the matrix-product peak, training steps of the exact and fast
paths, their memory, and the trainer's throughput with 1 and 2 processes; on an accelerator the
training step per AMP mode."""
from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from rawnet_lib.bench.common import (PAPER_CLASSES, PATHS, alternate, model_gflop, path_config, record, reset_peak,
                                     rss_mib, speed_records, status_kib)
from rawnet_lib.config import load_config
from rawnet_lib.dist import DistError, resolve_device_kind
from rawnet_lib.eval.embed import autocast, native_amp
from rawnet_lib.models import fastsinc
from rawnet_lib.models.rawnet2 import build_model

__all__ = ["matmul_peak", "native_peak", "bench_train", "bench_accel", "bench_memory", "bench_scale"]


def matmul_peak(size: int = 2048, repeats: int = 5) -> list[dict[str, Any]]:
    """GFLOP/s of a size^3 matrix product in float32 and bf16: this machine's practical peak.
    Where the CPU has no bf16 instructions (`native` false) the bf16 product is emulated, some
    100x slower, and is timed at size 512 only."""
    out = []
    for amp in ("off", "bf16"):
        n = size if native_amp(amp) else min(size, 512)
        secs = _matmul_seconds(amp, n, repeats)
        out.append(record("matmul_peak", dtype="float32" if amp == "off" else "bfloat16", size=n,
                           native=native_amp(amp), seconds=round(statistics.median(secs), 5),
                           gflops=round(2 * n ** 3 / statistics.median(secs) / 1e9, 1),
                           gflops_best=round(2 * n ** 3 / min(secs) / 1e9, 1)))
    return out


def _matmul_seconds(amp: str, size: int, repeats: int) -> list[float]:
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return alternate({"mm": lambda: a @ b}, repeats)["mm"]


def native_peak(size: int = 2048, repeats: int = 3) -> float:
    """Best GFLOP/s of the matrix products this CPU runs natively (float32, and bf16 where it
    has bf16 instructions): what a path's GFLOP/s is a share of."""
    return max(2 * size ** 3 / min(_matmul_seconds(amp, size, repeats)) / 1e9
               for amp in ("off", "bf16") if native_amp(amp))


def _train_setup(preset: str, path: str, batch: int, n_classes: int, seed: int = 0,
                 device: str = "cpu", amp: str | None = None):
    """(model, optimizer, one training step) of a path; same weights and batch for every path.
    On an accelerator `amp` replaces the path's, fp16 goes through a GradScaler as in training,
    and a step ends with a device synchronisation, so the wall clock times the work."""
    from rawnet_lib.training.schedules import make_optimizer
    cfg = path_config(preset, path)
    cfg.train.amp = amp or cfg.train.amp
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(cfg, n_classes).train().to(dev)
    optimizer, _ = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.amp == "fp16")
    sync = getattr(torch, dev.type).synchronize if dev.type != "cpu" else lambda: None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.model.n_samples, generator=gen).to(dev)
    y = torch.randint(0, n_classes, (batch,), generator=gen).to(dev)

    def step() -> None:
        with autocast(dev, cfg.train.amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
    return model, optimizer, step


def bench_train(preset: str = "paper", batch: int = 8, repeats: int = 5,
                n_classes: int = PAPER_CLASSES) -> list[dict[str, Any]]:
    """Training steps (forward, backward, Adam) per second, exact and fast alternately."""
    steps = {path: _train_setup(preset, path, batch, n_classes)[2] for path in PATHS}
    times = alternate(steps, repeats, warmup=2)  # warm-up compiles the fast kernels
    gflop = model_gflop(load_config(preset).model, n_classes)["train"]
    return speed_records("train_step", times, batch, gflop, preset=preset, batch=batch,
                          n_classes=n_classes, repeats=repeats)


def bench_accel(preset: str = "paper", batch: int = 8, repeats: int = 5, n_classes: int = PAPER_CLASSES,
                device: str = "auto") -> list[dict[str, Any]]:
    """Training steps on the accelerator (cuda or npu) in float32, bf16 and fp16, alternately:
    the exact path there (the fast path is for CPUs); ratio against float32."""
    kind = resolve_device_kind(device)
    if kind == "cpu":
        raise DistError("bench accel needs a GPU or an Ascend NPU; `bench train` measures the CPU")
    steps = {amp: _train_setup(preset, "exact", batch, n_classes, device=kind, amp=amp)[2]
             for amp in ("off", "bf16", "fp16")}
    times = alternate(steps, repeats, warmup=2)
    gflop = model_gflop(load_config(preset).model, n_classes)["train"]
    return speed_records("accel_step", times, batch, gflop, preset=preset, batch=batch, n_classes=n_classes,
                          repeats=repeats, accelerator=torch.cuda.get_device_name() if kind == "cuda" else kind)


def _memory_child(preset: str, path: str, batch: int, n_classes: int, steps: int) -> dict[str, float]:
    """In a fresh process: RSS before the first step, peak RSS over `steps` steps after a warm-up."""
    _, _, step = _train_setup(preset, path, batch, n_classes)
    before = status_kib("VmRSS") / 1024
    step()  # warm-up: compiles the fast kernels, allocates optimiser state
    reset = reset_peak()
    for _ in range(steps):
        step()
    steady = status_kib("VmHWM") / 1024 if reset else float("nan")
    return {"rss_before_mib": before, "peak_rss_mib": steady, "process_peak_rss_mib": rss_mib()}


def _child_init(threads: int, compile_kernels: bool) -> None:
    """The parent's thread count and kernel setting in a spawned process."""
    torch.set_num_threads(threads)
    fastsinc.set_compile(compile_kernels)


def bench_memory(preset: str = "paper", batch: int = 8, n_classes: int = PAPER_CLASSES,
                 steps: int = 2) -> list[dict[str, Any]]:
    """Peak RSS of training steps, each path in its own fresh process (peaks never reset there)."""
    ctx = multiprocessing.get_context("spawn")
    out, peaks = [], {}
    for path in PATHS:
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_init,
                                 initargs=(torch.get_num_threads(), fastsinc.compile_enabled())) as pool:
            res = pool.submit(_memory_child, preset, path, batch, n_classes, steps).result()
        peaks[path] = res["peak_rss_mib"]
        out.append(record("train_memory", path=path, amp=PATHS[path]["amp"], preset=preset, batch=batch,
                           n_classes=n_classes, peak_rss_mib=round(res["peak_rss_mib"], 1),
                           step_rss_mib=round(res["peak_rss_mib"] - res["rss_before_mib"], 1),
                           process_peak_rss_mib=round(res["process_peak_rss_mib"], 1),
                           ratio=round(res["peak_rss_mib"] / peaks["exact"], 3)))
    return out


def bench_scale(preset: str = "paper", batch: int = 8, steps: int = 6, warmup: int = 2,
                devices: tuple[int, ...] = (1, 2), paths: tuple[str, ...] = ("exact", "fast"),
                data_path: str = "") -> list[dict[str, Any]]:
    """Trainer throughput (performance mode, demo corpus) with 1 and 2 processes per path."""
    from rawnet_lib.training.launch import launch
    out, base = [], {}
    with tempfile.TemporaryDirectory(prefix="rawnet_bench_") as tmp:
        for path in paths:
            for n in devices:
                cfg = load_config(preset, data_path=data_path, mode="performance", devices=n, batch_size=batch,
                                  perf_steps=steps, warmup_steps=warmup, fast=PATHS[path]["fast"],
                                  amp=PATHS[path]["amp"], out_dir=tmp, name=f"{path}_{n}P", overwrite=True)
                with contextlib.redirect_stdout(sys.stderr):  # stdout keeps one JSON line per measurement
                    res = launch(cfg)
                base.setdefault(path, res["crops_per_s"])
                out.append(record("scale", path=path, amp=PATHS[path]["amp"], preset=preset, batch=batch,
                                   processes=n, crops_per_s=round(res["crops_per_s"], 3),
                                   speedup=round(res["crops_per_s"] / base[path], 3),
                                   peak_rss_mib=round(rss_mib(), 1)))
    return out
