"""Whether an audio file is usable, reading utterances, and cutting them into the crops RawNet2 sees.

:func:`probe` is the one place that decides whether a file is usable and how long it is: the
training list, the dataset check and the m4a conversion all ask it, so they never disagree.
It reads the header only, except for float wavs when asked to scan: a float file can hold NaN
or Inf samples (PCM cannot), which no header shows and which turn a training loss into NaN.

Training reads only the frames of its random crop from disk (a partial read), which is what
keeps a VoxCeleb2 epoch from being bound by file I/O. The reference peak-normalises the whole
file before cropping; here the crop is normalised by its own peak. The model's first layer
divides by the crop's standard deviation, so the two differ only by the 1e-6 epsilon.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from rawnet_lib.errors import WorkbookError

__all__ = ["SAMPLE_RATE", "FLOAT_SUBTYPES", "AUDIO_PROBLEMS", "AudioError", "AudioInfo", "probe", "utf8_name",
           "shown_name", "read_audio", "wav_bytes", "peak_normalise", "tile", "random_crop", "eval_crops"]

SAMPLE_RATE = 16000  # Hz: VoxCeleb, the reference model and every file the workbook writes
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # the wav sample formats that can hold NaN or Inf
_SCAN_BLOCK = 1 << 20  # frames per read when scanning a float file: bounds memory on long files
_REDO = ("re-download or re-convert it (delete it, then run the conversion: it converts only missing wavs), "
         "or just delete it")

# kind -> (title, fix) of every way a file can be unusable, in the order the dataset check reports them.
AUDIO_PROBLEMS = {
    "bad_name": ("file name not UTF-8", "rename the folder's files to UTF-8: convmv -f latin1 -t utf8 -r --notest "
                                        "<folder> (without --notest it only shows the renames; latin1 is the usual "
                                        "other encoding)"),
    "broken_link": ("broken link", "the symbolic link points at a file that does not exist (moved or deleted): "
                                   "point it at the file again (ln -sfn <file> <link>), or delete the link"),
    "not_a_file": ("not a file", "a folder (or other non-file) sits where an utterance file belongs: "
                                 "move what it holds to <speaker>/<video>/<utt>.wav, or remove it"),
    "empty": ("empty file (0 bytes)", _REDO),
    "unreadable": ("unreadable audio", "the file is not a valid WAV (truncated or another format): " + _REDO),
    "sample_rate": ("wrong sample rate", "resample: ffmpeg -i in.wav -ar {sr} -ac 1 -c:a pcm_s16le out.wav "
                                         "(or sox in.wav -r {sr} -c 1 out.wav)"),
    "channels": ("more than one channel", "downmix: ffmpeg -i in.wav -ac 1 -ar {sr} -c:a pcm_s16le out.wav"),
    "no_frames": ("no samples", _REDO),
    "nonfinite": ("NaN or Inf samples", "re-convert it from the source (e.g. to PCM16 with ffmpeg -i src "
                                        "-ar {sr} -ac 1 -c:a pcm_s16le out.wav), or delete it"),
}


class AudioError(WorkbookError, ValueError):
    """An audio file the workbook cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class AudioInfo:
    """What :func:`probe` found: the header's fields and every problem as (kind, what was found).

    `frames` and the other fields are the header's even when there are problems (0 when the
    header could not be read), so a caller can still report a wrong-rate file's length.
    """
    path: Path
    frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    subtype: str = ""
    problems: tuple[tuple[str, str], ...] = ()
    expected_rate: int = SAMPLE_RATE

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0

    @property
    def problem(self) -> str:
        """What is wrong, in words ('' for a usable file): a training list's reason for leaving it out."""
        return "; ".join(found for _, found in self.problems)

    def raise_if_bad(self) -> None:
        """AudioError naming the file, what is wrong and the fix of its first problem."""
        if self.problems:
            raise _error(self.path, self.problems[0][0], self.problem, self.expected_rate)


def utf8_name(path: str | Path) -> bool:
    """Whether the name is UTF-8: Python holds other bytes as surrogates, which soundfile, hashing
    and text files cannot encode."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_name(path: str | Path) -> str:
    """`path` as text that can be printed and written: the bytes of a name that is not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _error(path: Path, kind: str, found: str, sample_rate: int) -> AudioError:
    fix = AUDIO_PROBLEMS[kind][1].format(sr=sample_rate)
    return AudioError(f"{shown_name(path)}: {found}; {fix}. The dataset check (notebooks/data_prep.ipynb) lists "
                      "every such file")


