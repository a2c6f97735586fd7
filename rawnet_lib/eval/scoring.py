"""Trial scores from embeddings (cosine, adaptive s-norm), and the score files of a run."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from rawnet_lib.dataset.trials import TrialList
from rawnet_lib.errors import MissingPathError, WorkbookError
from rawnet_lib.io import atomic_open

__all__ = ["ScoreFileError", "cosine_scores", "asnorm_scores", "write_scores", "load_scores"]


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
    unit = np.stack([embeddings[k] for k in files], dtype=np.float32)  # one copy, not two
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    enroll, test = codes[:n], codes[n:]
    scores = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        scores[part] = np.einsum("ij,ij->i", unit[enroll[part]], unit[test[part]])
    return scores


def _unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def asnorm_scores(emb: Mapping[str, np.ndarray], trials: TrialList, cohort_emb: np.ndarray | Mapping[str, np.ndarray],
                  top_k: int = 100, chunk: int = 4096) -> np.ndarray:
    """Adaptive s-norm: 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t), where mu and sd of a side
    are the mean and (population) std of its top_k cosine scores against the cohort.

    top_k is capped at the cohort size (then this is plain s-norm); at least 2 are needed.
    """
    cohort = _unit(np.stack(list(cohort_emb.values())) if isinstance(cohort_emb, Mapping) else cohort_emb)
    k = min(top_k, len(cohort))
    if k < 2:
        raise ValueError(f"AS-norm needs top_k >= 2 cohort scores per side, got top_k={top_k} with a cohort of "
                         f"{len(cohort)}; raise asnorm_top_k / asnorm_cohort")
    files = trials.files()
    unit = _unit(np.stack([emb[f] for f in files]))
    mu, sd = np.empty(len(files)), np.empty(len(files))
    for start in range(0, len(files), chunk):  # (chunk x cohort) at a time: E has 145k files
        s = unit[start:start + chunk] @ cohort.T
        top = np.partition(s, len(cohort) - k, axis=1)[:, len(cohort) - k:].astype(np.float64)
        mu[start:start + chunk], sd[start:start + chunk] = top.mean(1), np.maximum(top.std(1), 1e-12)
    index = {f: i for i, f in enumerate(files)}
    e = np.fromiter((index[f] for f in trials.enroll), np.int64, len(trials))
    t = np.fromiter((index[f] for f in trials.test), np.int64, len(trials))
    raw = cosine_scores(emb, trials).astype(np.float64)
    return 0.5 * ((raw - mu[e]) / sd[e] + (raw - mu[t]) / sd[t])


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
    """A score file as columns score, label (1 = same speaker), and enroll, test when it has names."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep=" ", header=None, dtype={0: np.float64, 1: np.int8})
    except FileNotFoundError:
        raise MissingPathError(f"score file {path} does not exist; run notebooks/evaluate.ipynb first") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ScoreFileError(f"{path} is not a score file ({err}); expected lines `score target` or "
                         "`score target enroll test` as rawnet_lib.evaluate writes them") from None
    if frame.shape[1] not in (2, 4):
        raise ScoreFileError(f"{path} has {frame.shape[1]} columns; "
                             "expected `score target` or `score target enroll test`")
    frame.columns = ["score", "label", "enroll", "test"][:frame.shape[1]]
    return frame
