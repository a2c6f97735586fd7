"""Optimisers and learning-rate schedules, by name from the optim block.

The scheduler is stepped once per iteration (as the reference's keras decay), so every
schedule is a factor of the iteration: the per-epoch ones (exponential, step) hold it constant
within an epoch, the cosine ones (cosine, sgdr) move every iteration as their recipes do.

    keras        lr / (1 + keras_decay * step)                      reference RawNet2
    none         lr
    cosine       lr -> min_lr over the run after warm-up             RawNet2-modified (1e-3 -> 5e-6)
    exponential  lr * lr_gamma ** epoch                              torch's ExponentialLR, per epoch
    step         lr * lr_gamma ** (epoch // step_epochs)             voxceleb_trainer's steplr with step_epochs 10
                                                                     (lr_decay 0.75 every test_interval = 10 epochs
                                                                     in its configs/RawNet3_AAM.yaml)
    sgdr         cosine cycles restarting at lr, restart_epochs long, each restart_mult x longer (ESPnet)

`warmup_epochs` multiplies any of them by a linear ramp from 0 to 1 (per iteration).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from rawnet_lib.config import Config, OptimConfig

__all__ = ["lr_factor", "make_optimizer", "IterationLR"]


def lr_factor(optim: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of `optim.lr` at each iteration (0-based), for LambdaLR."""
    spe = max(1, steps_per_epoch)
    warmup = optim.warmup_epochs * spe
    floor = min(1.0, optim.min_lr / optim.lr) if optim.lr > 0 else 0.0

    def cosine(t: float) -> float:  # t in [0, 1]: 1 -> floor
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, t))))

    def sgdr(step: int) -> float:
        length, start = optim.restart_epochs * spe, 0
        while step >= start + length:
            start, length = start + length, length * optim.restart_mult
        return cosine((step - start) / length)

    base: dict[str, Callable[[int], float]] = {
        "keras": lambda step: 1.0 / (1.0 + optim.keras_decay * step),
        "none": lambda step: 1.0,
        "cosine": lambda step: cosine((step - warmup) / max(1.0, epochs * spe - warmup)),
        "exponential": lambda step: optim.lr_gamma ** (step // spe),
        "step": lambda step: optim.lr_gamma ** (step // spe // optim.step_epochs),
        "sgdr": sgdr,
    }
    schedule = base[optim.lr_decay]

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return ramp * schedule(max(0, int(step - warmup)) if optim.lr_decay == "sgdr" else step)
    return factor


class IterationLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR stepped every iteration, the ones whose update fp16's GradScaler skipped (an overflow,
    as at its first step) included, so a run's schedule is the same at any precision. torch takes a
    first step before any optimizer.step() for the pre-1.1 calling order and warns; here it is by design."""

    def step(self, epoch: int | None = None) -> None:
        if self._step_count > 1:
            super().step(epoch)
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            super().step(epoch)


def make_optimizer(model: torch.nn.Module, cfg: Config, steps_per_epoch: int = 1
                   ) -> tuple[torch.optim.Optimizer, IterationLR]:
    """The optimiser without weight decay on batch-norm parameters (as the reference), and its
    per-iteration schedule. Frozen parameters (a margin head's unused bias) are left out."""
    o = cfg.optim
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
          for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in bn], "weight_decay": o.weight_decay},
              {"params": [p for p in trainable if id(p) in bn], "weight_decay": 0.0}]
    if o.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=o.lr, amsgrad=o.amsgrad)
    elif o.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=o.lr, amsgrad=o.amsgrad)
    else:
        optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    scheduler = IterationLR(optimizer, lr_factor(o, cfg.train.epochs, steps_per_epoch))
    return optimizer, scheduler
