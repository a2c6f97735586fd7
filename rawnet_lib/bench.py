"""Benchmarks of the fast path against the exact reference path (issue #6), rerunnable by anyone.

    python -m rawnet_lib.bench all                    # everything, paper preset, batch 8 (~10 min)
    python -m rawnet_lib.bench train --repeats 7      # one measurement kind
    python -m rawnet_lib.bench all --quick            # smoke preset, tiny repeats (< 1 min)
    python -m rawnet_lib.bench train --config demo    # the demo preset's model
    python -m rawnet_lib.bench scale-data             # a VoxCeleb2-shaped tree of 209,790 links (not in `all`)
    python -m rawnet_lib.bench embed                  # embedding on the CPU: exact, fast, onnxruntime
    python -m rawnet_lib.bench load --augment         # the training loader, plain and augmented

Each measurement prints ONE JSON line (name, path, crops_per_s or seconds, gflops, peak_rss_mib,
ratio, device, torch, threads, ...); the functions return the same dicts for
notebooks/benchmark.ipynb. Paths:

* exact: `model.fast: false`, `train.amp: off`, the reference maths in float32;
* fast: `model.fast: true` (rawnet_lib/fastsinc.py) with `train.amp: bf16` where the CPU has bf16
  instructions (AVX512-BF16 or AMX), else float32 (`embed.cpu_amp`: emulated bf16 is slower).

The CPU may be shared with other work, so both paths run alternately in one process, one
step each per round, and a ratio is the median of the per-round ratios. GFLOP per crop is
counted from the model's shapes (convolutions, linear layers, GRU; training = 3x forward) and
is the same number for both paths: "gflops" is useful work per second, not instructions.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from rawnet_lib import fastsinc
from rawnet_lib.config import Config, ModelConfig, cli_config, cli_parser, load_config
from rawnet_lib.embed import autocast, cpu_amp, native_amp
from rawnet_lib.errors import MissingPathError, run_cli
from rawnet_lib.model import build_model

__all__ = ["PATHS", "model_gflop", "environment", "matmul_peak", "native_peak", "bench_train", "bench_memory", "bench_embed",
           "calibrate_batch_norm", "bench_load", "bench_score", "bench_gather", "bench_scale",
           "bench_data_scale", "run_all", "plot_comparison", "main"]

PATHS = {"exact": {"fast": False, "amp": "off"}, "fast": {"fast": True, "amp": cpu_amp()}}
QUICK = {"preset": "smoke", "batch": 4, "repeats": 2}
SCALE_QUICK = {"speakers": 20, "videos": 2, "utterances": 3, "batches": 4}
PAPER_CLASSES = 5994  # VoxCeleb2 dev speakers: the output layer of the paper model
VOX2_FILES = 1_092_009  # VoxCeleb2 dev utterances


# --- counting and context -----------------------------------------------------------------------

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


def _rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _record(name: str, **fields: Any) -> dict[str, Any]:
    rec = {"name": name, **fields, "peak_rss_mib": fields.get("peak_rss_mib", round(_rss_mib(), 1)),
           **environment()}
    print(json.dumps(rec), flush=True)
    return rec


def _config(preset: str, path: str) -> Config:
    cfg = load_config(preset)
    cfg.model.fast, cfg.train.amp = PATHS[path]["fast"], PATHS[path]["amp"]
    return cfg


def _alternate(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
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


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: fixed decimals would print a small model's rate as 0."""
    return float(f"{x:.{digits}g}")


def _speed_records(name: str, times: dict[str, list[float]], crops: int, gflop_per_crop: float,
                   **extra: Any) -> list[dict[str, Any]]:
    """One record per path: median crops/s, GFLOP/s and the median per-round ratio to exact."""
    out = []
    for path, secs in times.items():
        ratios = [e / s for e, s in zip(times["exact"], secs)]
        rate = crops / statistics.median(secs)
        out.append(_record(name, path=path, amp=PATHS[path]["amp"], crops_per_s=_sig(rate),
                           seconds=round(statistics.median(secs), 4), gflops=_sig(rate * gflop_per_crop),
                           gflop_per_crop=_sig(gflop_per_crop), ratio=_sig(statistics.median(ratios)),
                           ratio_min=_sig(min(ratios)), ratio_max=_sig(max(ratios)),
                           rounds=[round(s, 4) for s in secs], **extra))
    return out


