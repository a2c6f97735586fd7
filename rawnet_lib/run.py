"""A training run's folder, in the seed's layout, written by rank 0 only and always atomically.

    <out_dir>/train_<N>P/DNNS/<name>/
      models/best_opt_eval.pt   best model + optimiser + config (what evaluation needs)
      models/TA_<epoch>_<eer>.pt  the model of each epoch
      models/last.pt            everything `resume` needs (model, optimiser, scheduler, scaler, RNG)
      results/eval_epoch<N>.txt "score target" per validation trial
      log/eval_epoch<N>.txt     the epoch's training log
      prof/                     torch.profiler trace (profile: true)
      eers.txt                  "epoch:<N>, TA_eval_eer:<eer>" per epoch
      f_params.txt              every parameter, "key:<tab>value"
      config.yaml, history.json, run.json (git commit, versions, host), summary.json
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rawnet_lib import dist
from rawnet_lib.config import REPO_DIR, Config, write_f_params
from rawnet_lib.data import load_utterances
from rawnet_lib.io import atomic_torch_save, atomic_write_text
from rawnet_lib.trials import make_trials, write_trials
from rawnet_lib.errors import WorkbookError

__all__ = ["RunDir", "RunExistsError", "NonFiniteLossError", "run_path", "emit", "load_checkpoint",
           "validation_trials", "EVENT_PREFIX"]

EVENT_PREFIX = "@@rawnet "
MIN_FREE_BYTES = 1 << 30


class RunExistsError(WorkbookError, FileExistsError):
    """The run folder holds an earlier run; nothing is overwritten without being asked."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message names the epoch and step."""


def run_path(cfg: Config) -> Path:
    out = Path(cfg.train.out_dir)
    out = out if out.is_absolute() else REPO_DIR / out
    return out / f"train_{cfg.train.devices * cfg.train.nnodes}P" / "DNNS" / cfg.train.name


def emit(kind: str, **fields: Any) -> None:
    """One machine-readable progress line for the notebook launcher (rawnet_lib.launch)."""
    print(EVENT_PREFIX + json.dumps({"type": kind, **fields}), flush=True)


def check_run_dir(cfg: Config) -> Path:
    """Fail before any work when the folder holds a run we were not told to resume or
    overwrite, or cannot take the run's files."""
    path = run_path(cfg)
    started = path.exists() and any(path.iterdir())
    if started and not (cfg.train.resume or cfg.train.overwrite):
        raise RunExistsError(f"{path} holds an earlier run; set resume: true to continue it, "
                             "overwrite: true to replace it, or choose another name")
    if cfg.train.resume and not (path / "models" / "last.pt").exists() and started:
        raise RunExistsError(f"resume: true, but {path} has no models/last.pt to resume from; "
                             "set overwrite: true to start it again")
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write to {probe}; choose a writable out_dir")
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise OSError(f"only {free >> 20} MiB free under {probe}; a run needs at least "
                      f"{MIN_FREE_BYTES >> 20} MiB for checkpoints: free space or change out_dir")
    return path


