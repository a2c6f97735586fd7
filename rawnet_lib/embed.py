"""Speaker embeddings for whole utterances, batched across files, shared across ranks.

Reference mode: each file is cut into the reference's test crops, the crops of many files go
through the model together, and a file's embedding is the mean of its crops' `fc1_gru`
outputs. Full mode feeds each whole utterance (only for models without the fixed-length
layer norm). Each rank embeds a slice of the files; every rank gets all embeddings back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rawnet_lib import dist
from rawnet_lib.audio import eval_crops, peak_normalise, read_audio
from rawnet_lib.config import EvalConfig, ModelConfig
from rawnet_lib.trials import resolve

__all__ = ["embed_files", "autocast"]


class _FileCrops(Dataset):
    def __init__(self, keys: list[str], roots: list[Path], mcfg: ModelConfig, ecfg: EvalConfig):
        self.keys, self.roots, self.mcfg, self.ecfg = keys, roots, mcfg, ecfg

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> np.ndarray:
        x = peak_normalise(read_audio(resolve(self.keys[i], self.roots), sample_rate=self.mcfg.sample_rate))
        if self.ecfg.crop_mode == "full":
            return x[None].astype(np.float32)
        return eval_crops(x, self.mcfg.n_samples, self.ecfg.eval_hop).astype(np.float32)


def autocast(device: torch.device, amp: str):
    """torch.amp autocast for `amp` (off | bf16 | fp16) on this device type."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _batches(loader: DataLoader, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Pack the crops of consecutive files into batches of about batch_size crops."""
    owners: list[int] = []
    crops: list[np.ndarray] = []
    for i, file_crops in enumerate(loader):
        owners += [i] * len(file_crops)
        crops.append(file_crops)
        if len(owners) >= batch_size:
            yield owners, torch.from_numpy(np.concatenate(crops))
            owners, crops = [], []
    if owners:
        yield owners, torch.from_numpy(np.concatenate(crops))


@torch.no_grad()
def embed_files(model: torch.nn.Module, keys: list[str], roots: list[Path], mcfg: ModelConfig,
                ecfg: EvalConfig, device: torch.device, amp: str = "off", workers: int = 2,
                progress: bool = True) -> dict[str, np.ndarray]:
    """{key: mean crop embedding} for every key, computed once across all ranks."""
    if ecfg.crop_mode == "full" and mcfg.layer_norm:
        raise ValueError("crop_mode: full needs a model without the fixed-length layer norm "
                         "(layer_norm: false); use crop_mode: reference for the paper model")
    rank, world = _rank_world()
    mine = keys[rank::world]
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    loader = DataLoader(_FileCrops(mine, roots, mcfg, ecfg), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    batch = 1 if ecfg.crop_mode == "full" else ecfg.eval_batch_size
    sums = np.zeros((len(mine), mcfg.embedding_dim), dtype=np.float64)
    counts = np.zeros(len(mine))
    bar = tqdm(total=len(mine), desc="embed", disable=not progress or rank != 0, leave=False)
    for owners, x in _batches(loader, batch):
        with autocast(device, amp):
            out = net.embed(x.to(device)).float().cpu().numpy()
        np.add.at(sums, owners, out)
        np.add.at(counts, owners, 1)
        bar.update(len(set(owners)))  # batches hold whole files only
    bar.close()
    net.train(was_training)
    local = dict(zip(mine, (sums / counts[:, None]).astype(np.float32)))
    merged: dict[str, np.ndarray] = {}
    for part in dist.gather_objects(local):
        merged.update(part)
    return merged


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
