"""Evaluate a checkpoint on VoxCeleb1 trial lists: EER and minDCF per list, score files, a metrics table.

    python -m rawnet_lib.evaluate --checkpoint outputs/train/train_1P/DNNS/demo/models/best_opt_eval.pt
    python -m rawnet_lib.evaluate --checkpoint outputs/train/train_1P/DNNS/demo --pick avg_last10
    torchrun --standalone --nproc_per_node=8 -m rawnet_lib.evaluate --trial_lists O E H --device cuda

Any config field is a flag (`--data_path /data/DB --crop_mode full`); left out, it keeps the checkpoint's.

Every rank embeds a share of the files (`embed_files`); rank 0 alone scores and writes. Embeddings
are cached on disk per checkpoint and embedding settings, so O, E and H share one extraction and
a second evaluation of the same checkpoint embeds nothing. Results go to `<run>/eval/<checkpoint
stem>/` (`outputs/eval/<stem>/` for a checkpoint outside a run folder):

    scores_<list>[_asnorm].txt        "score target" per trial (the reference's results format)
    scores_<list>[_asnorm]_names.txt  "score target enroll test", for analysis
    metrics.csv, metrics.json         one row per list and scoring method, gathered over calls
                                      with the same checkpoint and settings (others need --overwrite);
                                      each row names its list file and SHA-1, and a row whose file has
                                      changed since is dropped with a warning
    cache/embeddings_<settings>.npz   the embedding cache
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rawnet_lib import dist
from rawnet_lib.config import Config, ConfigError, cli_config, cli_parser, with_overrides
from rawnet_lib.dataset.trials import TrialList, list_tag, official_list_path, read_trials
from rawnet_lib.dataset.utterances import load_utterances, resolve_data_path
from rawnet_lib.errors import run_cli
from rawnet_lib.eval.embed import cached_embeddings, embedding_settings, weights_fingerprint
from rawnet_lib.eval.metrics import summarize
from rawnet_lib.eval.scoring import asnorm_scores, cosine_scores, score_stem, write_scores
from rawnet_lib.io import atomic_open, atomic_write_text, file_sha1
from rawnet_lib.models.checkpoint import carries_config, checkpoint_model, load_checkpoint_model, read_checkpoint
from rawnet_lib.training.run import (CHECKPOINT_CHOICES, RunExistsError, check_checkpoint_choice, default_out_dir,
                                     resolve_checkpoint, run_checkpoint)

__all__ = ["cohort_embeddings", "evaluate", "main"]


def cohort_embeddings(model: torch.nn.Module, checkpoint_path: str | Path, cfg: Config, data_path: Path,
                      rank: dist.RankInfo, cache_dir: str | Path = "cache", progress: bool = True,
                      fingerprint: str | None = None) -> np.ndarray:
    """AS-norm cohort (n, dim): embeddings of `asnorm_cohort` training utterances drawn with the
    run's seed, one per utterance (not per-speaker means), so the cohort spans many speakers
    and channels at the cost of one embedding each."""
    root = data_path / cfg.data.train_dir
    if not root.is_dir():
        raise ConfigError(f"asnorm: true needs training utterances for its cohort, but {root} does not exist; "
                          "point data_path at a folder with VoxCeleb2/wav or set asnorm: false")
    utts = load_utterances(data_path, cfg.data.train_dir, sample_rate=cfg.model.sample_rate, progress=False)
    rng = np.random.default_rng(cfg.train.seed)
    pick = np.sort(rng.choice(len(utts), size=min(cfg.evaluation.asnorm_cohort, len(utts)), replace=False))
    keys = [utts.keys[i] for i in pick]
    emb = cached_embeddings(model, checkpoint_path, keys, [root], cfg, rank, cache_dir, progress, fingerprint)
    return np.array([emb[k] for k in keys if k in emb])  # complete on rank 0, which scores


# -- evaluation ----------------------------------------------------------------------------------
def evaluation_identity(checkpoint: Path, cfg: Config, roots: Sequence[Path], bare: bool = False) -> dict[str, Any]:
    """What an evaluation's results depend on besides the lists: the weights (with the model
    settings of a `bare` state_dict) and the scoring settings (written into metrics.json; results
    are extended or reused only under the same identity)."""
    ev = cfg.evaluation
    return {"fingerprint": weights_fingerprint(checkpoint, cfg.model if bare else None),
            **embedding_settings(cfg, roots),
            "asnorm": [ev.asnorm_cohort, ev.asnorm_top_k, cfg.train.seed] if ev.asnorm else None}


def identity_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The names of the identity fields that differ (all of them for an unreadable one)."""
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)) or ["unreadable"]


