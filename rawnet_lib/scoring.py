"""Trial scores from embeddings, and the score files of a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rawnet_lib.io import atomic_open
from rawnet_lib.trials import TrialList

__all__ = ["cosine_scores", "write_scores"]


def _unit(embeddings: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    m = np.stack([embeddings[k] for k in keys]).astype(np.float64)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def cosine_scores(embeddings: dict[str, np.ndarray], trials: TrialList) -> np.ndarray:
    """Cosine similarity of each trial's two embeddings (one matrix lookup per side)."""
    files = trials.files()
    index = {k: i for i, k in enumerate(files)}
    unit = _unit(embeddings, files)
    e = unit[[index[k] for k in trials.enroll]]
    t = unit[[index[k] for k in trials.test]]
    return np.einsum("ij,ij->i", e, t)


def write_scores(path: Path, scores: np.ndarray, trials: TrialList, with_names: bool = False) -> None:
    """The reference's `score target` lines; with_names adds both files for analysis."""
    with atomic_open(path, "w") as f:
        if with_names:
            for s, y, a, b in zip(scores, trials.labels, trials.enroll, trials.test):
                f.write(f"{s:.6f} {int(y)} {a} {b}\n")
        else:
            for s, y in zip(scores, trials.labels):
                f.write(f"{s:.6f} {int(y)}\n")
