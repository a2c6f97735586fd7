"""Trial scores from embeddings, and the score files of a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rawnet_lib.io import atomic_open
from rawnet_lib.trials import TrialList

__all__ = ["cosine_scores", "write_scores"]


def cosine_scores(embeddings: dict[str, np.ndarray], trials: TrialList, chunk: int = 16384) -> np.ndarray:
    """Cosine similarity of each trial's two embeddings.

    Embeddings are normalised once per file, then trials are scored in chunks in float32,
    so a Vox1-E list (580k trials, 145k files) never holds two full trial-by-dim matrices.
    """
    files = trials.files()
    index = {k: i for i, k in enumerate(files)}
    unit = np.stack([embeddings[k] for k in files]).astype(np.float32)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    enroll = np.fromiter((index[k] for k in trials.enroll), dtype=np.int64, count=len(trials))
    test = np.fromiter((index[k] for k in trials.test), dtype=np.int64, count=len(trials))
    scores = np.empty(len(trials), dtype=np.float32)
    for start in range(0, len(trials), chunk):
        part = slice(start, start + chunk)
        scores[part] = np.einsum("ij,ij->i", unit[enroll[part]], unit[test[part]])
    return scores


def write_scores(path: Path, scores: np.ndarray, trials: TrialList, with_names: bool = False) -> None:
    """The reference's `score target` lines; with_names adds both files for analysis."""
    with atomic_open(path, "w") as f:
        if with_names:
            for s, y, a, b in zip(scores, trials.labels, trials.enroll, trials.test):
                f.write(f"{s:.6f} {int(y)} {a} {b}\n")
        else:
            for s, y in zip(scores, trials.labels):
                f.write(f"{s:.6f} {int(y)}\n")
