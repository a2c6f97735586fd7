"""The data side: the training loader's crops/s (plain and augmented) and a VoxCeleb2-shaped tree
of hard links for what grows with the number of files (signature, scan, list, samplers)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rawnet_lib.bench.common import PAPER_CLASSES, VOX2_FILES, record
from rawnet_lib.config import load_config
from rawnet_lib.errors import MissingPathError

__all__ = ["bench_load", "bench_data_scale"]


def bench_load(preset: str = "paper", batch: int = 8, batches: int = 100, workers: int = 2,
               data_path: str | Path | None = None, augment: bool = False) -> list[dict[str, Any]]:
    """Training-loader crops per second from disk (random crops, partial reads, `workers` processes).
    With `augment`, also the loader of the preset with `augment.enabled` (reverb + noise, the
    built-in sets unless the preset names folders), so a user sees whether augmentation would
    make the loader the bottleneck of the step."""
    from rawnet_lib.dataset.augment import Augmenter, builtin_babble
    from rawnet_lib.dataset.utterances import CropDataset, load_utterances, resolve_data_path
    cfg = load_config(preset, data_path=str(data_path or ""))
    root = resolve_data_path(cfg.data)
    utts = load_utterances(root, cfg.data.train_dir, sample_rate=cfg.model.sample_rate, progress=False)
    kinds = {"plain": None}
    if augment:
        cfg.augment.enabled = True
        kinds["augment"] = Augmenter.from_config(cfg.augment, builtin_babble(utts, cfg.train.seed),
                                                 cfg.model.sample_rate)
    out = []
    for kind, augmenter in kinds.items():
        dataset = CropDataset(utts, cfg.model.n_samples, cfg.train.seed, cfg.model.sample_rate, augment=augmenter)
        crops, seconds, startup = _loader_rate(dataset, batch, batches, workers)
        out.append(record("load", path=kind, preset=preset, batch=batch, workers=workers, crops=crops,
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

    from rawnet_lib.dataset.utterances import CropDataset, load_utterances, resolve_data_path, tree_signature
    cfg = load_config(preset, data_path=str(data_path or ""))
    root = resolve_data_path(cfg.data)
    wavs = sorted((root / cfg.data.train_dir).glob("*/*/*.wav"))[:sources]
    if not wavs:
        raise MissingPathError(f"no wav files under {root / cfg.data.train_dir} to link to; give --data_path")
    out = []

    def measure(step: str, fn: Callable[[], Any], files: int, **extra: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        seconds = max(time.perf_counter() - t0, 1e-6)
        out.append(record("scale_data", path="-", step=step, files=files, seconds=round(seconds, 3),
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
