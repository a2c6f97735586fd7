"""Verification trial lists: reading, checking, writing and making them.

A list has one trial per line, ``label enroll test`` separated by whitespace, label 1 = same
speaker, keys relative to a wav root (``spk/video/utt.wav``). Vox1-E/H keys may live in
``dev_wav`` or ``eval_wav``, so a key resolves against a list of roots. Reading reports every
problem of a file at once (files not on disk included, when given the roots), because fixing
a downloaded list one error per run is slow and a bad list gives a wrong EER; a 580k-line list
costs one split of the whole text plus numpy. A UTF-8 byte order mark (Windows editors write
one) is stripped with a :class:`TrialListWarning`, not reported as a bad label.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from rawnet_lib.config import input_path
from rawnet_lib.errors import WorkbookError
from rawnet_lib.io import atomic_write_text, file_sha1

__all__ = ["OFFICIAL_LISTS", "TrialListError", "TrialListWarning", "TrialList", "PairCountError", "official_list_path",
           "read_trials", "write_trials", "find_file", "resolve", "make_trials", "speaker_of"]

OFFICIAL_LISTS: dict[str, str] = {
    "O": "veri_test.txt", "O2": "veri_test2.txt",
    "E": "list_test_all.txt", "E2": "list_test_all2.txt",
    "H": "list_test_hard.txt", "H2": "list_test_hard2.txt",
}
_FORMAT = "each line must be `label enroll test` (whitespace separated), label 1 = same speaker, 0 = different"
_FIXES = {
    "wrong field count": _FORMAT,
    "label not 0/1": "use 1 for a same-speaker trial and 0 otherwise (not target/nontarget or scores)",
    "duplicate trial": "keep each pair once (a pair repeated in either order counts twice in the EER)",
    "same file on both sides": "remove trials that compare a file with itself",
    "label disagrees with speaker ids": "the speaker id is the first path component; fix the label or the paths",
    "empty list": _FORMAT,
    "one class only": "EER, minDCF and calibration need same-speaker (1) and different-speaker (0) trials: "
                      "add the other kind",
    "file not on disk": "keys resolve against the VoxCeleb1 folders (Vox1-E/H need both dev_wav and eval_wav): "
                        "add the missing folder, check data_path, or use the list that matches the data",
}
_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # little- and big-endian
_SHOWN = 5  # offending lines quoted per problem kind


class TrialListError(WorkbookError, ValueError):
    """A trial list that cannot be used; the message names the file, every problem and the fix."""


class TrialListWarning(UserWarning):
    """Something in a trial list that reading fixed (a byte order mark); the list is usable."""


def speaker_of(key: str) -> str:
    """Speaker id of a key ``spk/video/utt.wav``: its first path component."""
    return key.split("/", 1)[0]


@dataclass
class TrialList:
    """Trials as parallel columns; ``labels`` is int8 with 1 = same speaker."""
    labels: np.ndarray
    enroll: list[str]
    test: list[str]
    path: Path | None = None
    sha1: str = ""  # of the file's bytes: results carry it, so results of an older list are told apart

    def __len__(self) -> int:
        return len(self.labels)

    def files(self) -> list[str]:
        """Every key on either side, sorted and unique: what must be embedded."""
        return sorted(set(self.enroll).union(self.test))

    def speakers(self) -> list[str]:
        return sorted({speaker_of(k) for k in self.files()})


def official_list_path(data_path: Path, name: str) -> Path:
    """Path of an official list by its short name (``O``, ``E2`` ...), or ``name`` itself when it is a .txt path."""
    if name in OFFICIAL_LISTS:
        return Path(data_path) / "VoxCeleb1" / OFFICIAL_LISTS[name]
    if str(name).endswith(".txt"):
        return input_path(name)
    raise ValueError(f"unknown trial list {name!r}; give one of {', '.join(OFFICIAL_LISTS)} "
                     "(files in <data_path>/VoxCeleb1/) or a path to a .txt list")


def list_tag(name: str) -> str:
    """How results name a list: ``O``, ``E2`` ... or a .txt list's file stem."""
    return Path(name).stem if str(name).endswith(".txt") else name


