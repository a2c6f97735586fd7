"""The training loader of one rank: its batches of random crops, workers that live for the whole
run, and how long each batch took to make.

Workers are started once (`persistent_workers`): re-forking them every epoch costs seconds per
epoch and a cold pipeline at its start. A persistent worker holds its own copy of the dataset,
so the epoch cannot reach it through `CropDataset.set_epoch`; the sampler sends it with every
index instead. Each batch carries the seconds its worker spent reading and cropping (summed over
its crops), which gives the loader's own crops/s next to the time the loop waited for it.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from rawnet_lib.dataset.utterances import CropDataset

__all__ = ["EpochSampler", "training_loader", "batch_keys"]


class EpochSampler(Sampler):
    """A sampler's indices as (epoch, index) pairs; `set_epoch` reaches the sampler and, through
    the pairs, every worker's dataset."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _TimedCrops(Dataset):
    """CropDataset indexed by (epoch, index); each item also gives the seconds it took."""

    def __init__(self, crops: CropDataset):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, float]:
        epoch, index = item
        t0 = time.perf_counter()
        self.crops.set_epoch(epoch)
        x, label = self.crops[index]
        return x, label, time.perf_counter() - t0


def _collate(items: list[tuple[torch.Tensor, int, float]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    x, y = default_collate([(x, label) for x, label, _ in items])
    return x, y, sum(seconds for *_, seconds in items)


def training_loader(crops: CropDataset, sampler: Sampler, batch_size: int, workers: int,
                    device: torch.device) -> DataLoader:
    """Batches (crops, labels, seconds to make them) in the order of `EpochSampler(sampler)`."""
    return DataLoader(_TimedCrops(crops), batch_size, sampler=EpochSampler(sampler), num_workers=workers,
                      drop_last=True, collate_fn=_collate, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def batch_keys(loader: DataLoader, first: int, last: int) -> list[str]:
    """The utterances of steps first..last (1-based) of the current epoch on this rank, for error
    messages (the order is seeded, so it can be drawn again)."""
    sampler, dataset = getattr(loader, "sampler", None), getattr(loader, "dataset", None)
    if not isinstance(sampler, EpochSampler) or not isinstance(dataset, _TimedCrops):
        return []
    order, size = list(sampler.sampler), loader.batch_size
    return [dataset.crops.utts.keys[i] for i in order[(first - 1) * size: last * size]]
