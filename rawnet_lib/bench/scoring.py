"""Scoring at Vox1-E size: cosine scores and metrics of a 580,000-trial list, and the memory of
gathering its embeddings from 8 gloo ranks (to every rank before, to rank 0 now)."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rawnet_lib.bench.common import alternate, record, reset_peak, status_kib

__all__ = ["bench_score", "bench_gather", "synthetic_vox1e"]


def bench_score(n_trials: int = 580_000, n_files: int = 145_000, dim: int = 1024, repeats: int = 3,
                seed: int = 0) -> list[dict[str, Any]]:
    """Seconds to score a Vox1-E-sized trial list: cosine scores from embeddings, then EER + minDCF."""
    from rawnet_lib.eval.metrics import summarize
    from rawnet_lib.eval.scoring import cosine_scores
    keys, emb, trials = synthetic_vox1e(n_files, dim, n_trials, seed=seed)
    embeddings = dict(zip(keys, emb))
    result: dict[str, Any] = {}

    def cosine() -> None:
        result["scores"] = cosine_scores(embeddings, trials)

    def metrics() -> None:
        result["summary"] = summarize(result["scores"], trials.labels)
    cosine()
    times = alternate({"cosine": cosine, "metrics": metrics}, repeats, warmup=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [record("score", path="-", trials=n_trials, files=n_files, dim=dim,
                    cosine_s=round(med["cosine"], 3), metrics_s=round(med["metrics"], 3),
                    seconds=round(med["cosine"] + med["metrics"], 3),
                    eer_percent=round(result["summary"]["eer_percent"], 3))]


def synthetic_vox1e(n_files: int, dim: int, n_trials: int, rows: slice = slice(None), seed: int = 0):
    """(keys, embeddings of `rows`, trial list) shaped like Vox1-E: 20 files per speaker, half
    the trials target; each part of the rows can be made on its own (one rank's share)."""
    from rawnet_lib.dataset.trials import TrialList
    rng = np.random.default_rng(seed)
    keys = [f"id{i // 20:05d}/v/{i:06d}.wav" for i in range(n_files)]
    speaker = np.arange(n_files) // 20
    centres = rng.standard_normal((speaker[-1] + 1, dim), dtype=np.float32)
    start, stop, _ = rows.indices(n_files)
    noise = np.random.default_rng([seed, start]).standard_normal((stop - start, dim), dtype=np.float32)
    emb = centres[speaker[start:stop]] + 2 * noise
    enroll = rng.integers(0, n_files, n_trials)
    same = np.minimum(enroll - enroll % 20 + rng.integers(0, 20, n_trials), n_files - 1)
    test = np.where(rng.random(n_trials) < 0.5, same, rng.integers(0, n_files, n_trials))
    labels = (speaker[enroll] == speaker[test]).astype(np.int8)
    return keys, emb, TrialList(labels, [keys[i] for i in enroll], [keys[i] for i in test])


def _gather_child(rank: int, world: int, store: str, method: str, n_files: int, dim: int, n_trials: int,
                  out: str) -> None:
    """One gloo rank: hold its share of the embeddings, gather them by `method`, rank 0 scores."""
    import torch.distributed as torch_dist

    from rawnet_lib import dist
    from rawnet_lib.eval.metrics import eer
    from rawnet_lib.eval.scoring import cosine_scores
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = dist.RankInfo(rank, world, torch.device("cpu"))
    part = dist.share(n_files, info)
    keys, mine, trials = synthetic_vox1e(n_files, dim, n_trials if rank == 0 else 1, part)
    before = status_kib("VmRSS") / 1024
    reset_peak()
    t0 = time.perf_counter()
    if method == "all_gather_object":  # what validation and evaluation did before: everything everywhere
        parts: list[Any] = [None] * world
        torch_dist.all_gather_object(parts, dict(zip(keys[part], mine)))
        merged = {k: v for p in parts for k, v in p.items()}
    else:
        rows = dist.gather_rows(mine, n_files, info)
        merged = {} if rows is None else dict(zip(keys, rows))
    gathered_s = time.perf_counter() - t0
    result = eer(cosine_scores(merged, trials), trials.labels) if rank == 0 else None
    torch_dist.barrier()
    Path(out, f"{method}_{rank}.json").write_text(json.dumps({
        "rank": rank, "rss_before_mib": round(before, 1), "peak_rss_mib": round(status_kib("VmHWM") / 1024, 1),
        "gather_s": round(gathered_s, 3), "seconds": round(time.perf_counter() - t0, 3), "eer": result}))
    torch_dist.destroy_process_group()


def bench_gather(n_files: int = 145_000, dim: int = 1024, n_trials: int = 580_000, ranks: int = 8,
                 methods: tuple[str, ...] = ("all_gather_object", "to_main")) -> list[dict[str, Any]]:
    """Peak RSS per rank when `ranks` gloo processes gather Vox1-E-sized embeddings and rank 0
    scores the trial list: every rank receiving everything (before) against rank 0 only (now).
    peak_rss_mib is each rank's high-water mark from its share in hand to the EER (the start-up
    and its own share are in rss_before_mib)."""
    import torch.multiprocessing as mp
    out = []
    with tempfile.TemporaryDirectory(prefix="rawnet_gather_") as tmp:
        for method in methods:
            mp.spawn(_gather_child, args=(ranks, f"{tmp}/{method}.store", method, n_files, dim, n_trials, tmp),
                     nprocs=ranks)
            rows = [json.loads(Path(tmp, f"{method}_{r}.json").read_text()) for r in range(ranks)]
            others = [r["peak_rss_mib"] for r in rows[1:]]
            out.append(record("gather", path=method, ranks=ranks, files=n_files, dim=dim, trials=n_trials,
                               peak_rss_mib=rows[0]["peak_rss_mib"], rss_before_mib=rows[0]["rss_before_mib"],
                               peak_rss_other_ranks_mib=max(others, default=None),
                               rss_before_other_ranks_mib=max((r["rss_before_mib"] for r in rows[1:]), default=None),
                               gather_s=rows[0]["gather_s"], seconds=rows[0]["seconds"],
                               eer_percent=round(100 * rows[0]["eer"], 3)))
    return out
