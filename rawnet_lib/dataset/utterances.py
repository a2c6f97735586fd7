"""VoxCeleb trees as utterance lists, and the training dataset of random crops.

A tree is `root/<speaker>/<video>/<utt>.wav`; a key is the path relative to root. Scanning a
VoxCeleb2 tree (a million files) reads every header once, so the result is cached as a list
file (`key<TAB>frames`, or `key<TAB>reason` for a file left out, after a line naming the sample
rate the files were probed for) and bad files are known before the first training step.

A list file starts with the tree's signature (`tree_signature`: the number of wav files and a
hash of each one's key, size and modification time) and is rescanned, with a message, when
the tree no longer matches it. Every file is statted: directory times alone would miss a file
rewritten in place (a file fixed with `ffmpeg -y` keeps its name and its folder's time), and
one stat per file costs about a twentieth of the header reads of a scan (6.4 s against 126 s
for 209,790 files: `python -m rawnet_lib.bench scale-data`, README "VoxCeleb scale"). A rescan
lists the tree once, for the new signature and the scan. Whether a file is usable is
:func:`rawnet_lib.dataset.audio.probe`'s answer, the same as the dataset check's; float wavs are read
whole to find NaN or Inf samples (PCM files, all of VoxCeleb, cost one header read).
"""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import soxr
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rawnet_lib.config import REPO_DIR, DataConfig, input_path
from rawnet_lib.dataset.audio import SAMPLE_RATE, AudioError, peak_normalise, probe, random_crop, shown_name, tile
from rawnet_lib.errors import MissingPathError
from rawnet_lib.io import atomic_write_text

__all__ = ["UtteranceList", "scan_utterances", "tree_signature", "load_utterances", "resolve_data_path", "list_dir",
           "CropDataset", "perturbed_speakers", "speed_crop"]