def probe(path: str | Path, sample_rate: int = SAMPLE_RATE, scan: bool = False) -> AudioInfo:
    """Whether `path` is a usable mono `sample_rate` wav, from its header; with `scan`, the samples
    of a float wav are read too, to find NaN or Inf (PCM files need no scan)."""
    path = Path(path)
    if not utf8_name(path):
        return AudioInfo(path, problems=(("bad_name", f"file name not UTF-8 (folder {shown_name(path.parent)})"),),
                         expected_rate=sample_rate)
    try:
        if path.exists() and not path.is_file():
            return AudioInfo(path, problems=(("not_a_file", "a folder, not a file" if path.is_dir()
                                              else "not a regular file"),), expected_rate=sample_rate)
        if path.stat().st_size == 0:
            return AudioInfo(path, problems=(("empty", "empty file (0 bytes)"),), expected_rate=sample_rate)
        info = sf.info(str(path))
    except (RuntimeError, OSError) as err:  # soundfile raises LibsndfileError (a RuntimeError)
        if isinstance(err, FileNotFoundError) and path.is_symlink():  # asked only when the stat failed
            return AudioInfo(path, problems=(("broken_link", f"broken link (to {os.readlink(path)})"),),
                             expected_rate=sample_rate)
        return AudioInfo(path, problems=(("unreadable", f"unreadable ({_reason(err)})"),), expected_rate=sample_rate)
    found = []
    if info.samplerate != sample_rate:
        found.append(("sample_rate", f"sample rate {info.samplerate} Hz, expected {sample_rate}"))
    if info.channels != 1:
        found.append(("channels", f"{info.channels} channels, expected mono"))
    if info.frames == 0:
        found.append(("no_frames", "no samples"))
    elif scan and info.subtype in FLOAT_SUBTYPES:
        found += _scan(path)
    return AudioInfo(path, info.frames, info.samplerate, info.channels, info.subtype, tuple(found), sample_rate)


def _scan(path: Path) -> list[tuple[str, str]]:
    """The sample problems of a float file: NaN or Inf anywhere, or data the header promised but the file lacks."""
    bad = 0
    try:
        for block in sf.blocks(str(path), blocksize=_SCAN_BLOCK, dtype="float32", always_2d=True):
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    except (RuntimeError, OSError) as err:
        return [("unreadable", f"unreadable ({_reason(err)})")]
    return [("nonfinite", f"{bad:,} NaN or Inf sample(s)")] if bad else []


def _reason(err: Exception) -> str:
    """The cause of a read error without the path (the report names the file already)."""
    return getattr(err, "error_string", None) or getattr(err, "strerror", None) or str(err)


def read_audio(path: str | Path, start: int = 0, frames: int = -1, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples `[start, start + frames)` of a wav file (all when frames = -1)."""
    info = probe(path, sample_rate)
    info.raise_if_bad()
    return _read(info, start, frames)


def _read(info: AudioInfo, start: int = 0, frames: int = -1) -> np.ndarray:
    """Samples of a probed file; NaN or Inf in a float file raise, so a crop never carries them into training."""
    try:
        with sf.SoundFile(str(info.path)) as f:
            f.seek(start)
            x = f.read(frames, dtype="float32", always_2d=False)
    except (RuntimeError, OSError) as err:
        raise _error(info.path, "unreadable", f"unreadable audio ({err})", info.expected_rate) from None
    if info.subtype in FLOAT_SUBTYPES and not np.isfinite(x).all():
        raise _error(info.path, "nonfinite", "NaN or Inf samples", info.expected_rate)
    return x


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono waveform as the bytes of a PCM16 wav file (int16 samples, or floats in [-1, 1])."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def peak_normalise(x: np.ndarray) -> np.ndarray:
    """x / max|x|, as SincNet; silence (peak 0) is returned unchanged instead of dividing by zero."""
    peak = np.abs(x).max()
    return x / peak if peak > 0 else x


def tile(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat a short utterance until it is n samples long, as the reference does."""
    if len(x) >= n:
        return x[:n]
    return np.tile(x, n // len(x) + 1)[:n]


def random_crop(path: str | Path, n_samples: int, rng: np.random.Generator,
                sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A random n_samples crop of a file (tiled when shorter), reading only those frames."""
    info = probe(path, sample_rate)
    info.raise_if_bad()
    if info.frames > n_samples:
        start = int(rng.integers(0, info.frames - n_samples + 1))
        x = _read(info, start, n_samples)
    else:
        x = tile(_read(info), n_samples)
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
