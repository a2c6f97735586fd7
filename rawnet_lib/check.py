"""Dataset check: every problem of a VoxCeleb tree and its trial lists, reported at once.

Training fails on the first bad file after hours of work, and fixing one file per run is
slow, so this walks the whole tree first (one header read per file on a thread pool) and
groups what it finds by kind, each with a count, the first few paths and the fix.

Silence (peak 0, e.g. a failed conversion that wrote zeros) needs the samples, not the header.
Reading every sample of VoxCeleb2 would double the check's I/O, so each file is probed with
``_PROBES`` short blocks spread over it; only when all of them are zero is the whole file
read to confirm. A file is reported silent only when every sample is zero.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from rawnet_lib.trials import TrialListError, missing_files, official_list_path, read_trials
from rawnet_lib.errors import WorkbookError

__all__ = ["DEFAULT_DIRS", "DatasetError", "Problem", "CheckReport", "check_dataset"]

DEFAULT_DIRS = ("VoxCeleb2/wav", "VoxCeleb1/dev_wav", "VoxCeleb1/eval_wav")
_SHOWN = 5  # example paths kept per problem kind
_CHUNK = 4096  # files in flight on the pool: bounds memory on a million-file tree
_PROBES, _PROBE_FRAMES = 8, 1600  # silence probe: 8 blocks of 0.1 s at 16 kHz

# kind -> (title, fix); the order here is the order of the report.
_KINDS = {
    "missing_dir": ("folder missing", "check data_path (it holds VoxCeleb1/ and VoxCeleb2/) or leave the "
                                      "folder out of `dirs`"),
    "m4a": (".m4a file not converted", "run the m4a conversion (python -m rawnet_lib.convert <m4a root> "
                                       "<data_path>/VoxCeleb2/wav), then move the .m4a files out of the wav tree"),
    "other_file": ("not a .wav file", "move it out of the tree: only <spk>/<video>/<utt>.wav files are read"),
    "bad_layout": ("not at <spk>/<video>/<utt>.wav", "move it to <speaker>/<video>/<utt>.wav under the folder; "
                                                      "training only reads that depth"),
    "empty": ("empty file (0 bytes)", "re-download or re-convert it, or delete it"),
    "unreadable": ("unreadable audio", "the file is not a valid WAV (truncated or another format): "
                                       "re-download or re-convert it, or delete it"),
    "sample_rate": ("wrong sample rate", "resample: ffmpeg -i in.wav -ar {sr} -ac 1 -c:a pcm_s16le out.wav "
                                         "(or sox in.wav -r {sr} -c 1 out.wav)"),
    "channels": ("more than one channel", "downmix: ffmpeg -i in.wav -ac 1 -ar {sr} -c:a pcm_s16le out.wav"),
    "no_frames": ("no samples", "re-download or re-convert it, or delete it"),
    "silent": ("silent (every sample 0)", "re-convert it from the source; a zero file usually means a failed "
                                          "conversion"),
    "short": ("shorter than min_seconds", "delete it or lower min_seconds; crops of short files are tiled"),
    "list_missing": ("trial list missing", "download it into <data_path>/VoxCeleb1/ or give a path that exists"),
    "list_invalid": ("trial list not usable", "see the message; each line is `label enroll test`, "
                                              "label 1 = same speaker"),
    "list_files_missing": ("trial file not on disk", "add the missing VoxCeleb1 folder (Vox1-E/H need dev_wav "
                                                     "and eval_wav) or use the list that matches the data"),
}


class DatasetError(WorkbookError, ValueError):
    """A dataset with problems; the message is the full check report."""


@dataclass
class Problem:
    """One kind of problem: how often it occurs, the first examples, and the fix."""
    title: str
    fix: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`. Totals count usable utterances only (no problem found)."""
    data_path: Path
    sample_rate: int = 16000
    problems: dict[str, Problem] = field(default_factory=dict)
    files: int = 0
    utterances: int = 0
    speakers: int = 0
    hours: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, example: str) -> None:
        """Count one occurrence of `kind` (a key of the module's problem table)."""
        if kind not in self.problems:
            title, fix = _KINDS[kind]
            self.problems[kind] = Problem(title, fix.format(sr=self.sample_rate))
        problem = self.problems[kind]
        problem.count += 1
        if len(problem.examples) < _SHOWN:
            problem.examples.append(example)

    def __str__(self) -> str:
        head = (f"dataset {self.data_path}: {self.files:,} files, {self.utterances:,} usable utterances of "
                f"{self.speakers:,} speakers, {self.hours:.2f} h of audio")
        if self.ok:
            return head + "\nno problems found"
        lines = [head, f"{len(self.problems)} kind(s) of problem:"]
        for kind in _KINDS:
            if kind in self.problems:
                p = self.problems[kind]
                lines.append(f"  {p.title}: {p.count:,}")
                lines += ["    " + example.replace("\n", "\n      ") for example in p.examples]
                if p.count > len(p.examples):
                    lines.append(f"    ... and {p.count - len(p.examples):,} more")
                lines.append(f"    fix: {p.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain types only, for JSON or a DataFrame."""
        return {"data_path": str(self.data_path), "sample_rate": self.sample_rate, "ok": self.ok, "files": self.files,
                "utterances": self.utterances, "speakers": self.speakers, "hours": self.hours,
                "problems": {k: {"title": p.title, "count": p.count, "examples": list(p.examples), "fix": p.fix}
                             for k, p in self.problems.items()}}

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise DatasetError(str(self))


def _is_silent(path: Path, frames: int) -> bool:
    """True when every sample is 0; probes a few blocks and reads the whole file only if they are all 0."""
    with sf.SoundFile(str(path)) as f:
        if frames > _PROBES * _PROBE_FRAMES:
            for start in np.linspace(0, frames - _PROBE_FRAMES, _PROBES).astype(np.int64):
                f.seek(int(start))
                if np.any(f.read(_PROBE_FRAMES, dtype="float32")):
                    return False
            f.seek(0)
        return not np.any(f.read(dtype="float32"))


def _inspect(path: Path, sample_rate: int, min_seconds: float) -> tuple[list[tuple[str, str]], float]:
    """(problems as (kind, detail) pairs, seconds) of one wav file; no problems = usable."""
    try:
        if path.stat().st_size == 0:
            return [("empty", "")], 0.0
        info = sf.info(str(path))
        found = []
        if info.samplerate != sample_rate:
            found.append(("sample_rate", f"{info.samplerate} Hz"))
        if info.channels != 1:
            found.append(("channels", f"{info.channels} channels"))
        if info.frames == 0:
            return found + [("no_frames", "")], 0.0
        seconds = info.frames / info.samplerate
        if seconds < min_seconds:
            found.append(("short", f"{seconds:.2f} s"))
        if _is_silent(path, info.frames):
            found.append(("silent", ""))
        return found, seconds
    except (RuntimeError, OSError, ValueError) as err:  # soundfile raises LibsndfileError (a RuntimeError)
        return [("unreadable", getattr(err, "error_string", str(err)))], 0.0


def _walk(root: Path) -> list[Path]:
    """Every file under root, sorted; hidden files too (a stray .part is a problem); follows symlinked folders."""
    out = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        out += [Path(folder) / n for n in sorted(names)]
    return out


def check_dataset(data_path: Path, dirs: Sequence[str] = DEFAULT_DIRS, trial_lists: Sequence[str] = ("O",),
                  sample_rate: int = 16000, min_seconds: float = 0.0, workers: int = 2,
                  progress: bool = True) -> CheckReport:
    """Check the wav trees `dirs` (relative to data_path) and `trial_lists`, collecting every problem.

    Trial lists are names of OFFICIAL_LISTS or .txt paths; their keys resolve against the
    VoxCeleb1 folders among `dirs` (all of `dirs` when there are none).
    """
    data_path = Path(data_path)
    list_paths = [official_list_path(data_path, name) for name in trial_lists]  # bad names raise before the walk
    report = CheckReport(data_path, sample_rate)

    wavs: list[Path] = []
    for d in dirs:
        root = data_path / d
        if not root.is_dir():
            report.add("missing_dir", str(root))
            continue
        for path in _walk(root):
            rel = path.relative_to(root)
            report.files += 1
            if path.suffix == ".m4a":
                report.add("m4a", _shown(path, data_path))
            elif path.suffix != ".wav":
                report.add("other_file", _shown(path, data_path))
            elif len(rel.parts) != 3:
                report.add("bad_layout", _shown(path, data_path))
            else:
                wavs.append(path)

    speakers = set()
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(wavs), desc="check audio", disable=not progress, leave=False) as bar:
        for i in range(0, len(wavs), _CHUNK):
            chunk = wavs[i:i + _CHUNK]
            for path, (found, seconds) in zip(chunk, pool.map(
                    lambda p: _inspect(p, sample_rate, min_seconds), chunk)):
                for kind, detail in found:
                    report.add(kind, _shown(path, data_path) + (f": {detail}" if detail else ""))
                if not found:
                    report.utterances += 1
                    report.hours += seconds / 3600
                    speakers.add(path.parent.parent.name)
                bar.update()
    report.speakers = len(speakers)

    roots = [data_path / d for d in dirs if d.startswith("VoxCeleb1")] or [data_path / d for d in dirs]
    for path in list_paths:
        if not path.is_file():
            report.add("list_missing", str(path))
            continue
        try:
            trials = read_trials(path)
        except TrialListError as err:
            report.add("list_invalid", str(err))
            continue
        for key in missing_files(trials, roots):
            report.add("list_files_missing", f"{key} (in {path.name})")
    return report


def _shown(path: Path, data_path: Path) -> str:
    """A path as shown in the report: relative to data_path, which the header names."""
    return path.relative_to(data_path).as_posix()