class _Problems:
    """Problem kinds of one file in first-seen order, each with a count and the first offending lines."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text
        self.counts: dict[str, int] = {}
        self.shown: dict[str, list[str]] = {}

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")  # only split when a line has to be quoted

    def add(self, kind: str, line_idx: np.ndarray, note: list[str] | None = None) -> None:
        """Record lines (0-based indices into the file) showing problem `kind`."""
        if len(line_idx) == 0:
            return
        self.counts[kind] = self.counts.get(kind, 0) + len(line_idx)
        shown = self.shown.setdefault(kind, [])
        for n, i in enumerate(line_idx[:_SHOWN - len(shown)]):
            text = self.lines[i] if len(self.lines[i]) <= 120 else self.lines[i][:117] + "..."
            shown.append(f"line {i + 1}: {text!r}" + (f" ({note[n]})" if note else ""))

    def flag(self, kind: str) -> None:
        """Record a problem of the whole file rather than of some lines."""
        self.counts[kind] = 1
        self.shown[kind] = []

    def raise_any(self) -> None:
        if not self.counts:
            return
        out = [f"trial list {self.path} is not usable ({sum(self.counts.values())} problem(s)):"]
        for kind, count in self.counts.items():
            out.append(f"  {kind}: {count} line(s)" if self.shown[kind] else f"  {kind}")
            out += [f"    {s}" for s in self.shown[kind]]
            out.append(f"    fix: {_FIXES[kind]}")
        raise TrialListError("\n".join(out))


def _read_text(path: Path) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TrialListError(f"trial list {path} not found; official lists go in <data_path>/VoxCeleb1/ "
                             f"({', '.join(OFFICIAL_LISTS.values())}), or check the path") from None
    except OSError as err:
        raise TrialListError(f"trial list {path} cannot be read ({err}); give a readable text file") from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
        warnings.warn(TrialListWarning(
            f"trial list {path} starts with a UTF-8 byte order mark; it was stripped and the list read as usual "
            f"(to remove it from the file: sed -i '1s/^\\xEF\\xBB\\xBF//' '{path}')"), stacklevel=3)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TrialListError(_not_utf8(path, data, err)) from None
    if "\0" in text:
        raise TrialListError(f"trial list {path} is binary (holds NUL bytes), not a text list; {_FORMAT}")
    return data, text


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError) -> str:
    """What is wrong with a list that is not UTF-8, by line as every other problem, with the fix."""
    if data[:2] in _UTF16_BOMS:
        return (f"trial list {path} is UTF-16 text (it starts with the byte order mark {data[:2].hex(' ').upper()}); "
                f"convert it: iconv -f UTF-16 -t UTF-8 '{path}' > utf8.txt, then use utf8.txt")
    start = data.rfind(b"\n", 0, err.start) + 1
    end = data.find(b"\n", err.start)
    line = data[start:end if end >= 0 else len(data)].decode("utf-8", "backslashreplace")
    number = data.count(b"\n", 0, err.start) + 1
    return (f"trial list {path} is not UTF-8 text: line {number}: {line!r} "
            f"({err.reason}); save it as UTF-8 (iconv -f <its encoding, e.g. latin1> -t UTF-8 '{path}' > utf8.txt), "
            f"a text file where {_FORMAT}")


_ASCII_SPACE = np.zeros(256, bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # the ASCII bytes str.split() splits on


def _fields_per_line(data: bytes, text: str, n_tokens: int) -> np.ndarray:
    """Whitespace-separated fields per line, counted in numpy rather than line by line."""
    if not data:
        return np.zeros(1, np.int64)
    b = np.frombuffer(data, np.uint8)
    space = _ASCII_SPACE[b]
    starts = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
    newlines = np.flatnonzero(b == 10)
    counts = np.bincount(np.searchsorted(newlines, starts), minlength=len(newlines) + 1)
    if counts.sum() != n_tokens:  # non-ASCII whitespace (U+00A0 ...) splits too: count per line
        counts = np.array([len(line.split()) for line in text.split("\n")])
    return counts


def _codes(keys: list[str], index: dict[str, int]) -> np.ndarray:
    """Integer id per key (shared `index` across calls), so pair checks run in numpy."""
    return np.fromiter((index.setdefault(k, len(index)) for k in keys), np.int64, len(keys))


def read_trials(path: str | Path, roots: Sequence[Path] | None = None) -> TrialList:
    """Parse a trial list, raising one TrialListError that lists every problem in it; with `roots`,
    lines whose files no root holds are among the problems."""
    path = Path(path)
    data, text = _read_text(path)
    problems = _Problems(path, text)
    tokens = text.split()
    counts = _fields_per_line(data, text, len(tokens))
    line_of = np.flatnonzero(counts == 3)
    problems.add("wrong field count", np.flatnonzero((counts != 0) & (counts != 3)))
    if len(line_of) == 0:
        if not problems.counts:
            problems.flag("empty list")
        problems.raise_any()
    if len(line_of) * 3 != len(tokens):  # keep the tokens of the 3-field lines only
        first = (np.cumsum(counts) - counts)[line_of]
        tokens = np.array(tokens, dtype=object)[np.stack([first, first + 1, first + 2], 1).ravel()].tolist()
    label_a, enroll, test = np.asarray(tokens[0::3]), tokens[1::3], tokens[2::3]
    is_one, is_zero = label_a == "1", label_a == "0"
    problems.add("label not 0/1", line_of[~(is_one | is_zero)])
    if is_one.all() or is_zero.all():
        problems.flag("one class only")

    index: dict[str, int] = {}
    e, t = _codes(enroll, index), _codes(test, index)
    lo, hi = np.minimum(e, t), np.maximum(e, t)
    _, first, inverse = np.unique(lo * len(index) + hi, return_index=True, return_inverse=True)
    dup = np.flatnonzero(first[inverse] != np.arange(len(e)))
    repeats = [f"repeats line {line_of[first[inverse[d]]] + 1}" for d in dup[:_SHOWN]]
    problems.add("duplicate trial", line_of[dup], repeats)
    problems.add("same file on both sides", line_of[e == t])

    # Speaker check only where both keys have a folder: bare file names carry no speaker id.
    spk_index: dict[str, int] = {}
    spk = np.array([spk_index.setdefault(speaker_of(k), len(spk_index)) if "/" in k else -1 for k in index])
    se, st = spk[e], spk[t]
    known = (se >= 0) & (st >= 0) & (is_one | is_zero)
    problems.add("label disagrees with speaker ids", line_of[known & ((se == st) != is_one)])
    if roots is not None:
        on_disk = np.fromiter((find_file(k, roots) is not None for k in index), bool, len(index))
        lost_e, lost_t = ~on_disk[e], ~on_disk[t]
        lost = np.flatnonzero(lost_e | lost_t)
        notes = [" and ".join(k for k, gone in ((enroll[i], lost_e[i]), (test[i], lost_t[i])) if gone) + " not found"
                 for i in lost[:_SHOWN]]
        problems.add("file not on disk", line_of[lost], notes)
    problems.raise_any()
    return TrialList(is_one.astype(np.int8), enroll, test, path, file_sha1(path))


def write_trials(path: str | Path, trials: TrialList) -> None:
    """Write `trials` atomically in the official ``label enroll test`` format."""
    _check_keys(trials.enroll + trials.test)
    lines = [f"{int(y)} {a} {b}\n" for y, a, b in zip(trials.labels, trials.enroll, trials.test)]
    atomic_write_text(path, "".join(lines))


def _check_keys(keys: list[str]) -> None:
    bad = [k for k in keys if not k or k.split() != [k]]
    if bad:
        raise ValueError(f"{len(bad)} key(s) are empty or hold whitespace, e.g. {bad[0]!r}; a trial list is "
                         "whitespace separated, so rename those files (or leave them out)")


def find_file(key: str | Path, roots: Sequence[Path]) -> Path | None:
    """The file `key` under the first root that holds it (an absolute key is itself), or None."""
    for root in roots:
        candidate = Path(root) / key
        if candidate.is_file():
            return candidate
    return None


def resolve(key: str, roots: list[Path]) -> Path:
    """The file of `key` under the first root that holds it."""
    found = find_file(key, roots)
    if found is None:
        raise FileNotFoundError(f"trial file {key} is in none of the roots {', '.join(map(str, roots))}; "
                                "check data_path and that VoxCeleb1 dev_wav and eval_wav are both present")
    return found


def _sample_pairs(lo: np.ndarray, hi: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k distinct pairs (i, j), uniform over the pool where item i pairs with every j in [lo[i], hi[i])."""
    counts = np.maximum(hi - lo, 0)
    ends = np.cumsum(counts)
    flat = rng.choice(int(ends[-1]), size=k, replace=False)
    i = np.searchsorted(ends, flat, side="right")
    return i, lo[i] + flat - (ends[i] - counts[i])