@dataclass
class UtteranceList:
    """The usable utterances of one tree (sorted keys, sample counts) and the files it had to leave out."""
    root: Path
    keys: list[str]
    frames: np.ndarray
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def speakers(self) -> list[str]:
        """Speaker ids in sorted order: the class index of a speaker is its position here."""
        return sorted({k.split("/", 1)[0] for k in self.keys})

    def labels(self) -> np.ndarray:
        index = {s: i for i, s in enumerate(self.speakers())}
        return np.array([index[k.split("/", 1)[0]] for k in self.keys], dtype=np.int64)

    def seconds(self, sample_rate: int = SAMPLE_RATE) -> float:
        return float(self.frames.sum()) / sample_rate

    def bad_summary(self, limit: int = 5) -> str:
        lines = [f"{len(self.bad)} unusable file(s) under {self.root}:"]
        lines += [f"  {key}: {reason}" for key, reason in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        lines.append("Fix or remove them (the dataset check in notebooks/data_prep.ipynb lists them all), "
                     "or set on_bad_audio: skip to train without them.")
        return "\n".join(lines)


def scan_utterances(root: str | Path, sample_rate: int = SAMPLE_RATE, workers: int = 8,
                    progress: bool = True, files: list[tuple[str, int, int]] | None = None) -> UtteranceList:
    """Every `spk/video/utt.wav` under root with its length; unusable entries (a bad header, NaN
    samples in a float file, a folder named like a file) go to `.bad` with the reason. `files`:
    the tree's `_wav_files` when the caller has just listed them (for the signature)."""
    root = _require_tree(root)
    paths = [root / key for key, _, _ in (files if files is not None else _wav_files(root, workers))]
    if not paths:
        raise MissingPathError(f"no spk/video/utt.wav files under {root}; convert .m4a files first "
                                "(python -m rawnet_lib.convert) or check the path")
    with ThreadPoolExecutor(workers) as pool:
        infos = list(tqdm(pool.map(lambda p: probe(p, sample_rate, scan=True), paths), total=len(paths),
                          desc=f"scan {root.name}", disable=not progress, leave=False))
    keys, frames, bad = [], [], []
    for path, info in zip(paths, infos):
        key = path.relative_to(root).as_posix()
        if info.ok:
            keys.append(key)
            frames.append(info.frames)
        else:
            bad.append((shown_name(key), info.problem))  # a name that is not UTF-8 cannot be written as it is
    return UtteranceList(root, keys, np.array(frames, dtype=np.int64), bad)


def _require_tree(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise MissingPathError(f"{root} does not exist; give data_path the folder that holds "
                                "VoxCeleb1/ and VoxCeleb2/ (the seed's DB/), or leave it empty for the demo corpus")
    return root


def _entries(path: str | Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _wav_files(root: Path, workers: int = 8) -> list[tuple[str, int, int]]:
    """(key, size, mtime_ns) of every `spk/video/*.wav` entry under root, in path order (a
    folder named like a file is listed too: the scan reports it). Folders are told apart by
    their directory-entry type, so only the wav entries are statted; speaker folders are read
    by `workers` threads, since a stat waits on the file system (most on a network one)."""
    speakers = [e for e in _entries(root) if e.is_dir()]
    with ThreadPoolExecutor(workers) as pool:
        return [f for files in pool.map(_speaker_files, speakers) for f in files]


def _speaker_files(speaker: os.DirEntry) -> list[tuple[str, int, int]]:
    out = []
    for video in _entries(speaker.path):
        if video.is_dir():
            prefix = f"{speaker.name}/{video.name}/"
            out += [(prefix + utt.name, *_stat(utt)) for utt in _entries(video.path) if utt.name.endswith(".wav")]
    return out


def _stat(entry: os.DirEntry) -> tuple[int, int]:
    try:
        st = entry.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:  # a dangling link: the scan reports it; here it only has to be noticed when it changes
        return -1, -1


def tree_signature(root: str | Path) -> str:
    """`<n> files <sha1>`: the count of wav files under root and a hash of their keys, sizes
    and modification times. Adding, removing, renaming or rewriting a file changes it."""
    return _signature(_wav_files(_require_tree(root)))


def _signature(files: list[tuple[str, int, int]]) -> str:
    text = "".join(f"{key}\t{size}\t{mtime}\n" for key, size, mtime in files)
    return f"{len(files)} files {hashlib.sha1(text.encode('utf-8', 'surrogateescape')).hexdigest()}"  # the raw bytes


def list_dir(data_path: Path) -> Path:
    """Where list files of a data path live: `<data_path>/lists`, or under outputs/ when read-only."""
    own = data_path / "lists"
    if os.access(data_path, os.W_OK) and (not own.exists() or os.access(own, os.W_OK)):
        return own
    tag = hashlib.sha1(str(data_path.resolve()).encode()).hexdigest()[:10]
    return REPO_DIR / "outputs" / "lists" / tag


def _list_file(data_path: Path, subdir: str) -> Path:
    return list_dir(data_path) / (subdir.strip("/").replace("/", "_") + ".tsv")


SIGNATURE_TAG = "#tree\t"  # the list file's first line: SIGNATURE_TAG + tree_signature(root)
RATE_TAG = "#rate\t"  # its second: the sample rate the files were probed for (absent in old files: 16 kHz)


def load_utterances(data_path: Path, subdir: str, refresh: bool = False, sample_rate: int = SAMPLE_RATE,
                    progress: bool = True, check_tree: bool = True) -> UtteranceList:
    """The utterance list of `data_path/subdir` for audio at `sample_rate` (the model's: a file at
    another rate is left out), scanned once and then read from its list file for as long as the
    tree keeps the signature, and the rate, the file was written with. `check_tree=False`
    trusts an existing list file of that rate: for the ranks that read it right after rank 0
    checked it (the signature stats every file, ~30 s for VoxCeleb2, and would run again on every rank)."""
    root = data_path / subdir
    path = _list_file(data_path, subdir)
    lines = path.read_text().splitlines() if path.exists() and not refresh else None
    written = lines[0][len(SIGNATURE_TAG):] if lines and lines[0].startswith(SIGNATURE_TAG) else None
    has_rate = lines is not None and len(lines) > 1 and lines[1].startswith(RATE_TAG)
    rate = int(lines[1][len(RATE_TAG):]) if has_rate else SAMPLE_RATE
    trusted = not check_tree and lines is not None and rate == sample_rate
    files = None if trusted else _wav_files(_require_tree(root))  # listed once, for the signature and a scan
    signature = None if trusted else _signature(files)  # before a scan: a change during it shows next time
    if lines is not None:
        if trusted or (written == signature and rate == sample_rate):
            return _parse_list(root, lines[2 if has_rate else 1:])
        why = (f"it was made for {rate} Hz audio, and {sample_rate} Hz is asked for" if rate != sample_rate
               else _what_changed(written, signature, root))
        print(f"{path} is stale: {why}; rescanning {root}", file=sys.stderr, flush=True)
    utts = scan_utterances(root, sample_rate, progress=progress, files=files)
    lines = [f"{k}\t{n}" for k, n in zip(utts.keys, utts.frames)] + [f"{k}\t{why}" for k, why in utts.bad]
    atomic_write_text(path, "\n".join([SIGNATURE_TAG + signature, f"{RATE_TAG}{sample_rate}", *lines]) + "\n")
    return utts


def _parse_list(root: Path, lines: list[str]) -> UtteranceList:
    keys, frames, bad = [], [], []
    for line in lines:
        key, value = line.split("\t", 1)
        if value.isdigit():
            keys.append(key)
            frames.append(int(value))
        else:
            bad.append((key, value))
    return UtteranceList(root, keys, np.array(frames, dtype=np.int64), bad)


def _what_changed(written: str | None, now: str, root: Path) -> str:
    if written is None:
        return "it has no tree signature (written by an older version)"
    before, after = int(written.split()[0]), int(now.split()[0])
    if before != after:
        return f"{root} had {before} wav files when it was written and has {after} now"
    return (f"files under {root} were added, removed, renamed or rewritten since it was written "
            f"(the count, {after}, is the same)")


def resolve_data_path(cfg: DataConfig) -> Path:
    """The user's data folder, or the built-in demo corpus (generated on first use)."""
    if cfg.data_path:
        path = input_path(cfg.data_path)
        if not path.is_dir():
            raise MissingPathError(f"data_path {path} does not exist; give the folder that holds VoxCeleb1/ "
                                    "and VoxCeleb2/, or leave data_path empty to use the demo corpus")
        return path
    from rawnet_lib.corpus import ensure_demo_corpus
    return ensure_demo_corpus(cfg.demo_size)


def perturbed_speakers(speakers: Sequence[str], factors: Sequence[float]) -> list[str]:
    """Class names under speed perturbation: one identity per (factor, speaker), factor-major,
    `id00012` for factor 1.0 and `id00012@sp0.9` otherwise (WeSpeaker: each speed a new speaker)."""
    return [s if f == 1.0 else f"{s}@sp{f:g}" for f in factors for s in speakers]


def speed_crop(path: Path, n_samples: int, factor: float, rng: np.random.Generator,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A crop played `factor` times faster (pitch and tempo, as Kaldi's speed perturbation):
    about n_samples * factor samples read, resampled by soxr as if recorded at sample_rate * factor."""
    if factor == 1.0:
        return random_crop(path, n_samples, rng, sample_rate)
    raw = random_crop(path, int(np.ceil(n_samples * factor)) + 16, rng, sample_rate)
    y = soxr.resample(raw, sample_rate * factor, sample_rate, quality="HQ")
    return peak_normalise(tile(y, n_samples)).astype(np.float32)


class CropDataset(Dataset):
    """(random crop, speaker index) per utterance; the crop depends only on (seed, epoch, index),
    so a run is reproducible and resumable whatever the number of loader workers.

    `speed_perturb` factors other than [1.0]: each crop's factor is drawn per (seed, epoch,
    index) and its label is factor_index * n_speakers + speaker (`perturbed_speakers`).
    `augment` (rawnet_lib.dataset.augment.Augmenter) then changes the crop with its own draws, so the
    crop positions are those of the run without augmentation.
    """

    def __init__(self, utts: UtteranceList, n_samples: int, seed: int, sample_rate: int = SAMPLE_RATE,
                 skip_bad: bool = False, speed_perturb: Sequence[float] = (1.0,),
                 augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None):
        self.utts, self.n_samples, self.seed, self.sample_rate = utts, n_samples, seed, sample_rate
        self.labels = utts.labels()
        self.skip_bad = skip_bad
        self.factors, self.augment = list(speed_perturb), augment
        self.n_speakers = len(utts.speakers())
        self.epoch = 0

    def speakers(self) -> list[str]:
        """The class names, in label order."""
        return perturbed_speakers(self.utts.speakers(), self.factors)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i, last = index, None
        for _ in range(len(self)):  # a loop, not recursion: a long run of bad files must not overflow the stack
            rng = np.random.default_rng([self.seed, self.epoch, i])
            extra = np.random.default_rng([self.seed, self.epoch, i, 1])  # speed and augmentation draws
            k = int(extra.integers(len(self.factors))) if len(self.factors) > 1 else 0
            try:
                x = speed_crop(self.utts.root / self.utts.keys[i], self.n_samples, self.factors[k], rng,
                               self.sample_rate)
            except AudioError as err:
                if not self.skip_bad:
                    raise
                # The list said usable but the file is not (changed since the scan, or NaN samples in a crop):
                # train on a neighbour rather than stop mid-epoch.
                i, last = (i + 1) % len(self), err
                continue
            if self.augment is not None:
                x = self.augment(x, extra)
            return torch.from_numpy(x), k * self.n_speakers + int(self.labels[i])
        raise AudioError(f"none of the {len(self)} files under {self.utts.root} is readable; last: {last}")
