"""Evaluate a checkpoint on VoxCeleb1 trial lists: EER and minDCF per list, score files, a metrics table.

    python -m rawnet_lib.evaluate --checkpoint outputs/train/train_1P/DNNS/demo/models/best_opt_eval.pt
    torchrun --standalone --nproc_per_node=8 -m rawnet_lib.evaluate --lists O E H --device cuda

Any config field is a flag (`--data_path /data/DB --crop_mode full`); left out, it keeps the checkpoint's.

Every rank embeds a share of the files (`embed_files`); rank 0 alone scores and writes. Embeddings
are cached on disk per checkpoint and embedding settings, so O, E and H share one extraction and
a second evaluation of the same checkpoint embeds nothing. Results go to `<run>/eval/<checkpoint
stem>/` (`outputs/eval/<stem>/` for a checkpoint outside a run folder):

    scores_<list>[_asnorm].txt        "score target" per trial (the reference's results format)
    scores_<list>[_asnorm]_names.txt  "score target enroll test", for analysis
    metrics.csv, metrics.json         one row per list and scoring method, gathered over calls
                                      with the same checkpoint and settings (others need --overwrite)
    cache/embeddings_<settings>.npz   the embedding cache
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rawnet_lib import dist
from rawnet_lib.config import REPO_DIR, Config, ModelConfig, cli_config, cli_parser, load_config
from rawnet_lib.data import load_utterances, resolve_data_path
from rawnet_lib.embed import embed_files
from rawnet_lib.errors import run_cli
from rawnet_lib.io import atomic_open, atomic_write_text
from rawnet_lib.metrics import summarize
from rawnet_lib.model import RawNet2, build_model
from rawnet_lib.scoring import cosine_scores, write_scores
from rawnet_lib.trials import TrialList, official_list_path, read_trials

__all__ = ["load_checkpoint_model", "infer_model_config", "with_overrides", "checkpoint_fingerprint",
           "cached_embeddings", "cohort_embeddings", "asnorm_scores", "evaluate", "newest_run",
           "resolve_checkpoint", "default_out_dir", "main"]

_CHECKPOINT_HELP = ("give a .pt file written by training (models/best_opt_eval.pt, TA_<epoch>_<eer>.pt, last.pt) "
                    "or a reference RawNet2 state_dict")
# Our best_opt_eval.pt / last.pt hold numpy's RNG state; these are the only non-tensor types allowed.
_np_core = np._core if hasattr(np, "_core") else np.core  # numpy 2 | 1
_NUMPY_GLOBALS = [_np_core.multiarray.scalar, _np_core.multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
_fingerprints: dict[tuple[str, int, int], str] = {}


# -- checkpoints ---------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {_CHECKPOINT_HELP}")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many types for a file that is not a checkpoint)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0]}); "
                         f"{_CHECKPOINT_HELP}") from None


def infer_model_config(state: Mapping[str, torch.Tensor], base: ModelConfig | None = None) -> tuple[ModelConfig, int]:
    """(ModelConfig, n_classes) read off a RawNet2 state_dict's tensor shapes.

    The sinc kernel length and sample rate are not stored in the weights (the filters are
    computed), so they come from `base` (the paper's 251 taps by default).
    """
    needed = ["first_conv.low_hz_", "block0.0.conv1.weight", "gru.weight_hh_l0", "fc1_gru.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"not a RawNet2 state_dict: no {', '.join(missing)} among its {len(state)} keys "
                         f"(first: {', '.join(list(state)[:4])})")
    cfg = dataclasses.replace(base or ModelConfig())
    cfg.layer_norm = "ln.gamma" in state
    if cfg.layer_norm:
        cfg.n_samples = int(state["ln.gamma"].shape[0])
    cfg.sinc_filters = int(state["first_conv.low_hz_"].shape[0])
    cfg.blocks = []
    while f"block{len(cfg.blocks)}.0.conv1.weight" in state:
        cfg.blocks.append(int(state[f"block{len(cfg.blocks)}.0.conv1.weight"].shape[0]))
    cfg.gru_units = int(state["gru.weight_hh_l0"].shape[1])
    cfg.gru_layers = sum(1 for k in state if k.startswith("gru.weight_hh_l"))
    cfg.embedding_dim = int(state["fc1_gru.weight"].shape[0])
    n_classes = int(state["fc2_gru.weight"].shape[0]) if "fc2_gru.weight" in state else 0
    return cfg, n_classes


def with_overrides(cfg: Config, **overrides: Any) -> Config:
    """A copy of `cfg` with flat overrides (`data_path=`, `crop_mode=` ...), validated like load_config."""
    out = load_config(None, cfg.to_dict(), **overrides)
    out.preset = cfg.preset
    return out


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu",
                          base: Config | str = "paper") -> tuple[RawNet2, Config]:
    """(model in eval mode on `device`, its Config) from one of our checkpoints or a bare state_dict.

    Our checkpoints carry their config. For a bare reference state_dict (optionally saved from
    nn.DataParallel, keys `module.*`) the architecture is inferred from the tensor shapes and the
    other blocks come from `base` (a Config or preset name). Loading is strict; fc2_gru is kept
    when present so that every key is accounted for.
    """
    path = Path(path)
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "config" in obj:
        state = obj["model"]
        cfg = load_config(None, {k: v for k, v in obj["config"].items() if k != "preset"})
        cfg.preset = str(obj["config"].get("preset", ""))
        _, n_classes = infer_model_config(state, cfg.model)
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
        if all(k.startswith("module.") for k in state):
            state = {k.removeprefix("module."): v for k, v in state.items()}
        cfg = load_config(base) if isinstance(base, str) else with_overrides(base)
        try:
            cfg.model, n_classes = infer_model_config(state, cfg.model)
        except ValueError as err:
            raise ValueError(f"{path}: {err}; {_CHECKPOINT_HELP}") from None
    else:
        keys = list(obj)[:6] if isinstance(obj, Mapping) else []
        raise ValueError(f"{path} holds a {type(obj).__name__} (keys {keys}), neither a training checkpoint "
                         f"(model, config, ...) nor a state_dict; {_CHECKPOINT_HELP}")
    model = build_model(cfg.model, n_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit a RawNet2 of {cfg.model} "
                         f"({' '.join(str(err).split())[:400]}); for a bare state_dict pick the preset "
                         "whose sinc_kernel matches (base=...)") from None
    return model.to(device).eval(), cfg


def checkpoint_fingerprint(path: str | Path) -> str:
    """Full SHA-1 of the file's bytes (memoised per size and mtime): a rewritten checkpoint
    always invalidates, a copied or touched one does not."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _fingerprints:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _fingerprints[memo] = digest.hexdigest()
    return _fingerprints[memo]


# -- embedding cache -----------------------------------------------------------------------------
def _settings(cfg: Config, roots: Sequence[Path]) -> dict[str, Any]:
    """What an embedding depends on besides the weights."""
    ev = cfg.evaluation
    return {"crop_mode": ev.crop_mode, "n_samples": cfg.model.n_samples,
            "eval_hop": ev.eval_hop if ev.crop_mode == "reference" else None, "amp": cfg.train.amp,
            "roots": [str(Path(r).resolve()) for r in roots]}


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"]))["fingerprint"] != fingerprint:
                return {}  # another checkpoint's embeddings: replaced on the next write
            return dict(zip(z["keys"].tolist(), z["emb"]))
    except (OSError, ValueError, KeyError):
        return {}  # unreadable cache: rebuilt


def cached_embeddings(model: torch.nn.Module, checkpoint_path: str | Path, keys: Sequence[str],
                      roots: Sequence[Path], cfg: Config, device: str | torch.device = "cpu",
                      cache_dir: str | Path = "cache", progress: bool = True) -> dict[str, np.ndarray]:
    """{key: embedding} for `keys`, embedding only the files the on-disk cache lacks.

    One npz per embedding settings (crop mode, crop length, hop, amp, roots) holds every file
    embedded so far, tagged with the checkpoint's SHA-1; a changed checkpoint starts it afresh.
    Call on every rank: they share the extraction and rank 0 writes the file atomically.
    """
    ev = cfg.evaluation
    if ev.crop_mode == "full" and cfg.model.layer_norm:
        raise ValueError(f"crop_mode={ev.crop_mode!r} needs a model without the fixed-length layer norm, "
                         f"but this one has layer_norm over {cfg.model.n_samples} samples; use crop_mode: reference")
    if ev.crop_mode == "reference" and not 0 < ev.eval_hop <= cfg.model.n_samples:
        raise ValueError(f"eval_hop={ev.eval_hop} must be in 1..n_samples ({cfg.model.n_samples}), or test crops "
                         "skip audio; use the checkpoint's own evaluation settings or a smaller hop")
    settings = _settings(cfg, roots)
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"embeddings_{tag}.npz"
    fingerprint = checkpoint_fingerprint(checkpoint_path)
    store = _read_cache(path, fingerprint)
    # Rank 0's view decides, so ranks without the cache folder (no shared disk) still agree.
    missing = dist.gather_objects(sorted(set(keys) - set(store)))[0]
    if progress and _rank() == 0:
        print(f"embeddings: {len(keys) - len(missing)} of {len(keys)} files cached, embedding {len(missing)}")
    if missing:
        store.update(embed_files(model, missing, [Path(r) for r in roots], cfg.model, ev, torch.device(device),
                                 amp=cfg.train.amp, workers=cfg.data.num_workers, progress=progress))
        if _rank() == 0:
            names = sorted(store)
            meta = json.dumps({"fingerprint": fingerprint, "checkpoint": str(checkpoint_path), **settings})
            with atomic_open(path, "wb") as f:
                np.savez(f, keys=np.array(names), emb=np.stack([store[k] for k in names]), meta=np.array(meta))
        dist.barrier()
    return {k: store[k] for k in keys if k in store}  # all keys on rank 0 (and wherever the cache is shared)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def cohort_embeddings(model: torch.nn.Module, checkpoint_path: str | Path, cfg: Config, data_path: Path,
                      device: str | torch.device = "cpu", cache_dir: str | Path = "cache",
                      progress: bool = True) -> np.ndarray:
    """AS-norm cohort (n, dim): embeddings of `asnorm_cohort` training utterances drawn with the
    run's seed, one per utterance (not per-speaker means), so the cohort spans many speakers
    and channels at the cost of one embedding each."""
    root = data_path / cfg.data.train_dir
    if not root.is_dir():
        raise ValueError(f"asnorm: true needs training utterances for its cohort, but {root} does not exist; "
                         "point data_path at a folder with VoxCeleb2/wav or set asnorm: false")
    utts = load_utterances(data_path, cfg.data.train_dir, progress=False)
    rng = np.random.default_rng(cfg.train.seed)
    pick = np.sort(rng.choice(len(utts), size=min(cfg.evaluation.asnorm_cohort, len(utts)), replace=False))
    keys = [utts.keys[i] for i in pick]
    emb = cached_embeddings(model, checkpoint_path, keys, [root], cfg, device, cache_dir, progress)
    return np.array([emb[k] for k in keys if k in emb])  # complete on rank 0, which scores


