"""Reading utterances and cutting them into the crops RawNet2 sees.

Training reads only the frames of its random crop from disk (a partial read), which is what
keeps a VoxCeleb2 epoch from being bound by file I/O. The reference peak-normalises the whole
file before cropping; here the crop is normalised by its own peak. The model's first layer
divides by the crop's standard deviation, so the two differ only by the 1e-6 epsilon.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from rawnet_lib.errors import WorkbookError

__all__ = ["AudioError", "read_audio", "audio_frames", "peak_normalise", "tile", "random_crop", "eval_crops"]


class AudioError(WorkbookError, ValueError):
    """An audio file the workbook cannot use; the message names the file and the fix."""


def audio_frames(path: str | Path) -> int:
    """Number of samples in a file, from its header only."""
    try:
        return sf.info(str(path)).frames
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{path}: cannot read the audio header ({err}); "
                         "run the dataset check (notebooks/data_prep.ipynb) to find every such file") from None


def read_audio(path: str | Path, start: int = 0, frames: int = -1, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples `[start, start + frames)` of a wav file (all when frames = -1)."""
    try:
        with sf.SoundFile(str(path)) as f:
            if f.samplerate != sample_rate:
                raise AudioError(f"{path}: sample rate {f.samplerate} Hz, expected {sample_rate}; resample it, "
                                 f"e.g. ffmpeg -i in.wav -ac 1 -ar {sample_rate} out.wav")
            if f.channels != 1:
                raise AudioError(f"{path}: {f.channels} channels, expected mono; "
                                 f"convert with ffmpeg -i in.wav -ac 1 -ar {sample_rate} out.wav")
            f.seek(start)
            x = f.read(frames, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{path}: unreadable audio ({err}); replace or remove the file, "
                         "then rerun the dataset check") from None
    if x.size == 0:
        raise AudioError(f"{path}: no samples; remove the file or replace it with a valid recording")
    return x


def peak_normalise(x: np.ndarray) -> np.ndarray:
    """x / max|x|, as SincNet; silence (peak 0) is returned unchanged instead of dividing by zero."""
    peak = np.abs(x).max()
    return x / peak if peak > 0 else x


def tile(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat a short utterance until it is n samples long, as the reference does."""
    if len(x) >= n:
        return x[:n]
    return np.tile(x, n // len(x) + 1)[:n]


def random_crop(path: str | Path, n_samples: int, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """A random n_samples crop of a file (tiled when shorter), reading only those frames."""
    total = audio_frames(path)
    if total > n_samples:
        start = int(rng.integers(0, total - n_samples + 1))
        x = read_audio(path, start, n_samples, sample_rate)
    else:
        x = tile(read_audio(path, sample_rate=sample_rate), n_samples)
    return peak_normalise(x).astype(np.float32)


def eval_crops(x: np.ndarray, n_samples: int, hop: int) -> np.ndarray:
    """The reference's test-time crops (n_crops, n_samples): windows `hop` apart, the last one
    aligned to the end of the utterance; short utterances are tiled to one crop."""
    if len(x) <= n_samples:
        return tile(x, n_samples)[None]
    overlap = n_samples - hop
    n_crops = int((len(x) - overlap) / hop) + 1
    starts = [i * hop for i in range(n_crops - 1)] + [len(x) - n_samples]
    return np.stack([x[s:s + n_samples] for s in starts])
