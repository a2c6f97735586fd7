"""Benchmarks, rerunnable by anyone: the fast path against the exact reference path, the loader,
scoring and memory at VoxCeleb scale (one module per side: common, compute, inference, loading,
scoring, numerics; cli runs them).

    python -m rawnet_lib.bench all                    # everything, paper preset, batch 8 (~10 min)
    python -m rawnet_lib.bench train --repeats 7      # one measurement kind
    python -m rawnet_lib.bench all --quick            # smoke preset, tiny repeats (< 1 min)
    python -m rawnet_lib.bench train --config demo    # the demo preset's model
    python -m rawnet_lib.bench accel --batch_size 100 # on a GPU or NPU: the step in float32, bf16, fp16
    python -m rawnet_lib.bench scale-data             # a VoxCeleb2-shaped tree of 209,790 links (not in `all`)
    python -m rawnet_lib.bench embed                  # embedding on the CPU: exact, fast, onnxruntime
    python -m rawnet_lib.bench load --augment         # the training loader, plain and augmented
    python -m rawnet_lib.bench subnormals --checkpoint RUN/models/last.pt   # denormals in a training step

Each measurement prints ONE JSON line (name, path, crops_per_s or seconds, gflops, peak_rss_mib,
ratio, device, torch, threads, ...); the functions return the same dicts for
notebooks/benchmark.ipynb. Paths:

* exact: `model.fast: false`, `train.amp: off`, the reference maths in float32;
* fast: `model.fast: true` (rawnet_lib/models/fastsinc.py) with `train.amp: bf16` where the CPU has bf16
  instructions (AVX512-BF16 or AMX), else float32 (`embed.cpu_amp`: emulated bf16 is slower).

The CPU may be shared with other work, so both paths run alternately in one process, one
step each per round, and a ratio is the median of the per-round ratios. GFLOP per crop is
counted from the model's shapes (convolutions, linear layers, GRU; training = 3x forward) and
is the same number for both paths: "gflops" is useful work per second, not instructions.
"""
from rawnet_lib.bench.cli import (main, memory_figure, plot_comparison, results_folder, run_all, speed_figure,
                                  summary_table)
from rawnet_lib.bench.common import PATHS, environment, model_gflop, sig
from rawnet_lib.bench.compute import bench_accel, bench_memory, bench_scale, bench_train, matmul_peak, native_peak
from rawnet_lib.bench.inference import bench_embed, calibrate_batch_norm, speech_crops
from rawnet_lib.bench.loading import bench_data_scale, bench_load
from rawnet_lib.bench.numerics import bench_subnormals, subnormals
from rawnet_lib.bench.scoring import bench_gather, bench_score

__all__ = ["PATHS", "model_gflop", "environment", "sig", "matmul_peak", "native_peak", "bench_train", "bench_accel",
           "bench_memory", "bench_scale", "bench_embed", "calibrate_batch_norm", "speech_crops", "bench_load",
           "bench_data_scale", "bench_score", "bench_gather", "subnormals", "bench_subnormals", "results_folder",
           "run_all", "plot_comparison", "summary_table", "speed_figure", "memory_figure", "main"]
