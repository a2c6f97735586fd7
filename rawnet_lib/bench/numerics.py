"""Subnormal floats in a trained model's training step: its weights, every layer's activations,
its gradients and the optimiser's state.

Arithmetic on subnormals (|x| < 1.18e-38 in float32) takes a slow path on many x86 CPUs (on
Intel cores often far slower than on AMD's), so a run that loses speed as it trains is worth this check.
The counts belong to the values, not to the CPU: a run trained on one machine answers for the
same run on another.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rawnet_lib.bench.common import record
from rawnet_lib.bench.inference import speech_crops
from rawnet_lib.eval.embed import autocast
from rawnet_lib.models.checkpoint import CheckpointError, checkpoint_model, read_checkpoint
from rawnet_lib.models.losses import build_loss

__all__ = ["subnormals", "bench_subnormals"]


def subnormals(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(subnormal values, all values) of the floating-point tensors, each against its own dtype's
    smallest normal number (float32 and bf16: 1.18e-38; fp16: 6.1e-5)."""
    found = total = 0
    for t in tensors:
        if t.is_floating_point():
            t = t.detach()
            found += int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())
            total += t.numel()
    return found, total


def bench_subnormals(checkpoint: str | Path, batch: int = 32, data_path: str | Path | None = None,
                     seed: int = 0, base: str = "paper") -> list[dict[str, Any]]:
    """One record per part (weights, activations, gradients, optimizer) of one training step of
    the checkpoint's model as its run took them: its loss head and AMP setting, `batch` crops of
    real speech (noise where there is none; `input` says which) and labels drawn at random (the
    gradients' scale is that of a step, not of one speaker's). `base` fills what a bare
    state_dict does not say, as in `load_checkpoint_model`."""
    stored = read_checkpoint(checkpoint)
    model, cfg = checkpoint_model(stored, checkpoint, base=base)
    if getattr(model, "fc2_gru", None) is None:
        raise CheckpointError(f"{checkpoint} has no classifier (fc2_gru), so there is no training step to look "
                              "at; give a training checkpoint (a run's models/last.pt or best_opt_eval.pt)")
    x, source = speech_crops(cfg, batch, data_path, seed)
    y = torch.randint(0, model.fc2_gru.out_features, (batch,), generator=torch.Generator().manual_seed(seed))
    activations: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        activations.extend(o for o in (output if isinstance(output, tuple) else (output,)) if torch.is_tensor(o))
    hooks = [m.register_forward_hook(keep) for m in model.modules() if not list(m.children())]
    model.train()
    with autocast(torch.device("cpu"), cfg.train.amp):
        logits = model(x)
        loss = build_loss(cfg.loss)(logits.float(), y, int(stored.get("epoch", 1)) if isinstance(stored, dict) else 1)
    loss.backward()
    for hook in hooks:
        hook.remove()
    optimizer = stored.get("optimizer", {}).get("state", {}) if isinstance(stored, dict) else {}
    parts = {"weights": list(model.parameters()), "activations": activations,
             "gradients": [p.grad for p in model.parameters() if p.grad is not None],
             "optimizer": [v for s in optimizer.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]}
    out = []
    for part, tensors in parts.items():
        found, total = subnormals(tensors)
        out.append(record("subnormals", path=part, checkpoint=str(checkpoint), batch=batch, amp=cfg.train.amp,
                          loss_head=cfg.loss.head, input=source, subnormal=found, values=total,
                          share=found / total if total else None))
    return out