@dataclass
class RunDir:
    path: Path
    cfg: Config
    is_main: bool
    events: bool  # progress as event lines for the notebook instead of a terminal bar

    @classmethod
    def create(cls, cfg: Config, rank: dist.RankInfo) -> "RunDir":
        path = run_path(cfg)
        if rank.is_main:
            check_run_dir(cfg)
            if cfg.train.overwrite and not cfg.train.resume and path.exists():
                shutil.rmtree(path)
            for sub in ("models", "results", "log", "prof"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            for stale in path.rglob(".*.tmp"):  # a write a killed run never finished: never read
                stale.unlink()
            atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_f_params(cfg, path / "f_params.txt")
        dist.barrier()
        return cls(path, cfg, rank.is_main, os.environ.get("RAWNET_EVENTS") == "1")

    # -- logging -------------------------------------------------------------------------
    def log(self, epoch: int, line: str) -> None:
        if not self.is_main:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with open(self.path / "log" / f"eval_epoch{epoch}.txt", "a") as f:
            f.write(stamped + "\n")
        if self.events:
            emit("log", line=line)

    def start(self, **facts: Any) -> None:
        if not self.is_main:
            return
        info = {"command": sys.argv, "python": sys.version.split()[0], "torch": torch.__version__,
                "host": platform.node(), "git_commit": _git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **facts}
        atomic_write_text(self.path / "run.json", json.dumps(info, indent=1))
        message = (f"run {self.path}: {facts['speakers']} speakers, {facts['utterances']} utterances, "
                   f"{facts['hours']:.2f} h; {self.cfg.train.devices * self.cfg.train.nnodes} process(es)")
        if self.events:
            emit("start", path=str(self.path), **facts)
        print(message, flush=True)

    def profiler(self) -> torch.profiler.profile:
        prof = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.path / "prof")),
            record_shapes=True)
        prof.start()
        return prof

    # -- epoch end -------------------------------------------------------------------------
    def end_epoch(self, epoch: int, stats: dict[str, float], history: list[dict], model: torch.nn.Module,
                  optimizer, scheduler, scaler, speakers: list[str], best: bool) -> None:
        eer = stats["val_eer"]
        eers = "".join(f"epoch:{h['epoch']}, TA_eval_eer:{h['val_eer']:.4f}\n" for h in history)
        atomic_write_text(self.path / "eers.txt", eers)
        atomic_write_text(self.path / "history.json", json.dumps(history, indent=1))
        model_state = {"model": model.state_dict(), "config": self.cfg.to_dict(), "speakers": speakers,
                       "epoch": epoch, "val_eer": eer}
        if self.cfg.train.save_every_epoch:
            atomic_torch_save(model_state, self.path / "models" / f"TA_{epoch}_{eer:.4f}.pt")
        full = {**model_state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "history": history, "rng": _rng_state()}
        if best:
            atomic_torch_save(full, self.path / "models" / "best_opt_eval.pt")
        atomic_torch_save(full, self.path / "models" / "last.pt")  # last: a crash never leaves it half-written
        line = (f"epoch {epoch}: loss {stats['loss']:.4f} acc {stats['accuracy']:.4f} val EER {100 * eer:.2f} % "
                f"{stats['crops_per_s']:.1f} crops/s ({stats['crops_per_s_per_device']:.1f}/device, "
                f"{stats['audio_seconds_per_s']:.0f} audio s/s) "
                f"FPS(seed) {stats['fps_seed']:.0f}" + (" best" if best else ""))
        self.log(epoch, line)
        if self.events:
            emit("epoch", **stats, best=best)
        else:
            print(line, flush=True)

    def summary(self, history: list[dict]) -> dict[str, Any]:
        valid = [h for h in history if np.isfinite(h["val_eer"])]
        best = min(valid, key=lambda h: h["val_eer"]) if valid else {}
        out = {"run": str(self.path), "epochs": len(history), "best_epoch": best.get("epoch"),
               "best_val_eer": best.get("val_eer"), "final_val_eer": history[-1]["val_eer"] if history else None}
        atomic_write_text(self.path / "summary.json", json.dumps(out, indent=1))
        return out

    def finish_performance(self, stats: dict[str, float]) -> dict[str, Any]:
        if not self.is_main:
            return {}
        out = {"mode": "performance", "run": str(self.path), "devices": self.cfg.train.devices * self.cfg.train.nnodes,
               "amp": self.cfg.train.amp, "batch_size": self.cfg.train.batch_size, **stats}
        atomic_write_text(self.path / "performance.json", json.dumps(out, indent=1))
        return out

    def last_checkpoint(self) -> Path | None:
        path = self.path / "models" / "last.pt"
        return path if path.exists() else None


def load_checkpoint(path: Path | None, model: torch.nn.Module, optimizer, scheduler, scaler) -> dict[str, Any] | None:
    """Restore a `last.pt` (resume); None when the run has no finished epoch yet."""
    if path is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (torch raises many types for a damaged file)
        raise RuntimeError(f"{path} cannot be read ({err}); it was not written by a finished epoch. "
                           "Remove it to resume from the epoch before, or set overwrite: true") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return state


def validation_trials(cfg: Config, data_path: Path, run: RunDir) -> Path:
    """The per-epoch validation list: a file of the data set, or one made from held-out
    utterances (val_from) with the run's seed and kept in the run folder."""
    given = data_path / cfg.data.val_trials
    if given.is_file():
        return given
    path = run.path / Path(cfg.data.val_trials).name
    if run.is_main and not path.exists():
        keys = load_utterances(data_path, cfg.data.val_from, progress=False).keys
        write_trials(path, make_trials(keys, cfg.data.val_pairs, cfg.train.seed))
    dist.barrier()
    return path


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
