"""Dataset check: every problem of a VoxCeleb tree and its trial lists, reported at once.

Training fails on the first bad file after hours of work, and fixing one file per run is
slow, so this walks the whole tree first and groups what it finds by kind, each with a count,
the first few paths and the fix. Errors make the data unusable as it is; warnings (short
files, a trial list's byte order mark) are worth a look but do not.

Whether a wav is usable, and its length, come from the training list
(:func:`rawnet_lib.dataset.utterances.load_utterances`: one :func:`rawnet_lib.dataset.audio.probe`
per file, or none while the tree matches its list file), so a data prep run reads each header
once, not once for the list and again here. Only the files the list left out are probed again,
to name each problem's kind; the walk itself opens no file and finds what the list does not
look at (m4a files, leftovers, files outside <spk>/<video>/<utt>.wav).

Silence (peak 0, e.g. a failed conversion that wrote zeros) needs the samples, not the header.
Reading every sample of VoxCeleb2 would double the check's I/O, so each file is probed with
``_PROBES`` short blocks spread over it; only when all of them are zero is the whole file
read to confirm. A file is reported silent only when every sample is zero.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from rawnet_lib.config import DataConfig
from rawnet_lib.dataset.audio import AUDIO_PROBLEMS, SAMPLE_RATE, probe, shown_name
from rawnet_lib.dataset.trials import TrialListError, TrialListWarning, official_list_path, read_trials
from rawnet_lib.dataset.utterances import UtteranceList, load_utterances
from rawnet_lib.errors import WorkbookError

__all__ = ["DatasetError", "Problem", "CheckReport", "data_dirs", "check_dataset"]

_SHOWN = 5  # example paths kept per problem kind
_CHUNK = 4096  # files in flight on the pool: bounds memory on a million-file tree
_PROBES, _PROBE_FRAMES = 8, 1600  # silence probe: 8 blocks of 0.1 s at 16 kHz
_UTT_DEPTH = 3  # <speaker>/<video>/<utt>.wav

# kind -> (title, fix); the order here is the order of the report. Warnings are the kinds in _WARNINGS.
_KINDS = {
    "missing_dir": ("folder missing", "check data_path (it holds VoxCeleb1/ and VoxCeleb2/) or leave the "
                                      "folder out of `dirs`"),
    "m4a": (".m4a file not converted", "run the m4a conversion (python -m rawnet_lib.convert <m4a root> "
                                       "<data_path>/VoxCeleb2/wav), then move the .m4a files out of the wav tree"),
    "conversion_failed": (".m4a file that did not convert (no wav made)",
                          "re-download it, or delete the .m4a to go on without it"),
    "speaker_leak": ("speaker in the training folder and an evaluation folder",
                     "a test speaker in training leaks into the results (the EER comes out too good): remove the "
                     "speaker from one of the folders, or point train_dir / eval_dirs at folders that share none"),
    "duplicate_key": ("utterance in two evaluation folders",
                      "a trial list's key then names two files and which one is scored is ambiguous: remove one copy"),
    "leftover_tmp": ("leftover of an interrupted conversion (a .<name>.wav.<x>.tmp file)",
                     "delete it: a conversion (or another write) stopped before the file was finished; the wav "
                     "itself is made again by the next conversion run"),
    "other_file": ("not a .wav file", "move it out of the tree: only <spk>/<video>/<utt>.wav files are read"),
    "bad_layout": ("not at <spk>/<video>/<utt>.wav", "move it to <speaker>/<video>/<utt>.wav under the folder; "
                                                      "training only reads that depth"),
    **AUDIO_PROBLEMS,
    "silent": ("silent (every sample 0)", "a zero file usually means a failed conversion: delete it, then run "
                                          "python -m rawnet_lib.convert (or prep) again, which converts what is "
                                          "missing; a file that came as wav: re-download it"),
    "short": ("shorter than {min_seconds:g} s", "listen to a few: training tiles a short file to fill its crop "
                                                "(a 0.05 s file is repeated ~74 times in a 3.7 s crop), so delete "
                                                "those that are not real speech, or lower min_seconds if they are "
                                                "expected"),
    "list_missing": ("trial list missing", "download it into <data_path>/VoxCeleb1/ or give a path that exists"),
    "list_invalid": ("trial list not usable", "each problem above has its fix; a line is `label enroll test`, "
                                              "label 1 = same speaker"),
    "list_warning": ("trial list read after a fix", "nothing has to change; the note says how to fix the file "
                                                     "itself"),
}
_WARNINGS = {"short", "list_warning"}


class DatasetError(WorkbookError, ValueError):
    """A dataset with problems; the message is the full check report."""


@dataclass
class Problem:
    """One kind of problem: how often it occurs, the first examples, and the fix; a warning
    does not make the data unusable."""
    title: str
    fix: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    warning: bool = False


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`. Totals count usable utterances (no error; warnings allowed)."""
    data_path: Path
    sample_rate: int = SAMPLE_RATE
    min_seconds: float = 1.0
    problems: dict[str, Problem] = field(default_factory=dict)
    files: int = 0
    utterances: int = 0
    speakers: int = 0
    hours: float = 0.0

    @property
    def ok(self) -> bool:
        """True when nothing but warnings was found."""
        return all(p.warning for p in self.problems.values())

    def add(self, kind: str, example: str) -> None:
        """Count one occurrence of `kind` (a key of the module's problem table)."""
        if kind not in self.problems:
            title, fix = _KINDS[kind]
            values = {"sr": self.sample_rate, "min_seconds": self.min_seconds}
            self.problems[kind] = Problem(title.format(**values), fix.format(**values), warning=kind in _WARNINGS)
        problem = self.problems[kind]
        problem.count += 1
        if len(problem.examples) < _SHOWN:
            problem.examples.append(example)

    def __str__(self) -> str:
        head = (f"dataset {self.data_path}: {self.files:,} files, {self.utterances:,} usable utterances of "
                f"{self.speakers:,} speakers, {self.hours:.2f} h of audio")
        kinds = [k for k in _KINDS if k in self.problems]
        errors = [k for k in kinds if not self.problems[k].warning]
        warns = [k for k in kinds if self.problems[k].warning]
        summary = f"{len(errors)} kind(s) of problem" if errors else "no problems found"
        summary += f", {len(warns)} kind(s) of warning:" if warns else (":" if errors else "")
        lines = [head, summary]
        for kind in errors + warns:
            p = self.problems[kind]
            lines.append(f"  {'warning: ' if p.warning else ''}{p.title}: {p.count:,}")
            lines += ["    " + example.replace("\n", "\n      ") for example in p.examples]
            if p.count > len(p.examples):
                lines.append(f"    ... and {p.count - len(p.examples):,} more")
            lines.append(f"    fix: {p.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain types only, for JSON or a DataFrame."""
        return {"data_path": str(self.data_path), "sample_rate": self.sample_rate, "min_seconds": self.min_seconds,
                "ok": self.ok, "files": self.files, "utterances": self.utterances, "speakers": self.speakers,
                "hours": self.hours,
                "problems": {k: {"title": p.title, "count": p.count, "examples": list(p.examples), "fix": p.fix,
                                 "warning": p.warning} for k, p in self.problems.items()}}

    def raise_if_bad(self) -> None:
        """DatasetError holding the whole report when there is any problem other than a warning."""
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


def _inspect(path: Path, frames: int | None, sample_rate: int,
             min_seconds: float) -> tuple[list[tuple[str, str]], float]:
    """(problems as (kind, what was found), seconds) of one entry at utterance depth, warnings included.
    `frames`: its length when the training list found it usable (no header read here), else None."""
    if frames is None:
        info = probe(path, sample_rate, scan=True)
        found, frames, seconds = list(info.problems), info.frames, info.seconds
    else:
        found, seconds = [], frames / sample_rate
    if frames and "unreadable" not in dict(found):
        if seconds < min_seconds:
            found.append(("short", f"{seconds:.2f} s"))
        try:
            if _is_silent(path, frames):
                found.append(("silent", ""))
        except (RuntimeError, OSError) as err:  # soundfile raises LibsndfileError (a RuntimeError)
            found.append(("unreadable", f"unreadable ({getattr(err, 'error_string', None) or err})"))
    return found, seconds


def _walk(root: Path) -> list[Path]:
    """Every file under root, sorted, hidden ones too (a stray .tmp is a problem), plus every folder
    named like an utterance file at utterance depth (training's glob picks those up); follows
    symlinked folders."""
    out = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        at_utt_depth = len(Path(folder).relative_to(root).parts) == _UTT_DEPTH - 1
        entries = names + [d for d in dirs if at_utt_depth and d.endswith(".wav")]
        out += [Path(folder) / n for n in sorted(entries)]
    return out


def data_dirs(cfg: DataConfig) -> list[str]:
    """The wav folders a config reads: the training folder, then the evaluation ones, each once."""
    return list(dict.fromkeys([cfg.train_dir, *cfg.eval_dirs]))


def check_dataset(data_path: Path, dirs: Sequence[str] | None = None, trial_lists: Sequence[str] = ("O",),
                  sample_rate: int = SAMPLE_RATE, min_seconds: float = 1.0, workers: int = 2,
                  progress: bool = True, failed_conversions: Sequence[tuple[str, str]] = (),
                  train_dir: str | None = None, lists: Mapping[str, UtteranceList] | None = None) -> CheckReport:
    """Check the wav trees `dirs` (relative to data_path; default: the folders of a default
    DataConfig) and `trial_lists`, collecting every problem; files shorter than `min_seconds`
    are a warning. `failed_conversions`: (m4a path, reason) of a conversion run just before,
    whose files left no wav for the walk to find.

    Trial lists are names of OFFICIAL_LISTS or .txt paths; their keys resolve against the
    VoxCeleb1 folders among `dirs` (all of `dirs` when there are none), so a key under two of
    them is an error. A speaker of `train_dir` (default: a default DataConfig's, when among
    `dirs`) in another of `dirs` is one too: VoxCeleb2 and VoxCeleb1 share no speakers.

    `lists`: the training lists of `dirs` at `sample_rate`, when the caller has just loaded them
    (prep); a folder without one is loaded here (:func:`load_utterances`, which may write its list file).
    """
    data_path = Path(data_path)
    dirs = data_dirs(DataConfig()) if dirs is None else list(dict.fromkeys(dirs))
    train_dir = DataConfig().train_dir if train_dir is None else train_dir
    list_paths = [official_list_path(data_path, name) for name in trial_lists]  # bad names raise before the walk
    report = CheckReport(data_path, sample_rate, min_seconds)
    for m4a, reason in failed_conversions:
        report.add("conversion_failed", f"{_shown(Path(m4a), data_path)}: {reason}")

    wavs: list[tuple[Path, int | None]] = []  # with the training list's length of a usable file
    keys: dict[str, list[str]] = {d: [] for d in dirs}  # utterance keys per folder, for the overlap checks
    for d in dirs:
        root = data_path / d
        if not root.is_dir():
            report.add("missing_dir", str(root))
            continue
        utt_paths = []
        for path in _walk(root):
            rel = path.relative_to(root)
            report.files += 1
            if path.suffix == ".m4a":
                report.add("m4a", _shown(path, data_path))
            elif path.name.startswith(".") and path.suffix == ".tmp":  # io.atomic_path's temporary file
                report.add("leftover_tmp", _shown(path, data_path))
            elif path.suffix != ".wav":
                report.add("other_file", _shown(path, data_path))
            elif len(rel.parts) != _UTT_DEPTH:
                report.add("bad_layout", _shown(path, data_path))
            else:
                utt_paths.append(path)
                keys[d].append(rel.as_posix())
        if utt_paths:
            utts = lists[d] if lists and d in lists else load_utterances(data_path, d, sample_rate=sample_rate,
                                                                         progress=progress)
            usable = dict(zip(utts.keys, utts.frames.tolist()))
            wavs += [(path, usable.get(key)) for path, key in zip(utt_paths, keys[d])]

    speakers = set()
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(wavs), desc="check audio", disable=not progress, leave=False) as bar:
        for i in range(0, len(wavs), _CHUNK):
            chunk = wavs[i:i + _CHUNK]
            for (path, _), (found, seconds) in zip(chunk, pool.map(
                    lambda w: _inspect(*w, sample_rate, min_seconds), chunk)):
                for kind, detail in found:
                    report.add(kind, _shown(path, data_path) + (f": {detail}" if detail else ""))
                if all(kind in _WARNINGS for kind, _ in found):
                    report.utterances += 1
                    report.hours += seconds / 3600
                    speakers.add(path.parent.parent.name)
                bar.update()
    report.speakers = len(speakers)

    trial_dirs = [d for d in dirs if d.startswith("VoxCeleb1")] or dirs
    _overlaps(report, keys, train_dir, trial_dirs)
    roots = [data_path / d for d in trial_dirs]
    for path in list_paths:
        if not path.is_file():
            report.add("list_missing", str(path))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrialListWarning)
            try:
                read_trials(path, roots)  # format problems and files not on disk, in one message
            except TrialListError as err:
                report.add("list_invalid", str(err))
        for w in caught:
            if issubclass(w.category, TrialListWarning):
                report.add("list_warning", str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return report


def _overlaps(report: CheckReport, keys: dict[str, list[str]], train_dir: str, trial_dirs: list[str]) -> None:
    """Speakers of train_dir in another folder (test speakers seen in training), and keys under
    two of the folders trial lists resolve against (a trial would name either file)."""
    train = {k.split("/", 1)[0] for k in keys.get(train_dir, [])}
    for d in keys:
        if d != train_dir:
            for speaker in sorted(train & {k.split("/", 1)[0] for k in keys[d]}):
                report.add("speaker_leak", f"{shown_name(speaker)}: in {train_dir} and {d}")
    for i, first in enumerate(trial_dirs):
        seen = set(keys[first])
        for other in trial_dirs[i + 1:]:
            for key in sorted(seen.intersection(keys[other])):
                report.add("duplicate_key", f"{shown_name(key)}: in {first} and {other}")


def _shown(path: Path, data_path: Path) -> str:
    """A path as shown in the report: relative to data_path, which the header names (as given when outside it)."""
    return shown_name(path.relative_to(data_path).as_posix() if path.is_relative_to(data_path) else path)
