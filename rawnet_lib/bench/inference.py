"""Embedding speed on the CPU: the exact path, the fast path and the ONNX export under
onnxruntime, each with its agreement with the exact path and its share of the CPU's peak."""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rawnet_lib.bench.common import PATHS, alternate, model_gflop, record, sig
from rawnet_lib.bench.compute import native_peak
from rawnet_lib.config import Config, load_config
from rawnet_lib.eval.embed import autocast
from rawnet_lib.models.rawnet2 import build_model

__all__ = ["speech_crops", "calibrate_batch_norm", "bench_embed"]


def speech_crops(cfg: Config, n: int, data_path: str | Path | None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(n crops, "speech") of real speech from the training folder when there is one, else
    (n crops of Gaussian noise, "noise"); records carry which, as `input`."""
    from rawnet_lib.dataset.utterances import CropDataset, load_utterances, resolve_data_path
    try:
        root = resolve_data_path(dataclasses.replace(cfg.data, data_path=str(data_path)) if data_path else cfg.data)
        utts = load_utterances(root, cfg.data.train_dir, sample_rate=cfg.model.sample_rate, progress=False)
        data = CropDataset(utts, cfg.model.n_samples, seed, cfg.model.sample_rate)
        return torch.stack([data[i * len(data) // n][0] for i in range(n)]), "speech"
    except (FileNotFoundError, ValueError, OSError):
        return torch.randn(n, cfg.model.n_samples, generator=torch.Generator().manual_seed(seed)), "noise"


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
    from rawnet_lib.export import export_model, onnx_embedder
    from rawnet_lib.models.checkpoint import load_checkpoint_model, model_checkpoint, save_checkpoint
    if checkpoint:
        model, cfg = load_checkpoint_model(checkpoint, base=preset)
        x, source = speech_crops(cfg, batch, data_path)
    else:
        cfg = load_config(preset)
        x, source = speech_crops(cfg, batch, data_path)
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
    times = alternate({**{path: torch_path(path) for path in PATHS}, "onnxruntime": onnxruntime}, repeats)
    gflop = model_gflop(cfg.model)["total"]
    out = []
    for path, secs in times.items():
        rate = batch / statistics.median(secs)
        cosine = F.cosine_similarity(emb[path].double(), emb["exact"].double())
        out.append(record("embed", path=path, amp=PATHS.get(path, {}).get("amp", "off"), preset=preset,
                           batch=batch, crops_per_s=sig(rate), gflops=sig(rate * gflop),
                           gflop_per_crop=sig(gflop), peak_gflops=peak, peak_share=sig(rate * gflop / peak),
                           ratio=sig(statistics.median(e / s for e, s in zip(times["exact"], secs))),
                           cosine_mean=round(cosine.mean().item(), 6), cosine_min=round(cosine.min().item(), 6),
                           trained=bool(checkpoint), input=source, rounds=[round(s, 4) for s in secs]))
    return out
