"""Speaker embeddings for whole utterances, batched across files, shared across ranks.

Reference mode: each file is cut into the reference's test crops, the crops of many files go
through the model together, and a file's embedding is the mean of its crops' `fc1_gru`
outputs. Full mode feeds each whole utterance (only for models without the fixed-length
layer norm). Each rank embeds its share of the files and rank 0 alone receives them all (it
scores); the other ranks keep nothing.

`cached_embeddings` keeps them on disk per checkpoint and embedding settings, so evaluating
O, E and H shares one extraction and a second evaluation embeds nothing (but a file changed
since).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rawnet_lib import dist
from rawnet_lib.config import Config, ConfigError, EvalConfig, ModelConfig
from rawnet_lib.dataset.audio import eval_crops, peak_normalise, read_audio
from rawnet_lib.dataset.trials import resolve
from rawnet_lib.io import atomic_open, file_sha1

__all__ = ["embed_files", "cached_embeddings", "embedding_settings", "weights_fingerprint", "autocast",
           "utterance_crops", "crop_batches", "check_crops", "native_amp", "cpu_amp", "mean_crop_embeddings"]


class _FileCrops(Dataset):
    def __init__(self, keys: list[str], roots: list[Path], mcfg: ModelConfig, ecfg: EvalConfig):
        self.keys, self.roots, self.mcfg, self.ecfg = keys, roots, mcfg, ecfg

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> np.ndarray:
        return utterance_crops(read_audio(resolve(self.keys[i], self.roots), sample_rate=self.mcfg.sample_rate),
                               self.mcfg, self.ecfg)


def utterance_crops(x: np.ndarray, mcfg: ModelConfig, ecfg: EvalConfig) -> np.ndarray:
    """What the model sees of one utterance: (n_crops, n_samples) reference crops of the
    peak-normalised samples, or the whole utterance as one row in full mode."""
    x = peak_normalise(x)
    if ecfg.crop_mode == "full":
        return x[None].astype(np.float32)
    return eval_crops(x, mcfg.n_samples, ecfg.eval_hop).astype(np.float32)


def autocast(device: torch.device, amp: str):
    """torch.amp autocast for `amp` (off | bf16 | fp16) on this device type."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device.type == "cpu" and dtype is not None:
        _warn_if_emulated(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def native_amp(amp: str) -> bool:
    """Whether this CPU has matrix instructions for `amp` (bf16: AVX512-BF16 or AMX; fp16:
    AMX-FP16). Elsewhere oneDNN emulates them, slower than float32."""
    return {"bf16": torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
            "fp16": torch.cpu._is_amx_fp16_supported(), "off": True}[amp]


def cpu_amp() -> str:
    """The fastest autocast setting for CPU inference here: bf16 where the CPU has bf16
    instructions, else float32 (emulated bf16 products ran at 0.3 GFLOP/s against float32's
    97 on an AVX2-only AMD EPYC)."""
    return "bf16" if native_amp("bf16") else "off"


@functools.cache
def _warn_if_emulated(amp: str) -> None:
    """Say once, never silently, that half precision is emulated on this CPU."""
    if not native_amp(amp):
        warnings.warn(f"amp: {amp} on a CPU without {amp} matrix instructions "
                      f"({torch.backends.cpu.get_cpu_capability()}): the products are emulated and run slower than "
                      "float32 (and the fast path slower than the exact one); use amp: off here",
                      stacklevel=3)


def crop_batches(loader: Iterable[np.ndarray], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Pack the crops of consecutive files into batches of about batch_size crops; owners are
    the files' positions in `loader`."""
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
                ecfg: EvalConfig, rank: dist.RankInfo, amp: str = "off", workers: int = 2,
                progress: bool = True) -> dict[str, np.ndarray]:
    """{key: mean crop embedding} for every key on rank 0 ({} on the others), each rank embedding a share."""
    check_crops(mcfg, ecfg)
    mine = keys[dist.share(len(keys), rank)]
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    loader = DataLoader(_FileCrops(mine, roots, mcfg, ecfg), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None)

    def forward(x: torch.Tensor) -> np.ndarray:
        with autocast(rank.device, amp):
            return net.embed(x.to(rank.device)).float().cpu().numpy()
    with tqdm(total=len(mine), desc="embed", disable=not progress or not rank.is_main, leave=False) as bar:
        vectors = mean_crop_embeddings(forward, loader, ecfg, bar.update)
    net.train(was_training)
    mean = np.stack(vectors) if vectors else np.zeros((0, mcfg.embedding_dim), np.float32)
    rows = dist.gather_rows(mean, len(keys), rank)
    return {} if rows is None else dict(zip(keys, rows))


def mean_crop_embeddings(forward: Callable[[torch.Tensor], np.ndarray], files: Iterable[np.ndarray],
                         ecfg: EvalConfig, done: Callable[[int], Any] | None = None) -> list[np.ndarray]:
    """The mean embedding of each file's crops, in the order of `files`, with the crops of many
    files in one forward pass (`forward`: (crops, samples) tensor -> (crops, dim) array; full
    mode: one utterance per pass). `done(n)` is told how many files each batch finished."""
    batch = 1 if ecfg.crop_mode == "full" else ecfg.eval_batch_size
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for owners, x in crop_batches(files, batch):
        for owner, row in zip(owners, forward(x).astype(np.float64)):
            sums[owner] = sums.get(owner, 0) + row
            counts[owner] = counts.get(owner, 0) + 1
        if done is not None:
            done(len(set(owners)))  # batches hold whole files only
    return [(sums[i] / counts[i]).astype(np.float32) for i in sorted(sums)]


def check_crops(mcfg: ModelConfig, ecfg: EvalConfig) -> None:
    if ecfg.crop_mode == "full" and mcfg.layer_norm:
        raise ConfigError(f"crop_mode={ecfg.crop_mode!r} needs a model without the fixed-length layer norm, "
                          f"but this one has layer_norm over {mcfg.n_samples} samples; use crop_mode: reference")
    if ecfg.crop_mode == "reference" and not 0 < ecfg.eval_hop <= mcfg.n_samples:
        raise ConfigError(f"eval_hop={ecfg.eval_hop} must be in 1..n_samples ({mcfg.n_samples}), or test crops "
                          f"skip audio; give eval_hop {mcfg.n_samples * 4 // 5} (the reference's 80 %) or less, or, "
                          "for a bare state_dict, the preset its weights come from (--config)")


# -- the on-disk cache ------------------------------------------------------------------------------
def embedding_settings(cfg: Config, roots: Sequence[Path]) -> dict[str, Any]:
    """What an embedding depends on besides the weights."""
    ev = cfg.evaluation
    return {"crop_mode": ev.crop_mode, "n_samples": cfg.model.n_samples,
            "eval_hop": ev.eval_hop if ev.crop_mode == "reference" else None, "amp": cfg.train.amp,
            "roots": [str(Path(r).resolve()) for r in roots]}


def weights_fingerprint(checkpoint: str | Path, bare_model: ModelConfig | None = None) -> str:
    """What embeddings depend on in the model: the checkpoint file's SHA-1, and for a bare
    state_dict (`bare_model`) the settings its weights do not hold (sinc_kernel, block_pool,
    sample_rate ...), which come from a config and would otherwise be reused when corrected."""
    digest = file_sha1(checkpoint)
    if bare_model is None:  # our checkpoints carry their config: the file's bytes cover it
        return digest
    settings = {k: v for k, v in dataclasses.asdict(bare_model).items() if k != "fast"}  # fast: the same function
    return f"{digest}+{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"


def _stamp(key: str, roots: list[Path]) -> tuple[int, int]:
    """(size, mtime in ns) of a key's audio file: an embedding is reused only while its file
    keeps both (a file converted or written again changes them)."""
    stat = resolve(key, roots).stat()
    return stat.st_size, stat.st_mtime_ns


def _read_cache(path: Path, fingerprint: str) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """{key: (embedding, stamp of the file it was made from)}."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"]))["fingerprint"] != fingerprint:
                return {}  # another checkpoint's embeddings: replaced on the next write
            stamps = [tuple(s) for s in z["stamps"].tolist()]
            return dict(zip(z["keys"].tolist(), zip(z["emb"], stamps)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged from outside
        return {}  # unreadable cache, or one from before the stamps: rebuilt


def cached_embeddings(model: torch.nn.Module, checkpoint_path: str | Path, keys: Sequence[str],
                      roots: Sequence[Path], cfg: Config, rank: dist.RankInfo, cache_dir: str | Path = "cache",
                      progress: bool = True, fingerprint: str | None = None) -> dict[str, np.ndarray]:
    """{key: embedding} for `keys`, embedding only the files the on-disk cache lacks.

    One npz per embedding settings (crop mode, crop length, hop, amp, roots) holds every file
    embedded so far, tagged with the weights' `fingerprint` (default: the checkpoint's SHA-1; see
    `weights_fingerprint`; another one starts it afresh) and each file's size and mtime (a
    changed file is embedded again).
    Call on every rank: they share the extraction and rank 0 writes the file atomically.
    """
    check_crops(cfg.model, cfg.evaluation)
    settings = embedding_settings(cfg, roots)
    roots = [Path(r) for r in roots]
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"embeddings_{tag}.npz"
    fingerprint = fingerprint or file_sha1(checkpoint_path)
    store, stamps, missing, problem = {}, {}, [], ""
    if rank.is_main:
        store = _read_cache(path, fingerprint)
        try:
            stamps = {k: _stamp(k, roots) for k in keys}
            missing = sorted(k for k in set(keys) if k not in store or store[k][1] != stamps[k])
        except FileNotFoundError as err:
            problem = str(err)
    # Rank 0's view decides, so ranks without the cache folder (no shared disk) still agree and stop together.
    missing, problem = dist.broadcast_from_main((missing, problem))
    if problem:
        raise FileNotFoundError(problem)
    if progress and rank.is_main:
        print(f"embeddings: {len(keys) - len(missing)} of {len(keys)} files cached, embedding {len(missing)}")
    if missing:
        new = embed_files(model, missing, roots, cfg.model, cfg.evaluation, rank,
                          amp=cfg.train.amp, workers=cfg.data.num_workers, progress=progress)
        store.update({k: (v, stamps[k]) for k, v in new.items()})
        if rank.is_main:
            names = sorted(store)
            meta = json.dumps({"fingerprint": fingerprint, "checkpoint": str(checkpoint_path), **settings})
            with atomic_open(path, "wb") as f:
                np.savez(f, keys=np.array(names), emb=np.stack([store[k][0] for k in names]),
                         stamps=np.array([store[k][1] for k in names], dtype=np.int64).reshape(-1, 2),
                         meta=np.array(meta))
        dist.barrier()
    return {k: store[k][0] for k in keys if k in store}  # all keys on rank 0, which scores