# --- the measurements ---------------------------------------------------------------------------

def matmul_peak(size: int = 2048, repeats: int = 5) -> list[dict[str, Any]]:
    """GFLOP/s of a size^3 matrix product in float32 and bf16: this machine's practical peak.
    Where the CPU has no bf16 instructions (`native` false) the bf16 product is emulated, some
    100x slower, and is timed at size 512 only."""
    out = []
    for amp in ("off", "bf16"):
        n = size if native_amp(amp) else min(size, 512)
        secs = _matmul_seconds(amp, n, repeats)
        out.append(_record("matmul_peak", dtype="float32" if amp == "off" else "bfloat16", size=n,
                           native=native_amp(amp), seconds=round(statistics.median(secs), 5),
                           gflops=round(2 * n ** 3 / statistics.median(secs) / 1e9, 1),
                           gflops_best=round(2 * n ** 3 / min(secs) / 1e9, 1)))
    return out


def _matmul_seconds(amp: str, size: int, repeats: int) -> list[float]:
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return _alternate({"mm": lambda: a @ b}, repeats)["mm"]


def native_peak(size: int = 2048, repeats: int = 3) -> float:
    """Best GFLOP/s of the matrix products this CPU runs natively (float32, and bf16 where it
    has bf16 instructions): what a path's GFLOP/s is a share of."""
    return max(2 * size ** 3 / min(_matmul_seconds(amp, size, repeats)) / 1e9
               for amp in ("off", "bf16") if native_amp(amp))


