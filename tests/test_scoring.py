"""Cosine and AS-norm trial scores, and the score files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rawnet_lib.dataset.trials import TrialList
from rawnet_lib.eval.scoring import asnorm_scores, cosine_scores, write_scores


def _trials(rng: np.random.Generator, keys: list[str], n: int) -> TrialList:
    e, t = rng.integers(0, len(keys), n), rng.integers(0, len(keys), n)
    return TrialList(rng.integers(0, 2, n).astype(np.int8), [keys[i] for i in e], [keys[i] for i in t])


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_cosine_matches_the_definition_across_chunk_boundaries(chunk: int) -> None:
    rng = np.random.default_rng(0)
    keys = [f"id{i:05d}/v/{i:05d}.wav" for i in range(50)]
    emb = {k: rng.standard_normal(16) * rng.uniform(0.1, 10) for k in keys}  # unnormalised, float64
    trials = _trials(rng, keys, 333)
    want = [np.dot(emb[a], emb[b]) / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b])
            for a, b in zip(trials.enroll, trials.test)]
    got = cosine_scores(emb, trials, chunk=chunk)
    assert got.dtype == np.float32 and got.shape == (333,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zero_embedding_scores_zero_not_nan() -> None:
    emb = {"a/v/1.wav": np.zeros(4), "b/v/2.wav": np.ones(4)}
    trials = TrialList(np.array([0, 1], np.int8), ["a/v/1.wav", "b/v/2.wav"], ["b/v/2.wav", "b/v/2.wav"])
    np.testing.assert_allclose(cosine_scores(emb, trials), [0.0, 1.0], atol=1e-6)


def test_missing_embedding_names_the_file() -> None:
    trials = TrialList(np.array([1], np.int8), ["a/v/1.wav"], ["b/v/2.wav"])
    with pytest.raises(KeyError, match="b/v/2.wav"):
        cosine_scores({"a/v/1.wav": np.ones(3)}, trials)


def test_score_files_in_the_reference_format(tmp_path: Path) -> None:
    trials = TrialList(np.array([1, 0], np.int8), ["a/v/1.wav", "a/v/1.wav"], ["a/v/2.wav", "b/v/3.wav"])
    scores = np.array([0.5, -0.25], np.float32)
    write_scores(tmp_path / "s.txt", scores, trials)
    write_scores(tmp_path / "n.txt", scores, trials, with_names=True)
    assert (tmp_path / "s.txt").read_text() == "0.500000 1\n-0.250000 0\n"
    assert (tmp_path / "n.txt").read_text() == "0.500000 1 a/v/1.wav a/v/2.wav\n-0.250000 0 a/v/1.wav b/v/3.wav\n"


# -- AS-norm -------------------------------------------------------------------------------------
def _random_setup(seed: int = 0, n_files: int = 12, dim: int = 8, n_cohort: int = 15):
    rng = np.random.default_rng(seed)
    keys = [f"s{i % 4}/v/{i}.wav" for i in range(n_files)]
    emb = dict(zip(keys, rng.standard_normal((n_files, dim))))
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    trials = TrialList(np.array([a[:2] == b[:2] for a, b in pairs], np.int8), [a for a, _ in pairs],
                       [b for _, b in pairs])
    return emb, trials, rng.standard_normal((n_cohort, dim))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_asnorm_matches_its_definition() -> None:
    emb, trials, cohort = _random_setup()
    top_k = 5
    got = asnorm_scores(emb, trials, cohort, top_k)

    def stats(x: np.ndarray) -> tuple[float, float]:
        top = np.sort(_unit(cohort) @ _unit(x))[-top_k:]
        return top.mean(), top.std()

    for i, (a, b) in enumerate(zip(trials.enroll, trials.test)):
        s = float(_unit(emb[a]) @ _unit(emb[b]))
        (mu_e, sd_e), (mu_t, sd_t) = stats(emb[a]), stats(emb[b])
        assert got[i] == pytest.approx(0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t), rel=1e-4, abs=1e-4)


def test_asnorm_is_symmetric_and_invariant_to_scale_and_cohort_order() -> None:
    emb, trials, cohort = _random_setup(1)
    base = asnorm_scores(emb, trials, cohort, 6)
    swapped = TrialList(trials.labels, trials.test, trials.enroll)
    scaled = {k: 3.5 * v for k, v in emb.items()}
    order = np.random.default_rng(2).permutation(len(cohort))
    np.testing.assert_allclose(asnorm_scores(emb, swapped, cohort, 6), base, rtol=1e-6)
    np.testing.assert_allclose(asnorm_scores(scaled, trials, 0.1 * cohort[order], 6), base, rtol=1e-4, atol=1e-5)
    # A cohort mapping works like the array, and top_k beyond the cohort means all of it (plain s-norm).
    as_map = {str(i): c for i, c in enumerate(cohort)}
    np.testing.assert_allclose(asnorm_scores(emb, trials, as_map, 1000),
                               asnorm_scores(emb, trials, cohort, len(cohort)), rtol=1e-6)
    with pytest.raises(ValueError, match="top_k=1"):
        asnorm_scores(emb, trials, cohort, 1)