class PairCountError(ValueError):
    """More pairs (or fewer than one) asked of make_trials than its keys give; `most` is the largest count."""

    def __init__(self, message: str, most: int) -> None:
        super().__init__(message)
        self.most = most


def make_trials(keys: list[str], n_pairs: int, seed: int) -> TrialList:
    """A shuffled validation list from held-out keys: n_pairs // 2 targets, the rest non-targets.

    Targets come from different videos of a speaker first (a same-video pair is too easy),
    then from the same video only when needed. Pairs are drawn without replacement, so
    there are no duplicates; the result depends only on the key set and `seed`. Asking for
    more pairs than the keys allow raises, naming the maximum (no silent cap).
    """
    _check_keys(keys)
    parts = sorted({tuple(k.split("/")) for k in keys})
    flat_keys = ["/".join(p) for p in parts]
    bad = [k for k, p in zip(flat_keys, parts) if len(p) != 3]
    if bad:
        raise ValueError(f"{len(bad)} key(s) are not spk/video/utt.wav, e.g. {bad[0]!r}; give keys relative "
                         "to a wav root, such as the keys of an UtteranceList")
    n = len(parts)
    spk = [p[0] for p in parts]
    vid = [p[:2] for p in parts]
    # Keys are sorted, so each speaker (and each video within it) is one contiguous block.
    spk_end = _block_ends(spk)
    vid_end = _block_ends(vid)
    idx = np.arange(n)
    pools = {
        "cross": (vid_end, spk_end),  # same speaker, later video
        "same": (idx + 1, vid_end),  # same video
        "non": (spk_end, np.full(n, n)),  # later speaker
    }
    sizes = {name: int(np.maximum(h - l, 0).sum()) for name, (l, h) in pools.items()}
    n_spk = len(set(spk))
    if n_spk < 2 or sizes["cross"] + sizes["same"] == 0:
        raise ValueError(f"need at least 2 speakers and one speaker with 2 utterances to make trials, got "
                         f"{n_spk} speaker(s) and {n} utterance(s); hold out more utterances")
    n_target, n_non = n_pairs // 2, n_pairs - n_pairs // 2
    most = min(2 * (sizes["cross"] + sizes["same"]) + 1, 2 * sizes["non"])
    if n_pairs < 2 or n_pairs > most:  # one pair would be one class: no EER
        raise PairCountError(f"n_pairs={n_pairs}, but these {n} utterances of {n_spk} speakers give 2 to {most} "
                             f"balanced pairs ({sizes['cross'] + sizes['same']} target, {sizes['non']} non-target); "
                             "lower n_pairs or hold out more utterances", most)
    rng = np.random.default_rng(seed)
    n_cross = min(n_target, sizes["cross"])
    drawn = [_sample_pairs(*pools["cross"], n_cross, rng), _sample_pairs(*pools["same"], n_target - n_cross, rng),
             _sample_pairs(*pools["non"], n_non, rng)]
    first = np.concatenate([d[0] for d in drawn])
    second = np.concatenate([d[1] for d in drawn])
    labels = np.concatenate([np.ones(n_target, np.int8), np.zeros(n_non, np.int8)])
    swap = rng.random(len(labels)) < 0.5  # either side may come first, as in the official lists
    first, second = np.where(swap, second, first), np.where(swap, first, second)
    order = rng.permutation(len(labels))
    return TrialList(labels[order], [flat_keys[i] for i in first[order]], [flat_keys[i] for i in second[order]])


def _block_ends(groups: list) -> np.ndarray:
    """For each position of a sorted list, the end (exclusive) of its run of equal values."""
    ends = np.empty(len(groups), np.int64)
    end = len(groups)
    for i in range(len(groups) - 1, -1, -1):
        if i + 1 < len(groups) and groups[i] != groups[i + 1]:
            end = i + 1
        ends[i] = end
    return ends
