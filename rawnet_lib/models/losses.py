"""Classification heads and their losses: softmax (the reference), AM- and AAM-softmax.

The class weights stay in the model's `fc2_gru` under every head, so a checkpoint keeps the
reference's key names and a reference checkpoint loads strictly. What differs is what the
model returns as logits (`head_logits`) and what the loss does with them (`MarginLoss`):

    softmax  logits = fc2_gru(10 * e / |e|)                     loss = CE(logits)
    am       logits = s * cos(e, w_c)                           loss = CE(logits - s * m at the target)
    aam      logits = s * cos(theta_c)                          loss = CE(s * cos(theta_y + m) at the target)

The margin loss works from the logits alone (cos = logits / s), so accuracy is always the
argmax of the margin-free logits, and the training loop stays the same for every head.
`add_ce` adds the cross-entropy of the margin-free scaled cosines (our reading of
RawNet2-modified's "AM-softmax together with cross-entropy": the facts file gives the flag,
not the formula). `margin_schedule: [first, last]` raises the margin linearly from 0 at epoch
`first` to `margin` at epoch `last` (WeSpeaker: 0 -> 0.2 over epochs 20-40).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rawnet_lib.config import LossConfig

__all__ = ["head_logits", "margin_at", "MarginLoss", "build_loss"]

EMBEDDING_NORM = 10.0  # the reference scales the embedding to L2 norm 10 before fc2_gru


def head_logits(code: Tensor, fc: nn.Linear, loss: LossConfig) -> Tensor:
    """(B, n_classes) logits of embeddings `code` (B, D) under the head; softmax is the reference's maths."""
    if loss.head == "softmax":
        return fc(code / (code.norm(p=2, dim=1, keepdim=True) / EMBEDDING_NORM))
    # fc2_gru's bias is frozen (requires_grad False) under a margin head: cosines have no bias. In
    # float32 under AMP too: bf16 rounds a cosine near 1 to exactly 1, where the margin's sine has no gradient
    with torch.autocast(code.device.type, enabled=False):
        return loss.scale * F.linear(F.normalize(code.float(), dim=1), F.normalize(fc.weight.float(), dim=1))


def margin_at(loss: LossConfig, epoch: int) -> float:
    """The margin in force at an epoch (1-based): constant, or the linear warm-up of margin_schedule."""
    if not loss.margin_schedule:
        return loss.margin
    first, last = loss.margin_schedule
    if epoch >= last:
        return loss.margin
    return loss.margin * (epoch - first) / (last - first) if epoch > first else 0.0


class MarginLoss(nn.Module):
    """`loss(logits, labels, epoch)`: cross-entropy with the head's margin at that epoch."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, logits: Tensor, labels: Tensor, epoch: int = 1) -> Tensor:
        cfg = self.cfg
        if cfg.head == "softmax":
            return F.cross_entropy(logits, labels)
        m = margin_at(cfg, epoch)
        target = F.one_hot(labels, logits.shape[1]).bool()
        if cfg.head == "am":
            adjusted = logits - cfg.scale * m * target
        else:
            cos = (logits / cfg.scale).clamp(-1.0, 1.0)
            sin = (1.0 - cos * cos).clamp_min(1e-12).sqrt()  # sqrt has no gradient at 0 (cos exactly +-1)
            shifted = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
            if cfg.easy_margin:
                shifted = torch.where(cos > 0, shifted, cos)
            else:  # beyond theta = pi - m, cos(theta + m) would rise again: the usual linear stand-in
                shifted = torch.where(cos > math.cos(math.pi - m), shifted, cos - math.sin(math.pi - m) * m)
            adjusted = cfg.scale * torch.where(target, shifted, cos)
        loss = F.cross_entropy(adjusted, labels)
        return loss + F.cross_entropy(logits, labels) if cfg.add_ce else loss


def build_loss(cfg: LossConfig) -> MarginLoss:
    return MarginLoss(cfg)