# -- scoring -------------------------------------------------------------------------------------
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


# -- runs and checkpoints ------------------------------------------------------------------------
def newest_run(out_dir: str | Path = "outputs/train") -> Path:
    """The run folder under out_dir (relative to the repository) whose models/best_opt_eval.pt is newest."""
    root = Path(out_dir) if Path(out_dir).is_absolute() else REPO_DIR / out_dir
    found = sorted(root.rglob("models/best_opt_eval.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no finished run under {root} (no models/best_opt_eval.pt); train one with "
                                "notebooks/train.ipynb or give a checkpoint path")
    return found[-1].parent.parent


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A checkpoint path as given, relative to the repository, or ("" / None) the newest run's best model."""
    if not checkpoint:
        return newest_run() / "models" / "best_opt_eval.pt"
    path = Path(checkpoint).expanduser()
    if not path.exists() and not path.is_absolute() and (REPO_DIR / path).exists():
        return REPO_DIR / path
    return path


def default_out_dir(checkpoint: str | Path) -> Path:
    """`<run>/eval/<stem>/` for a checkpoint in a run's models/, else `outputs/eval/<stem>/`."""
    path = Path(checkpoint)
    if path.parent.name == "models":
        return path.parent.parent / "eval" / path.stem
    return REPO_DIR / "outputs" / "eval" / path.stem


def _list_tag(name: str) -> str:
    return Path(name).stem if name.endswith(".txt") else name


# -- evaluation ----------------------------------------------------------------------------------
def _earlier_rows(out: Path, identity: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """The metrics rows of an earlier evaluation in `out` that this one extends.

    Same checkpoint and settings: its rows are kept (lists scored again come out identical).
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
        return list(old.get("metrics", []))
    if overwrite:
        return []
    before = old.get("identity") or {}
    changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k)) or ["unreadable"]
    raise FileExistsError(f"{out} already holds results of another checkpoint or other evaluation settings "
                          f"(differing: {', '.join(changed)}); give another out_dir (--out_dir) to keep both, "
                          "or overwrite=True (--overwrite) to replace them")


def evaluate(checkpoint: str | Path | None = None, cfg: Config | None = None, lists: Sequence[str] | None = None,
             out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, overwrite: bool = False) -> pd.DataFrame:
    """Score `lists` (default: cfg's trial_lists) with cosine (and AS-norm) and tabulate EER / minDCF.

    `cfg` gives the data, evaluation and device settings (default: the checkpoint's own); the
    model block always comes from the checkpoint. Returns this call's table on rank 0 (empty
    elsewhere) and writes it with the score files into out_dir (default `default_out_dir(checkpoint)`);
    metrics.csv there gathers every list scored with the same checkpoint and settings. Results
    of another checkpoint or other settings in out_dir are refused unless `overwrite`.
    """
    ckpt = resolve_checkpoint(checkpoint)
    rank = dist.setup(cfg.train.device if cfg else "auto")
    model, ckpt_cfg = load_checkpoint_model(ckpt, rank.device, base=cfg or "paper")
    if cfg is not None:
        cfg = with_overrides(cfg)
        cfg.model = ckpt_cfg.model
    cfg = cfg or ckpt_cfg
    data_path = resolve_data_path(cfg.data) if rank.is_main else None  # rank 0 builds the demo corpus once
    dist.barrier()
    data_path = data_path or resolve_data_path(cfg.data)
    roots = [data_path / d for d in cfg.data.eval_dirs]
    out = Path(out_dir) if out_dir else default_out_dir(ckpt)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    names = list(lists or cfg.evaluation.trial_lists)
    trial_lists = {_list_tag(n): read_trials(official_list_path(data_path, n)) for n in names}
    ev = cfg.evaluation
    identity = {"fingerprint": checkpoint_fingerprint(ckpt), **_settings(cfg, roots),
                "asnorm": [ev.asnorm_cohort, ev.asnorm_top_k, cfg.train.seed] if ev.asnorm else None}
    earlier = _earlier_rows(out, identity, overwrite) if rank.is_main else []

    t0 = time.perf_counter()
    keys = sorted(set().union(*(t.files() for t in trial_lists.values())))
    emb = cached_embeddings(model, ckpt, keys, roots, cfg, rank.device, cache, progress)
    cohort = (cohort_embeddings(model, ckpt, cfg, data_path, rank.device, cache, progress)
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
            stem = f"scores_{tag}" + ("_asnorm" if method == "asnorm" else "")
            write_scores(out / f"{stem}.txt", scores, trials)
            write_scores(out / f"{stem}_names.txt", scores, trials, with_names=True)
            rows.append({"list": tag, "scoring": method, "trials": len(trials), "n_target": m["n_target"],
                         "n_nontarget": m["n_nontarget"], "eer": m["eer"], "eer_percent": m["eer_percent"],
                         "min_dcf_0.01": m["min_dcf_0.01"], "min_dcf_0.05": m["min_dcf_0.05"],
                         "eer_threshold": m["eer_threshold"], "score_seconds": seconds,
                         "scores_file": f"{stem}_names.txt"})
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
    parser.add_argument("--checkpoint", default="", help="a .pt file; empty = the newest run's best model")
    parser.add_argument("--lists", nargs="+", default=None,
                        help="O E H (O2 E2 H2 cleaned) or .txt paths; default: the checkpoint's trial_lists")
    parser.add_argument("--out_dir", default=None, help="default: <run>/eval/<checkpoint stem>/")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results of another checkpoint or other settings in out_dir")
    args = parser.parse_args(argv)
    ckpt = resolve_checkpoint(args.checkpoint)
    _, cfg = load_checkpoint_model(ckpt, base=args.config)
    cfg = cli_config(args, base=cfg)
    try:
        table = evaluate(ckpt, cfg, args.lists, args.out_dir, overwrite=args.overwrite)
        if not table.empty:
            print(f"{ckpt}\n{table.to_string(index=False)}")
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run_cli(main)
