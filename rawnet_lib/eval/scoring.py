"""Trial scores from embeddings (cosine, adaptive s-norm), and the score files of a run."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from rawnet_lib.dataset.trials import TrialList
from rawnet_lib.errors import MissingPathError, WorkbookError
from rawnet_lib.io import atomic_open

__all__ = ["ScoreFileError", "unit", "cosine_scores", "asnorm_scores", "score_stem", "write_scores", "load_scores"]


class ScoreFileError(WorkbookError, ValueError):
    """A score file that cannot be read as `score target [enroll test]` lines; the message says why."""


def cosine_scores(embeddings: dict[str, np.ndarray], trials: TrialList, chunk: int = 1024) -> np.ndarray:
    """Cosine similarity of each trial's two embeddings.

    Embeddings are normalised once per file, then trials are scored in float32 chunks small
    enough for the gathered rows to stay in cache: a Vox1-E list (580k trials, 145k files)
    never holds two full trial-by-dim matrices. File names are indexed by pandas' hashing
    (a Python dict lookup per trial side took as long as the arithmetic).
    """
    n = len(trials)
    codes, files = pd.factorize(np.asarray(trials.enroll + trials.test, dtype=object))
    normed = np.stack([embeddings[k] for k in files], dtype=np.float32)  # one copy, not two (unit() makes two)
    normed /= np.maximum(np.linalg.norm(normed, axis=1, keepdims=True), 1e-12)
    enroll, test = codes[:n], codes[n:]
    scores = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        scores[part] = np.einsum("ij,ij->i", normed[enroll[part]], normed[test[part]])
    return scores


def unit(m: np.ndarray) -> np.ndarray:
    """Embeddings (rows, or one vector) scaled to length 1, in float32: their dot products are cosines."""
    m = np.asarray(m, dtype=np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def asnorm_scores(emb: Mapping[str, np.ndarray], trials: TrialList, cohort_emb: np.ndarray | Mapping[str, np.ndarray],
                  top_k: int = 100, chunk: int = 4096) -> np.ndarray:
    """Adaptive s-norm: 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t), where mu and sd of a side
    are the mean and (population) std of its top_k cosine scores against the cohort.

    top_k is capped at the cohort size (then this is plain s-norm); at least 2 are needed.
    """
    cohort = unit(np.stack(list(cohort_emb.values())) if isinstance(cohort_emb, Mapping) else cohort_emb)
    k = min(top_k, len(cohort))
    if k < 2:
        raise ValueError(f"AS-norm needs top_k >= 2 cohort scores per side, got top_k={top_k} with a cohort of "
                         f"{len(cohort)}; raise asnorm_top_k / asnorm_cohort")
    files = trials.files()
    normed = unit(np.stack([emb[f] for f in files]))
    mu, sd = np.empty(len(files)), np.empty(len(files))
    for start in range(0, len(files), chunk):  # (chunk x cohort) at a time: E has 145k files
        s = normed[start:start + chunk] @ cohort.T
        top = np.partition(s, len(cohort) - k, axis=1)[:, len(cohort) - k:].astype(np.float64)
        mu[start:start + chunk], sd[start:start + chunk] = top.mean(1), np.maximum(top.std(1), 1e-12)
    index = {f: i for i, f in enumerate(files)}
    e = np.fromiter((index[f] for f in trials.enroll), np.int64, len(trials))
    t = np.fromiter((index[f] for f in trials.test), np.int64, len(trials))
    raw = cosine_scores(emb, trials).astype(np.float64)
    return 0.5 * ((raw - mu[e]) / sd[e] + (raw - mu[t]) / sd[t])


def score_stem(tag: str, method: str) -> str:
    """The stem of a list's score files for one scoring (`scores_O`, `scores_O_asnorm`): evaluate
    writes `<stem>.txt` and `<stem>_names.txt`, the sweep reads them."""
    return f"scores_{tag}" + ("_asnorm" if method == "asnorm" else "")


def write_scores(path: Path, scores: np.ndarray, trials: TrialList, with_names: bool = False) -> None:
    """The reference's `score target` lines; with_names adds both files for analysis."""
    with atomic_open(path, "w") as f:
        if with_names:
            for s, y, a, b in zip(scores, trials.labels, trials.enroll, trials.test):
                f.write(f"{s:.6f} {int(y)} {a} {b}\n")
        else:
            for s, y in zip(scores, trials.labels):
                f.write(f"{s:.6f} {int(y)}\n")


def load_scores(path: str | Path) -> pd.DataFrame:
    """A score file as columns score, label (1 = same speaker), and enroll, test when it has names.

    Fields are split at any whitespace; every line has the first line's 2 or 4 fields, a finite
    score and a label 0 or 1, and the first line that does not is named with its number."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"score file {path} does not exist; run notebooks/evaluate.ipynb first")
    try:  # the fast reader; any doubt goes to the line-by-line one, which names the line
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype={0: np.float64, 1: np.int64})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        frame = None
    if (frame is None or frame.shape[1] not in (2, 4) or frame.isna().any().any()
            or not np.isfinite(frame[0]).all() or not frame[1].isin([0, 1]).all()):
        raise ScoreFileError(f"{_first_bad_line(path)}; expected lines `score label` or `score label enroll "
                             "test` (label 1 = same speaker, 0 = not) as rawnet_lib.evaluate writes them")
    frame.columns = ["score", "label", "enroll", "test"][:frame.shape[1]]
    frame["label"] = frame["label"].astype(np.int8)
    return frame


def _first_bad_line(path: Path) -> str:
    """`path:line: 'the line' is ...` of the first line the fast reader could not take."""
    width = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            width = width or len(tokens)
            try:
                score = float(tokens[0])
            except ValueError:
                score = np.nan
            why = ("has 2 or 4 fields, not " + str(len(tokens)) if len(tokens) not in (2, 4)
                   else f"has {len(tokens)} fields where the first line has {width}" if len(tokens) != width
                   else f"score {tokens[0]!r} is not a finite number" if not np.isfinite(score)
                   else f"label {tokens[1]!r} is not 0 or 1" if tokens[1] not in ("0", "1") else "")
            if why:
                return f"{path}:{number}: {line.strip()[:80]!r}: {why}"
    return f"{path}: no scores" if width is None else f"{path}: not a score file"
