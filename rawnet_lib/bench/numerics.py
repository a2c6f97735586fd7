"""Subnormal floats in a trained model's training step: its weights, every layer's activations,
its gradients and the optimiser's state.

Arithmetic on subnormals (|x| < 1.18e-38 in float32) takes a slow path on many x86 CPUs, far
slower on Intel's than on AMD's, so a run that loses speed as it trains is worth this check.
The counts belong to the values, not to the CPU: a run trained on one machine answers for the
same run on another.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rawnet_lib.bench.common import record
from rawnet_lib.bench.inference import speech_crops
from rawnet_lib.errors import MissingPathError
from rawnet_lib.models.checkpoint import load_checkpoint_model, read_checkpoint

__all__ = ["subnormals", "bench_subnormals"]

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def subnormals(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(subnormal values, all values) of the floating-point tensors, read as float32."""
    found = total = 0
    for t in tensors:
        if t.is_floating_point():
            t = t.detach().float()
            found += int(((t != 0) & (t.abs() < TINY)).sum())
            total += t.numel()
    return found, total


def bench_subnormals(checkpoint: str | Path, batch: int = 32, data_path: str | Path | None = None,
                     seed: int = 0) -> list[dict[str, Any]]:
    """One record per part (weights, activations, gradients, optimizer) of a training step of the
    checkpoint's model on `batch` crops of real speech (labels drawn at random: the gradients'
    scale is that of a step, not of one speaker's)."""
    model, cfg = load_checkpoint_model(checkpoint)
    x = speech_crops(cfg, batch, data_path, seed)
    if getattr(model, "fc2_gru", None) is None:
        raise MissingPathError(f"{checkpoint} has no classifier (fc2_gru), so no training step to look at; "
                               "give a training checkpoint (a run's models/last.pt or best_opt_eval.pt)")
    classes = model.fc2_gru.out_features
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    activations: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        activations.extend(o for o in (output if isinstance(output, tuple) else (output,)) if torch.is_tensor(o))
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(keep) for m in leaves]
    model.train()
    F.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    state = read_checkpoint(checkpoint)
    optimizer = state.get("optimizer", {}).get("state", {}) if isinstance(state, dict) else {}
    parts = {"weights": list(model.parameters()), "activations": activations,
             "gradients": [p.grad for p in model.parameters() if p.grad is not None],
             "optimizer": [v for s in optimizer.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]}
    out = []
    for part, tensors in parts.items():
        found, total = subnormals(tensors)
        out.append(record("subnormals", path=part, checkpoint=str(checkpoint), batch=batch, subnormal=found,
                          values=total, share=found / total if total else None))
    return out