def _train_setup(preset: str, path: str, batch: int, n_classes: int, seed: int = 0):
    """(model, optimizer, one training step) of a path; same weights and batch for every path."""
    from rawnet_lib.train import make_optimizer
    cfg = _config(preset, path)
    torch.manual_seed(seed)
    model = build_model(cfg, n_classes).train()
    optimizer, _ = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.model.n_samples, generator=gen)
    y = torch.randint(0, n_classes, (batch,), generator=gen)

    def step() -> None:
        with autocast(torch.device("cpu"), cfg.train.amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, optimizer, step


def bench_train(preset: str = "paper", batch: int = 8, repeats: int = 5,
                n_classes: int = PAPER_CLASSES) -> list[dict[str, Any]]:
    """Training steps (forward, backward, Adam) per second, exact and fast alternately."""
    steps = {path: _train_setup(preset, path, batch, n_classes)[2] for path in PATHS}
    times = _alternate(steps, repeats, warmup=2)  # warm-up compiles the fast kernels
    gflop = model_gflop(load_config(preset).model, n_classes)["train"]
    return _speed_records("train_step", times, batch, gflop, preset=preset, batch=batch,
                          n_classes=n_classes, repeats=repeats)


def _memory_child(preset: str, path: str, batch: int, n_classes: int, steps: int) -> dict[str, float]:
    """In a fresh process: RSS before the first step, peak RSS over `steps` steps after a warm-up."""
    _, _, step = _train_setup(preset, path, batch, n_classes)
    before = _status_kib("VmRSS") / 1024
    step()  # warm-up: compiles the fast kernels, allocates optimiser state
    reset = _reset_peak()
    for _ in range(steps):
        step()
    steady = _status_kib("VmHWM") / 1024 if reset else float("nan")
    return {"rss_before_mib": before, "peak_rss_mib": steady, "process_peak_rss_mib": _rss_mib()}


def _child_init(threads: int, compile_kernels: bool) -> None:
    """The parent's thread count and kernel setting in a spawned process."""
    torch.set_num_threads(threads)
    fastsinc.set_compile(compile_kernels)


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _reset_peak() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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
        out.append(_record("train_memory", path=path, amp=PATHS[path]["amp"], preset=preset, batch=batch,
                           n_classes=n_classes, peak_rss_mib=round(res["peak_rss_mib"], 1),
                           step_rss_mib=round(res["peak_rss_mib"] - res["rss_before_mib"], 1),
                           process_peak_rss_mib=round(res["process_peak_rss_mib"], 1),
                           ratio=round(res["peak_rss_mib"] / peaks["exact"], 3)))
    return out


def _crops(cfg: Config, n: int, data_path: str | Path | None, seed: int = 0) -> torch.Tensor:
    """n crops of real speech from the training folder when there is one, else noise."""
    from rawnet_lib.data import CropDataset, load_utterances, resolve_data_path
    try:
        root = Path(data_path) if data_path else resolve_data_path(cfg.data)
        utts = load_utterances(root, cfg.data.train_dir, progress=False)
        data = CropDataset(utts, cfg.model.n_samples, seed, cfg.model.sample_rate)
        return torch.stack([data[i * len(data) // n][0] for i in range(n)])
    except (FileNotFoundError, ValueError, OSError):
        return torch.randn(n, cfg.model.n_samples, generator=torch.Generator().manual_seed(seed))


def calibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Batch-norm running statistics = those of one training-mode pass over x (for untrained
    weights: fresh statistics of 0 and 1 leave the network badly scaled in eval mode)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        model.train().embed(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def bench_embed(preset: str = "paper", batch: int = 32, repeats: int = 5, data_path: str | Path | None = None,
                checkpoint: str | Path | None = None) -> list[dict[str, Any]]:
    """Embedding crops per second (eval mode, no gradients) of the exact path, the fast path and
    the ONNX export run by onnxruntime, each with its cosine to the exact path and its share of
    this CPU's matrix-product peak (the faster of float32 and native bf16, measured here).

    `checkpoint` (ours or a reference state_dict) gives trained weights; else a seeded init
    with batch-norm statistics from the benchmark crops (`calibrate_batch_norm`).
    """
    from rawnet_lib.checkpoint import load_checkpoint_model, model_checkpoint, save_checkpoint
    from rawnet_lib.export import export_model, onnx_embedder
    if checkpoint:
        model, cfg = load_checkpoint_model(checkpoint, base=preset)
        x = _crops(cfg, batch, data_path)
    else:
        cfg = load_config(preset)
        x = _crops(cfg, batch, data_path)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        calibrate_batch_norm(model, x)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model_checkpoint(model, cfg, [], 0, 0.0), Path(tmp) / "m.pt")
        ort_run, _ = onnx_embedder(export_model(Path(tmp) / "m.pt", "onnx", Path(tmp) / "m.onnx"))
    emb: dict[str, torch.Tensor] = {}

    def torch_path(path: str) -> Callable[[], None]:
        def run() -> None:
            model.cfg.fast = PATHS[path]["fast"]
            with torch.no_grad(), autocast(torch.device("cpu"), PATHS[path]["amp"]):
                emb[path] = model.embed(x).float()
        return run

    def onnxruntime() -> None:
        emb["onnxruntime"] = torch.from_numpy(ort_run(x.numpy()))
    peak = round(native_peak(), 1)
    times = _alternate({**{path: torch_path(path) for path in PATHS}, "onnxruntime": onnxruntime}, repeats)
    gflop = model_gflop(cfg.model)["total"]
    out = []
    for path, secs in times.items():
        rate = batch / statistics.median(secs)
        cosine = F.cosine_similarity(emb[path].double(), emb["exact"].double())
        out.append(_record("embed", path=path, amp=PATHS.get(path, {}).get("amp", "off"), preset=preset,
                           batch=batch, crops_per_s=_sig(rate), gflops=_sig(rate * gflop),
                           gflop_per_crop=_sig(gflop), peak_gflops=peak, peak_share=_sig(rate * gflop / peak),
                           ratio=_sig(statistics.median(e / s for e, s in zip(times["exact"], secs))),
                           cosine_mean=round(cosine.mean().item(), 6), cosine_min=round(cosine.min().item(), 6),
                           trained=bool(checkpoint), rounds=[round(s, 4) for s in secs]))
    return out


def bench_load(preset: str = "paper", batch: int = 8, batches: int = 100, workers: int = 2,
               data_path: str | Path | None = None, augment: bool = False) -> list[dict[str, Any]]:
    """Training-loader crops per second from disk (random crops, partial reads, `workers` processes).
    With `augment`, also the loader of the preset with `augment.enabled` (reverb + noise, the
    built-in sets unless the preset names folders), so a user sees whether augmentation would
    make the loader the bottleneck of the step."""
    from rawnet_lib.augment import Augmenter, builtin_babble_dir
    from rawnet_lib.data import CropDataset, load_utterances, resolve_data_path
    cfg = load_config(preset)
    root = Path(data_path) if data_path else resolve_data_path(cfg.data)
    utts = load_utterances(root, cfg.data.train_dir, progress=False)
    kinds = {"plain": None}
    if augment:
        cfg.augment.enabled = True
        kinds["augment"] = Augmenter.from_config(cfg.augment, builtin_babble_dir(root, cfg.data.val_from),
                                                 cfg.model.sample_rate)
    out = []
    for kind, augmenter in kinds.items():
        dataset = CropDataset(utts, cfg.model.n_samples, cfg.train.seed, cfg.model.sample_rate, augment=augmenter)
        crops, seconds, startup = _loader_rate(dataset, batch, batches, workers)
        out.append(_record("load", path=kind, preset=preset, batch=batch, workers=workers, crops=crops,
                           crops_per_s=round(crops / seconds, 1), seconds=round(seconds, 3),
                           startup_s=round(startup, 3), utterances=len(utts), data=str(root),
                           noise_prob=cfg.augment.noise_prob if augmenter else 0.0,
                           rir_prob=cfg.augment.rir_prob if augmenter else 0.0))
    return out


def _loader_rate(dataset, batch: int, batches: int, workers: int) -> tuple[int, float, float]:
    """(crops, seconds, start-up seconds) of `batches` batches; start-up and the first batch excluded."""
    from torch.utils.data import DataLoader
    dataset.set_epoch(1)
    loader = DataLoader(dataset, batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    crops, t_first, t0 = 0, None, time.perf_counter()
    while crops < batches * batch:
        for x, _ in loader:
            if t_first is None:
                t_first = time.perf_counter()
                continue
            crops += len(x)
            if crops >= batches * batch:
                break
    return crops, time.perf_counter() - t_first, t_first - t0


def bench_score(n_trials: int = 580_000, n_files: int = 145_000, dim: int = 1024, repeats: int = 3,
                seed: int = 0) -> list[dict[str, Any]]:
    """Seconds to score a Vox1-E-sized trial list: cosine scores from embeddings, then EER + minDCF."""
    from rawnet_lib.metrics import summarize
    from rawnet_lib.scoring import cosine_scores
    keys, emb, trials = _synthetic_vox1e(n_files, dim, n_trials, seed=seed)
    embeddings = dict(zip(keys, emb))
    result: dict[str, Any] = {}

    def cosine() -> None:
        result["scores"] = cosine_scores(embeddings, trials)

    def metrics() -> None:
        result["summary"] = summarize(result["scores"], trials.labels)
    cosine()
    times = _alternate({"cosine": cosine, "metrics": metrics}, repeats, warmup=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [_record("score", path="-", trials=n_trials, files=n_files, dim=dim,
                    cosine_s=round(med["cosine"], 3), metrics_s=round(med["metrics"], 3),
                    seconds=round(med["cosine"] + med["metrics"], 3),
                    eer_percent=round(result["summary"]["eer_percent"], 3))]


def _synthetic_vox1e(n_files: int, dim: int, n_trials: int, rows: slice = slice(None), seed: int = 0):
    """(keys, embeddings of `rows`, trial list) shaped like Vox1-E: 20 files per speaker, half
    the trials target; each part of the rows can be made on its own (one rank's share)."""
    from rawnet_lib.trials import TrialList
    rng = np.random.default_rng(seed)
    keys = [f"id{i // 20:05d}/v/{i:06d}.wav" for i in range(n_files)]
    speaker = np.arange(n_files) // 20
    centres = rng.standard_normal((speaker[-1] + 1, dim), dtype=np.float32)
    start, stop, _ = rows.indices(n_files)
    noise = np.random.default_rng([seed, start]).standard_normal((stop - start, dim), dtype=np.float32)
    emb = centres[speaker[start:stop]] + 2 * noise
    enroll = rng.integers(0, n_files, n_trials)
    same = np.minimum(enroll - enroll % 20 + rng.integers(0, 20, n_trials), n_files - 1)
    test = np.where(rng.random(n_trials) < 0.5, same, rng.integers(0, n_files, n_trials))
    labels = (speaker[enroll] == speaker[test]).astype(np.int8)
    return keys, emb, TrialList(labels, [keys[i] for i in enroll], [keys[i] for i in test])


def _gather_child(rank: int, world: int, store: str, method: str, n_files: int, dim: int, n_trials: int,
                  out: str) -> None:
    """One gloo rank: hold its share of the embeddings, gather them by `method`, rank 0 scores."""
    import torch.distributed as torch_dist
    from rawnet_lib import dist
    from rawnet_lib.metrics import eer
    from rawnet_lib.scoring import cosine_scores
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = dist.RankInfo(rank, world, torch.device("cpu"))
    part = dist.share(n_files, info)
    keys, mine, trials = _synthetic_vox1e(n_files, dim, n_trials if rank == 0 else 1, part)
    before = _status_kib("VmRSS") / 1024
    _reset_peak()
    t0 = time.perf_counter()
    if method == "all_gather_object":  # what validation and evaluation did before: everything everywhere
        parts: list[Any] = [None] * world
        torch_dist.all_gather_object(parts, dict(zip(keys[part], mine)))
        merged = {k: v for p in parts for k, v in p.items()}
    else:
        rows = dist.gather_rows(mine, n_files, info)
        merged = {} if rows is None else dict(zip(keys, rows))
    gathered_s = time.perf_counter() - t0
    result = eer(cosine_scores(merged, trials), trials.labels) if rank == 0 else None
    torch_dist.barrier()
    Path(out, f"{method}_{rank}.json").write_text(json.dumps({
        "rank": rank, "rss_before_mib": round(before, 1), "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "gather_s": round(gathered_s, 3), "seconds": round(time.perf_counter() - t0, 3), "eer": result}))
    torch_dist.destroy_process_group()


def bench_gather(n_files: int = 145_000, dim: int = 1024, n_trials: int = 580_000, ranks: int = 8,
                 methods: tuple[str, ...] = ("all_gather_object", "to_main")) -> list[dict[str, Any]]:
    """Peak RSS per rank when `ranks` gloo processes gather Vox1-E-sized embeddings and rank 0
    scores the trial list: every rank receiving everything (before) against rank 0 only (now).
    peak_rss_mib is each rank's high-water mark from its share in hand to the EER (the start-up
    and its own share are in rss_before_mib)."""
    import torch.multiprocessing as mp
    out = []
    with tempfile.TemporaryDirectory(prefix="rawnet_gather_") as tmp:
        for method in methods:
            mp.spawn(_gather_child, args=(ranks, f"{tmp}/{method}.store", method, n_files, dim, n_trials, tmp),
                     nprocs=ranks)
            rows = [json.loads(Path(tmp, f"{method}_{r}.json").read_text()) for r in range(ranks)]
            others = [r["peak_rss_mib"] for r in rows[1:]]
            out.append(_record("gather", path=method, ranks=ranks, files=n_files, dim=dim, trials=n_trials,
                               peak_rss_mib=rows[0]["peak_rss_mib"], rss_before_mib=rows[0]["rss_before_mib"],
                               peak_rss_other_ranks_mib=max(others, default=None),
                               rss_before_other_ranks_mib=max((r["rss_before_mib"] for r in rows[1:]), default=None),
                               gather_s=rows[0]["gather_s"], seconds=rows[0]["seconds"],
                               eer_percent=round(100 * rows[0]["eer"], 3)))
    return out


def bench_scale(preset: str = "paper", batch: int = 8, steps: int = 6, warmup: int = 2,
                devices: tuple[int, ...] = (1, 2), paths: tuple[str, ...] = ("exact", "fast"),
                data_path: str = "") -> list[dict[str, Any]]:
    """Trainer throughput (performance mode, demo corpus) with 1 and 2 processes per path."""
    from rawnet_lib.launch import launch
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
                out.append(_record("scale", path=path, amp=PATHS[path]["amp"], preset=preset, batch=batch,
                                   processes=n, crops_per_s=round(res["crops_per_s"], 3),
                                   speedup=round(res["crops_per_s"] / base[path], 3),
                                   peak_rss_mib=round(_rss_mib(), 1)))
    return out


def _link_tree(root: Path, sources: list[Path], speakers: int, videos: int, utterances: int) -> int:
    """root/<spk>/<video>/<utt>.wav as hard links to `sources`, in turn; returns the file count."""
    n = 0
    for s in range(speakers):
        for v in range(videos):
            folder = root / f"id{s:05d}" / f"vid{v:04d}"
            folder.mkdir(parents=True)
            for u in range(utterances):
                os.link(sources[n % len(sources)], folder / f"{u + 1:05d}.wav")
                n += 1
    return n


def bench_data_scale(preset: str = "paper", data_path: str | Path | None = None, speakers: int = PAPER_CLASSES,
                     videos: int = 5, utterances: int = 7, ranks: int = 8, workers: int = 2, batch: int = 32,
                     batches: int = 60, sources: int = 16) -> list[dict[str, Any]]:
    """The data side at VoxCeleb2 scale, simulated: a tree of speakers x videos x utterances hard
    links to a few real wavs of the training folder (a temporary folder inside the data path, on
    the same file system, removed afterwards), then its signature, the scan into a list file,
    the cached list load, the dataset and `ranks` DistributedSamplers, and the loader's crops/s.

    Only a few distinct files are read, all from the page cache: this measures the metadata
    and CPU side (what grows with the file count), not the throughput of the disk."""
    from torch.utils.data import DistributedSampler
    from rawnet_lib.data import CropDataset, load_utterances, resolve_data_path, tree_signature
    cfg = load_config(preset)
    root = Path(data_path) if data_path else resolve_data_path(cfg.data)
    wavs = sorted((root / cfg.data.train_dir).glob("*/*/*.wav"))[:sources]
    if not wavs:
        raise MissingPathError(f"no wav files under {root / cfg.data.train_dir} to link to; give --data_path")
    out = []

    def measure(step: str, fn: Callable[[], Any], files: int, **extra: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        seconds = max(time.perf_counter() - t0, 1e-6)
        out.append(_record("scale_data", path="-", step=step, files=files, seconds=round(seconds, 3),
                           files_per_s=round(files / seconds), vox2_seconds=round(VOX2_FILES * seconds / files, 1),
                           **extra))
        return result
    with tempfile.TemporaryDirectory(prefix=".rawnet_scale_", dir=root) as tmp:
        tree = Path(tmp) / cfg.data.train_dir
        n = speakers * videos * utterances
        measure("build", lambda: _link_tree(tree, wavs, speakers, videos, utterances), n, speakers=speakers,
                videos=speakers * videos, sources=len(wavs))
        measure("signature", lambda: tree_signature(tree), n)
        measure("scan", lambda: load_utterances(Path(tmp), cfg.data.train_dir, progress=False), n)
        utts = measure("list_load", lambda: load_utterances(Path(tmp), cfg.data.train_dir, progress=False), n,
                       list_mib=round(next(Path(tmp).glob("lists/*.tsv")).stat().st_size / 2 ** 20, 1))
        data = measure("dataset", lambda: CropDataset(utts, cfg.model.n_samples, cfg.train.seed), n)

        def samplers() -> None:
            for r in range(ranks):  # what each rank does at start-up and at every epoch
                sampler = DistributedSampler(data, ranks, r, shuffle=True, seed=cfg.train.seed, drop_last=True)
                sampler.set_epoch(1)
                list(sampler)
        measure("samplers", samplers, n, ranks=ranks)
        out += bench_load(preset, batch, batches, workers, data_path=tmp)
    return out


def run_all(preset: str = "paper", batch: int = 8, repeats: int = 5, quick: bool = False,
            data_path: str | Path | None = None, scale: bool = True) -> list[dict[str, Any]]:
    """Every measurement; quick: smoke preset, small batch, 2 rounds, small lists, no scaling runs."""
    if quick:
        preset, batch, repeats = QUICK["preset"], QUICK["batch"], QUICK["repeats"]
        compiled = fastsinc.set_compile(False)  # no compile time; same results, slower kernels
    try:
        return _run_all(preset, batch, repeats, quick, data_path, scale)
    finally:
        if quick:
            fastsinc.set_compile(compiled)


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
    from matplotlib.figure import Figure
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


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = cli_parser("python -m rawnet_lib.bench", __doc__, preset=None, fields=("data_path",),
                        config_help="model preset to time, a name or YAML (default paper; smoke with --quick)")
    parser.add_argument("what", choices=["train", "memory", "embed", "load", "score", "gather", "peak",
                                         "scale", "scale-data", "all"])
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 8; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per path (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small and fast: a check that everything runs")
    parser.add_argument("--checkpoint", default="", help="trained weights for the embedding comparison")
    parser.add_argument("--augment", action="store_true", help="load: also the loader with augmentation on")
    args = parser.parse_args(argv)
    custom = bool(args.config or args.batch or args.repeats)
    defaults = QUICK if args.quick else {"preset": "paper", "batch": 8, "repeats": 5}
    args.config = preset = args.config or defaults["preset"]
    batch, repeats = args.batch or defaults["batch"], args.repeats or defaults["repeats"]
    n_classes = 10 if args.quick else PAPER_CLASSES
    data = cli_config(args).data.data_path or None   # --data_path, else the preset's ('': the demo corpus)
    if args.what == "all":
        return run_all(preset, batch, repeats, args.quick and not custom, data)
    run = {"train": lambda: bench_train(preset, batch, repeats, n_classes),
           "memory": lambda: bench_memory(preset, batch, n_classes, 1 if args.quick else 2),
           "embed": lambda: bench_embed(preset, 4 * batch, repeats, data, args.checkpoint or None),
           "load": lambda: bench_load(preset, batch, 4 if args.quick else 100, data_path=data, augment=args.augment),
           "score": lambda: bench_score(*((20_000, 2_000) if args.quick else (580_000, 145_000)),
                                        load_config(preset).model.embedding_dim, 1 if args.quick else 3),
           "gather": lambda: bench_gather(*((18_125, 1024, 72_500) if args.quick else (145_000, 1024, 580_000))),
           "peak": lambda: matmul_peak(512 if args.quick else 2048, repeats),
           "scale": lambda: bench_scale(preset, batch, 2 if args.quick else 6, 1 if args.quick else 2,
                                        data_path=str(data or "")),
           "scale-data": lambda: bench_data_scale(preset, data, **(SCALE_QUICK if args.quick else {}))}
    return run[args.what]()


if __name__ == "__main__":
    run_cli(main)
