"""A user's own audio, whatever it is: any container, rate and channel count, as the model's input.

The training side (`audio.py`) accepts only what the corpus preparation produced (mono 16 kHz
wav) and refuses the rest. Here the opposite holds: a file someone brings is decoded with
soundfile (wav, flac, ogg, mp3, ...) or, for other containers (m4a, mp4, ...), with ffmpeg;
several channels are averaged; any rate is resampled with soxr (the SoX resampler, "HQ").
Decoding a file is the one step that fails on bad input, and it always names the file and the fix.
"""
from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from rawnet_lib.dataset.audio import SAMPLE_RATE, AudioError
from rawnet_lib.dataset.ffmpeg import ConvertError, find_ffmpeg

__all__ = ["AUDIO_SUFFIXES", "ShortAudioWarning", "to_model_rate", "load_any", "find_audio", "describe"]

# What a folder is searched for: soundfile's formats plus the containers ffmpeg decodes for us.
AUDIO_SUFFIXES = frozenset({f".{k.lower()}" for k in sf.available_formats()} |
                           {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".aac", ".webm",
                            ".mkv", ".wma"})
MIN_SECONDS = 1.0  # shorter utterances are tiled to a crop: an embedding of little speech


class ShortAudioWarning(UserWarning):
    """Audio shorter than MIN_SECONDS: its embedding rests on little speech."""


def to_model_rate(x: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at `target` Hz from (frames,) or (frames, channels) at `sr` Hz."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise AudioError(f"audio must be (samples,) or (samples, channels), got shape {x.shape}; pass one "
                         "utterance at a time")
    if sr <= 0:
        raise AudioError(f"sample rate {sr} Hz is not positive; pass sr= the rate the samples were recorded at")
    if sr != target:
        x = soxr.resample(x, sr, target, quality="HQ").astype(np.float32, copy=False)
    return x


def _ffmpeg_decode(path: Path, target: int) -> np.ndarray:
    """Mono float32 at `target` Hz through ffmpeg (containers libsndfile cannot open)."""
    try:  # file: so that a name with a colon (`take1:b.m4a`) is not read as a protocol
        cmd = [find_ffmpeg(), "-nostdin", "-loglevel", "error", "-i", f"file:{path}", "-map", "0:a:0", "-ac", "1",
               "-ar", str(target), "-f", "f32le", "-"]
    except ConvertError as err:
        raise AudioError(f"{path}: not readable audio for soundfile (wav, flac, ogg, mp3); other containers (m4a, "
                         f"mp4) need ffmpeg: {err}; or re-export it as wav or flac") from None
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{path}: not readable audio (soundfile and ffmpeg both fail: "
                         f"{lines[-1] if lines else proc.returncode}); re-export it as wav or flac, or leave it out")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def load_any(path: str | Path, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of any audio file at `target` Hz; AudioError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "does not exist"
        raise AudioError(f"{path}: {what}; give one audio file (wav, flac, ogg, mp3, m4a, ...) here; embedding many "
                         "files (embed_many, enroll, the embed command) takes folders")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes); re-record or re-export it")
    try:
        with path.open("rb") as f:  # a file object: soundfile cannot encode a name that is not UTF-8
            x, sr = sf.read(f, dtype="float32", always_2d=True)
    except OSError as err:
        raise AudioError(f"{path}: cannot be opened ({err.strerror}); check its permissions") from None
    except TypeError:  # soundfile needs the rate and sample format of a headerless .raw file
        raise AudioError(f"{path}: headerless raw samples, whose rate, sample format and channels are unknown; "
                         "convert it with the ones it was recorded with, e.g. ffmpeg -f s16le -ar 16000 -ac 1 "
                         "-i in.raw out.wav") from None
    except RuntimeError:  # soundfile's LibsndfileError: not a format libsndfile knows: try ffmpeg
        x = _ffmpeg_decode(path, target)
    else:
        x = to_model_rate(x, sr, target)
    if x.size == 0:
        raise AudioError(f"{path}: no samples; re-record or re-export it")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: NaN or Inf samples; re-export it as PCM (ffmpeg -i in -c:a pcm_s16le out.wav)")
    if not x.any():
        raise AudioError(f"{path}: digital silence (every sample is 0), so no voice to embed; check the recording "
                         "or the export that made it")
    if x.size < MIN_SECONDS * target:
        warnings.warn(f"{path}: only {x.size / target:.2f} s of audio; it is repeated to fill a crop, so its "
                      "embedding (and any score) is unreliable", ShortAudioWarning, stacklevel=2)
    return x


def find_audio(items: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(audio files, problems) of files and folders: a folder gives its audio files (recursively,
    sorted, by suffix); a file is taken as given (whether it decodes is found out when reading);
    a missing path or a folder without audio is a problem (path, what and the fix)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            files += found
            if not found:
                problems.append((str(item), "a folder without audio files (looked for "
                                            f"{', '.join(sorted(AUDIO_SUFFIXES)[:8])}, ...); give another folder"))
        elif item.is_file():
            files.append(item)
        else:
            problems.append((str(item), "does not exist; check the path"))
    return files, problems


def describe(problems: Sequence[tuple[str, str]]) -> str:
    """Problems as lines `  path: what`, for a report."""
    return "\n".join(f"  {path}: {what}" for path, what in problems)