def _earlier_rows(out: Path, identity: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """The metrics rows of an earlier evaluation in `out` that this one extends.

    Same checkpoint and settings: its rows are kept, a list scored again replaces its row, and a
    row whose list file has changed since is dropped (each row names the file and its SHA-1).
    Anything else would silently mix or replace results, so it needs `overwrite`.
    """
    path = out / "metrics.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("identity") == identity:
        rows = list(old.get("metrics", []))
        stale = sorted({r["list"] for r in rows if not _list_unchanged(r)})
        if stale:
            warnings.warn(f"{out}: dropped the results of list(s) {', '.join(stale)}: their files changed since "
                          f"they were scored; score them again with --lists {' '.join(stale)}", stacklevel=3)
        return [r for r in rows if r["list"] not in stale]
    if overwrite:
        return []
    changed = identity_changes(old.get("identity") or {}, identity)
    raise RunExistsError(f"{out} already holds results of another checkpoint or other evaluation settings "
                         f"(differing: {', '.join(changed)}); give another out_dir (--out_dir) to keep both, "
                         "or overwrite=True (--overwrite) to replace them")


def _list_file(row: dict[str, Any]) -> Path | None:
    """The list file a metrics row scored; None for rows written before rows named it (NaN beside newer ones)."""
    name = row.get("list_file")
    return Path(name) if isinstance(name, str) else None


def _list_unchanged(row: dict[str, Any]) -> bool:
    """Whether a metrics row's list file still holds what it scored (rows that name no file, or a
    file since removed, cannot be checked and are kept)."""
    path = _list_file(row)
    return path is None or not path.is_file() or file_sha1(path) == row.get("list_sha1")


def _trial_lists(data_path: Path, names: Sequence[str], earlier: list[dict[str, Any]],
                 overwrite: bool, roots: Sequence[Path]) -> dict[str, TrialList]:
    """{tag: list} for `names`, refusing two files that results would name alike (O and a my/O.txt),
    in this call or beside the `earlier` rows of the same out_dir, and lines whose audio no root
    holds (every such line of a list in one error, before anything is embedded)."""
    paths: dict[str, Path] = {}
    for row in earlier if not overwrite else []:
        path = _list_file(row)
        if path is not None:
            paths.setdefault(row["list"], path)
    mine: dict[str, Path] = {}
    for name in names:
        tag, path = list_tag(name), official_list_path(data_path, name).resolve()
        if paths.setdefault(tag, path) != path:
            raise ConfigError(f"trial lists {paths[tag]} and {path} would both be reported as {tag!r} in one "
                              "metrics table; rename one of the files, or score it into another out_dir")
        mine[tag] = path
    return {tag: read_trials(path, roots) for tag, path in mine.items()}


def evaluate(checkpoint: str | Path | None = None, cfg: Config | None = None, lists: Sequence[str] | None = None,
             out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, overwrite: bool = False, pick: str = "best") -> pd.DataFrame:
    """Score `lists` (default: cfg's trial_lists) with cosine (and AS-norm) and tabulate EER / minDCF.

    `cfg` gives the data, evaluation and device settings (default: the checkpoint's own); the
    model block always comes from the checkpoint. Returns this call's table on rank 0 (empty
    elsewhere) and writes it with the score files into out_dir (default `default_out_dir(checkpoint)`);
    metrics.csv there gathers every list scored with the same checkpoint and settings. Results
    of another checkpoint or other settings in out_dir are refused unless `overwrite`.
    """
    rank = dist.setup(cfg.train.device if cfg else "auto")
    ckpt = dist.main_first(rank, lambda: resolve_checkpoint(checkpoint, pick))  # rank 0 makes an average
    stored = read_checkpoint(ckpt)
    model, ckpt_cfg = checkpoint_model(stored, ckpt, rank.device, base=cfg or "paper")
    if cfg is not None:
        cfg = with_overrides(cfg)
        cfg.model = ckpt_cfg.model
    cfg = cfg or ckpt_cfg
    dist.check_fast_path(cfg.model.fast, rank.device, f"{ckpt} (model.fast: true)",
                         "evaluate it with --device cpu (the model block, fast included, comes from the checkpoint)")
    data_path = dist.main_first(rank, lambda: resolve_data_path(cfg.data))  # rank 0 builds the demo corpus
    roots = [data_path / d for d in cfg.data.eval_dirs]
    out = Path(out_dir) if out_dir else default_out_dir(ckpt)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    ev = cfg.evaluation
    identity = evaluation_identity(ckpt, cfg, roots, bare=not carries_config(stored))
    earlier = _earlier_rows(out, identity, overwrite) if rank.is_main else []
    trial_lists = _trial_lists(data_path, list(lists or ev.trial_lists), earlier, overwrite, roots)

    t0 = time.perf_counter()
    keys = sorted(set().union(*(t.files() for t in trial_lists.values())))
    emb = cached_embeddings(model, ckpt, keys, roots, cfg, rank, cache, progress, identity["fingerprint"])
    cohort = (cohort_embeddings(model, ckpt, cfg, data_path, rank, cache, progress, identity["fingerprint"])
              if cfg.evaluation.asnorm else None)
    embed_seconds = time.perf_counter() - t0
    if not rank.is_main:
        return pd.DataFrame()

    rows = []
    for tag, trials in trial_lists.items():
        for method in ("cosine", "asnorm") if cohort is not None else ("cosine",):
            t0 = time.perf_counter()
            scores = (cosine_scores(emb, trials) if method == "cosine"
                      else asnorm_scores(emb, trials, cohort, cfg.evaluation.asnorm_top_k))
            m = summarize(scores, trials.labels)
            seconds = time.perf_counter() - t0
            stem = score_stem(tag, method)
            write_scores(out / f"{stem}.txt", scores, trials)
            write_scores(out / f"{stem}_names.txt", scores, trials, with_names=True)
            metrics = {k: m[k] for k in ("n_target", "n_nontarget", "eer", "eer_percent", "min_dcf_0.01",
                                         "min_dcf_0.05", "eer_threshold")}
            rows.append({"list": tag, "list_sha1": trials.sha1, "scoring": method, "trials": len(trials),
                         **metrics, "score_seconds": seconds, "scores_file": f"{stem}_names.txt",
                         "list_file": str(trials.path.resolve())})
    table = pd.DataFrame(rows)
    scored = set(zip(table["list"], table["scoring"]))
    kept = [r for r in earlier if (r["list"], r["scoring"]) not in scored]
    everything = pd.concat([pd.DataFrame(kept), table], ignore_index=True) if kept else table
    with atomic_open(out / "metrics.csv", "w") as f:
        everything.to_csv(f, index=False)
    info = {"checkpoint": str(ckpt), "fingerprint": identity["fingerprint"], "data_path": str(data_path),
            "roots": [str(r) for r in roots], "lists": {t: str(tl.path) for t, tl in trial_lists.items()},
            "files": len(keys), "embed_seconds": embed_seconds, "config": cfg.to_dict(), "identity": identity,
            "metrics": everything.to_dict(orient="records")}
    atomic_write_text(out / "metrics.json", json.dumps(info, indent=1))
    return table


def main(argv: list[str] | None = None) -> None:
    # out_dir, overwrite and the lists are this evaluation's, not the training run's fields of that name
    parser = cli_parser("python -m rawnet_lib.evaluate", __doc__, preset="paper",
                        skip=("out_dir", "overwrite", "trial_lists"),
                        config_help="settings for a bare reference state_dict: preset name or YAML")
    parser.add_argument("--checkpoint", default="", help="a .pt file or a run folder; empty = the newest run")
    parser.add_argument("--pick", default="best", help=f"the model of a run folder: {CHECKPOINT_CHOICES}")
    parser.add_argument("--trial_lists", "--lists", dest="lists", nargs="+", default=None,  # the notebook's name
                        help="O E H (O2 E2 H2 cleaned) or .txt paths; default: the checkpoint's trial_lists")
    parser.add_argument("--out_dir", default=None, help="default: <run>/eval/<checkpoint stem>/")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results of another checkpoint or other settings in out_dir")
    args = parser.parse_args(argv)
    ckpt = resolve_checkpoint(args.checkpoint, args.pick, make=False)  # evaluate makes an average, on rank 0 only
    unmade = check_checkpoint_choice(args.pick) > 1 and not ckpt.is_file()  # it has the settings of its run's models
    _, cfg = load_checkpoint_model(run_checkpoint(ckpt.parent.parent, "last") if unmade else ckpt, base=args.config)
    cfg = cli_config(args, base=cfg)
    try:
        table = evaluate(args.checkpoint, cfg, args.lists, args.out_dir, overwrite=args.overwrite, pick=args.pick)
        if not table.empty:
            print(f"{ckpt}\n{table.drop(columns=['list_file']).to_string(index=False)}")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run_cli(main)
