"""A training run's folder, in the seed's layout, written by rank 0 only and always atomically;
and finding runs and their checkpoints again.

Rank 0 holds a `RunDir`; the other ranks hold a `NullRunDir` with the same methods, which
write nothing, so the training loop calls them on every rank without asking which it is.

    <out_dir>/train_<N>P/DNNS/<name>/
      models/best_opt_eval.pt   best model + optimiser + config (what evaluation needs)
      models/TA_<epoch>_<eer>.pt  the model of each epoch
      models/avg_last<N>.pt     the mean of the last N epochs' weights, made by `run_checkpoint` on demand
      models/last.pt            everything `resume` needs (model, optimiser, scheduler, scaler, RNG)
      results/eval_epoch<N>.txt "score target" per validation trial
      log/eval_epoch<N>.txt     the epoch's training log
      prof/                     torch.profiler trace (profile: true)
      tensorboard/              event files: loss, accuracy, lr per logged step; per epoch also val EER,
                                crops/s, the loader's crops/s and data-wait share (tensorboard --logdir <run>)
      eers.txt                  "epoch:<N>, TA_eval_eer:<eer>" per epoch
      f_params.txt              every parameter, "key:<tab>value"
      val_trial.txt             the validation trials, when the data set has none (val_from)
      config.yaml, history.json, run.json (git commit, versions, host; earlier starts), summary.json
      eval/<checkpoint stem>/   what rawnet_lib.evaluate writes for a checkpoint of models/
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from rawnet_lib import dist
from rawnet_lib.config import (REPO_DIR, Config, ConfigError, input_path, read_yaml, recipe_changes, repo_path,
                               write_f_params)
from rawnet_lib.dataset.trials import PairCountError, TrialList, make_trials, read_trials, write_trials
from rawnet_lib.dataset.utterances import UtteranceList, load_utterances
from rawnet_lib.errors import WorkbookError
from rawnet_lib.eval.embed import check_crops
from rawnet_lib.eval.metrics import eer as compute_eer
from rawnet_lib.eval.scoring import cosine_scores, write_scores
from rawnet_lib.io import atomic_write_text
from rawnet_lib.models.checkpoint import (average_checkpoints, model_checkpoint, read_checkpoint, save_checkpoint,
                                          training_checkpoint)

__all__ = ["LOG_EVERY", "RunDir", "NullRunDir", "RunExistsError", "RunNotFoundError", "NonFiniteLossError",
           "FOLDER_NAME", "run_path", "best_epoch", "corpus_facts", "data_changes", "validation_trials",
           "validation_roots", "check_validation", "emit",
           "check_run_dir", "run_changes", "newest_run", "resolve_checkpoint", "default_out_dir", "EVENT_PREFIX",
           "run_checkpoint", "check_checkpoint_choice", "epoch_models", "CHECKPOINT_CHOICES"]

EVENT_PREFIX = "@@rawnet "
LOG_EVERY = 50  # training steps between log lines
EPOCH_SCALARS = ("loss", "accuracy", "val_eer", "lr", "crops_per_s", "loader_crops_per_s", "data_wait_share")
MIN_FREE_BYTES = 1 << 30


class RunExistsError(WorkbookError, FileExistsError):
    """The run folder holds an earlier run; nothing is overwritten without being asked."""


class RunNotFoundError(WorkbookError, FileNotFoundError):
    """No finished run where one was looked for."""


class NonFiniteLossError(WorkbookError, FloatingPointError):
    """The loss became NaN or inf; the message names the epoch and step."""


FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # one plain folder name: a run's, a sweep arm's


def run_path(cfg: Config) -> Path:
    """<out_dir>/train_<N>P/DNNS/<name>; a name that is not one plain folder name is refused, as an
    empty or relative one would point at the folder of other runs (which overwrite: true deletes)."""
    if not FOLDER_NAME.fullmatch(cfg.train.name):
        raise ConfigError(f"name={cfg.train.name!r} becomes the run's folder name: use letters, digits, '.', '-' "
                          "and '_', not starting with '.'")
    return repo_path(cfg.train.out_dir) / f"train_{cfg.train.devices * cfg.train.nnodes}P" / "DNNS" / cfg.train.name


def emit(kind: str, **fields: Any) -> None:
    """One machine-readable progress line for the notebook launcher (rawnet_lib.training.launch),
    in one write: print's two (text, then newline) let another rank's output in between."""
    sys.stdout.write(EVENT_PREFIX + json.dumps({"type": kind, **fields}) + "\n")
    sys.stdout.flush()


def check_run_dir(cfg: Config) -> Path:
    """Fail before any work when the folder holds a run we were not told to resume or
    overwrite, or cannot take the run's files."""
    path = run_path(cfg)
    started = path.exists() and any(path.iterdir())
    if started and not (cfg.train.resume or cfg.train.overwrite):
        raise RunExistsError(f"{path} holds an earlier run; set resume: true to continue it, "
                             "overwrite: true to replace it, or choose another name")
    # a run killed in its first epoch (config.yaml, no last.pt) resumes from the start; anything else is not a run
    if cfg.train.resume and started and not any((path / f).exists() for f in ("models/last.pt", "config.yaml")):
        raise RunExistsError(f"resume: true, but {path} holds no run to resume (no config.yaml, no models/last.pt); "
                             "set overwrite: true to replace what it holds, or choose another name")
    # The folder names the processes in all (train_<N>P): with another number a resume would start afresh.
    others = [p for p in path.parents[2].glob(f"train_*P/DNNS/{path.name}")
              if (p / "models" / "last.pt").is_file()] if cfg.train.resume and not started else []
    if others:
        raise RunExistsError(f"resume: true, but {path} holds no run; {others[0]} does: resume it with as many "
                             f"processes in all (devices x nnodes) as {others[0].parents[1].name} names, or set "
                             "resume: false to start a new run here")
    source = input_path(cfg.train.init_from) if cfg.train.init_from else None
    inside = source is not None and any(Path(p).is_relative_to(r) for p in (os.path.abspath(source), source.resolve())
                                        for r in (os.path.abspath(path), path.resolve()))
    if started and cfg.train.overwrite and not cfg.train.resume and inside:
        raise RunExistsError(f"init_from {cfg.train.init_from} lies in {path}, which overwrite: true deletes before "
                             "reading it; fine-tune into a run of another name (init_from starts a new run)")
    # init_from only starts a run; more epochs continue one, except under cosine, whose curve spans its length.
    allow = ("init_from",) if cfg.optim.lr_decay == "cosine" else ("init_from", "epochs")
    changes = run_changes(cfg, allow) if cfg.train.resume else []
    if changes:
        own, out = path / "config.yaml", cfg.train.out_dir
        raise RunExistsError(f"resume: true, but {path} was trained with other settings ({'; '.join(changes)}); "
                             f"resume it with its own (`--config {own} --out_dir {out} --name {path.name} --resume "
                             f"true`, in a notebook `-p preset {own} -p out_dir {out} -p name {path.name} -p resume "
                             "True`), or choose another name for these")
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write to {probe}; choose a writable out_dir")
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise OSError(f"only {free >> 20} MiB free under {probe}; a run needs at least "
                      f"{MIN_FREE_BYTES >> 20} MiB for checkpoints: free space or change out_dir")
    return path


def run_changes(cfg: Config, allow: Collection[str] = (), also: Collection[str] = ()) -> list[str]:
    """How `cfg` would train something other than the run already in its folder (none there: []);
    `allow` and `also` as in `recipe_changes`."""
    saved = run_path(cfg) / "config.yaml"
    if not saved.is_file():
        return []
    values = read_yaml(saved)
    try:
        return recipe_changes(values, cfg, allow, also)
    except ConfigError as err:
        raise ConfigError(f"{saved}: {err}; it was not written by this version of the workbook: resume the "
                          "run with the version that trained it, or choose another name") from None


@dataclass
class RunDir:
    path: Path
    cfg: Config
    events: bool  # progress as event lines for the notebook instead of a terminal bar
    val_trials: Path | None  # the per-epoch validation list (mode full)
    _last_emit: float = field(default=0.0, repr=False)
    _board: Any = field(default=None, repr=False)  # the TensorBoard writer, from start() on

    @classmethod
    def create(cls, cfg: Config, rank: dist.RankInfo, data_path: Path) -> RunDir:
        """Rank 0 makes the folder (and its validation list); every rank gets the run after it."""
        path = run_path(cfg)
        val_trials = validation_trials(cfg, data_path, path) if cfg.train.mode == "full" else None
        if rank.is_main:
            _make_folder(cfg, path, data_path, val_trials)
        dist.barrier()
        return (cls if rank.is_main else NullRunDir)(path, cfg, os.environ.get("RAWNET_EVENTS") == "1", val_trials)

    def last_checkpoint(self) -> Path | None:
        path = self.path / "models" / "last.pt"
        return path if path.exists() else None

    # -- logging and progress ----------------------------------------------------------------
    def log(self, epoch: int, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with open(self.path / "log" / f"eval_epoch{epoch}.txt", "a") as f:
            f.write(stamped + "\n")
        if self.events:
            emit("log", line=line)

    def start(self, **facts: Any) -> None:
        info = {"command": sys.argv, "python": sys.version.split()[0], "torch": torch.__version__,
                "host": platform.node(), "git_commit": _git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **facts}
        path = self.path / "run.json"
        try:  # a resume keeps where and with what the run trained before it
            before = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            before = {}
        earlier = [*before.pop("earlier", []), before] if before else []
        atomic_write_text(path, json.dumps({**info, "earlier": earlier}, indent=1))
        from torch.utils.tensorboard import SummaryWriter  # here: importing run.py stays light
        self._board = SummaryWriter(str(self.path / "tensorboard"), flush_secs=10)
        message = (f"run {self.path}: {facts['speakers']} speakers, {facts['utterances']} utterances, "
                   f"{facts['hours']:.2f} h; {self.cfg.train.devices * self.cfg.train.nnodes} process(es)")
        if self.events:
            emit("start", path=str(self.path), **facts)
        print(message, flush=True)

    def progress_bar(self, total: int, desc: str) -> tqdm:
        """An epoch's terminal bar; hidden when the notebook gets events instead."""
        return tqdm(total=total, desc=desc, disable=self.events, dynamic_ncols=True)

    def step(self, epoch: int, step: int, steps: int, loss: float, acc: float, lr: float) -> None:
        """A training step's running figures, whenever the loop reads them (every LOG_EVERY steps,
        a few seconds, the last step): an event every 2 s, a log line every LOG_EVERY steps,
        TensorBoard scalars at the run's global step."""
        if self.events and time.time() - self._last_emit > 2:
            emit("step", epoch=epoch, step=step, steps=steps, loss=loss, acc=acc)
            self._last_emit = time.time()
        if step % LOG_EVERY == 0 or step == steps:
            self.log(epoch, f"epoch {epoch} step {step}/{steps} loss {loss:.4f} acc {acc:.4f} lr {lr:.3e}")
        if self._board is not None:
            at = (epoch - 1) * steps + step
            for name, value in (("loss", loss), ("accuracy", acc), ("lr", lr)):
                self._board.add_scalar(f"train/{name}", value, at)

    def profiler(self) -> torch.profiler.profile | None:
        prof = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.path / "prof")),
            record_shapes=True)
        prof.start()
        return prof

    # -- epoch end -------------------------------------------------------------------------
    def score(self, epoch: int, embeddings: dict[str, np.ndarray], trials: TrialList) -> float:
        """The validation EER from the gathered embeddings; the trial scores go to results/."""
        scores = cosine_scores(embeddings, trials)
        write_scores(self.path / "results" / f"eval_epoch{epoch}.txt", scores, trials)
        return compute_eer(scores, trials.labels)

    def end_epoch(self, epoch: int, stats: dict[str, float], history: list[dict], model: torch.nn.Module,
                  optimizer, scheduler, scaler, speakers: list[str], best: bool) -> None:
        eer = stats["val_eer"]
        weights = model_checkpoint(model, self.cfg, speakers, epoch, eer)
        if self.cfg.train.save_every_epoch:
            save_checkpoint(weights, self.path / "models" / f"TA_{epoch}_{eer:.4f}.pt")
        full = training_checkpoint(weights, optimizer, scheduler, scaler, history)
        save_checkpoint(full, self.path / "models" / "last.pt")  # the epoch counts from here on (`resumed`)
        if best:
            save_checkpoint(full, self.path / "models" / "best_opt_eval.pt")
        self._write_history(history)
        line = (f"epoch {epoch}: loss {stats['loss']:.4f} acc {stats['accuracy']:.4f} val EER {100 * eer:.2f} % "
                f"{stats['crops_per_s']:.1f} crops/s ({stats['crops_per_s_per_device']:.1f}/device, "
                f"{stats['audio_seconds_per_s']:.0f} audio s/s) "
                f"FPS(seed) {stats['fps_seed']:.0f}; waiting for data {100 * stats['data_wait_share']:.0f} % "
                f"of the time, loader {stats['loader_crops_per_s']:.0f} crops/s" + (" best" if best else ""))
        self.log(epoch, line)
        if self._board is not None:
            for name in EPOCH_SCALARS:
                self._board.add_scalar(f"epoch/{name}", stats[name], epoch)
            self._board.flush()
        if self.events:
            emit("epoch", **stats, best=best)
        else:
            print(line, flush=True)

    def _write_history(self, history: list[dict]) -> None:
        eers = "".join(f"epoch:{h['epoch']}, TA_eval_eer:{h['val_eer']:.4f}\n" for h in history)
        atomic_write_text(self.path / "eers.txt", eers)
        atomic_write_text(self.path / "history.json", json.dumps(history, indent=1))

    def resumed(self, state: dict[str, Any]) -> None:
        """Bring what an epoch writes after last.pt up to it (a run killed between last.pt and the
        best model or the history resumes with the files of the epoch last.pt holds), and take the
        run's summary away: it trains again, and is finished when it writes one again."""
        (self.path / "summary.json").unlink(missing_ok=True)
        history = state["history"]
        best = self.path / "models" / "best_opt_eval.pt"
        epoch = best_epoch(history).get("epoch")
        held = read_checkpoint(best).get("epoch") if best.is_file() else None
        if epoch is not None and held != epoch:  # none yet, or of an attempt the run discarded
            kept = _epoch_files(self.path).get(epoch)
            if epoch == state["epoch"] or kept is not None:
                save_checkpoint(state if epoch == state["epoch"] else read_checkpoint(kept), best)
            else:
                self.log(epoch, f"models/best_opt_eval.pt holds epoch {held}, which the run discarded; its best "
                                f"epoch {epoch} kept no model (save_every_epoch: false): choose last or avg_last<N>")
        self._write_history(history)

    def summary(self, history: list[dict]) -> dict[str, Any]:
        best = best_epoch(history)
        out = {"run": str(self.path), "epochs": len(history), "best_epoch": best.get("epoch"),
               "best_val_eer": best.get("val_eer"), "final_val_eer": history[-1]["val_eer"] if history else None}
        atomic_write_text(self.path / "summary.json", json.dumps(out, indent=1))
        return self._report(out)

    def finish_performance(self, stats: dict[str, float]) -> dict[str, Any]:
        out = {"mode": "performance", "run": str(self.path), "devices": self.cfg.train.devices * self.cfg.train.nnodes,
               "amp": self.cfg.train.amp, "batch_size": self.cfg.train.batch_size, **stats}
        atomic_write_text(self.path / "performance.json", json.dumps(out, indent=1))
        return self._report(out)

    def _report(self, out: dict[str, Any]) -> dict[str, Any]:
        """The run's result: an event for the launcher, or one JSON line on a shell."""
        if self._board is not None:
            self._board.close()
        if self.events:
            emit("result", summary=out)
        else:
            print(json.dumps(out), flush=True)
        return out


def corpus_facts(utts: UtteranceList, sample_rate: int) -> tuple[int, float]:
    """(utterances, hours) of a training corpus of audio at `sample_rate` (the model's): what
    run.json records and `data_changes` compares."""
    return len(utts), utts.seconds(sample_rate) / 3600


def data_changes(folder: Path, utterances: int, hours: float) -> str | None:
    """How the training data given differs from the data the run in `folder` trained on (its
    run.json: utterances and hours); None when the same, or not recorded (an older version's run).
    A data folder may move, so the corpus itself is compared, not its path."""
    try:
        facts = json.loads((folder / "run.json").read_text())
        trained = int(facts["utterances"]), float(facts["hours"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if trained[0] == utterances and math.isclose(trained[1], hours, rel_tol=1e-9):
        return None
    return (f"{folder} trained on {trained[0]} utterances ({trained[1] * 3600:.4f} s of audio), but its training "
            f"data now holds {utterances} ({hours * 3600:.4f} s)")


def best_epoch(history: list[dict]) -> dict:
    """The history entry of lowest finite validation EER, the first of equals (as training's strict
    `<` decides "best"); {} when none is finite."""
    valid = [h for h in history if np.isfinite(h["val_eer"])]
    return min(valid, key=lambda h: h["val_eer"]) if valid else {}


class NullRunDir(RunDir):
    """The run folder as ranks other than 0 see it: its paths, and writers that write nothing."""

    def log(self, epoch: int, line: str) -> None:
        pass

    def start(self, **facts: Any) -> None:
        pass

    def progress_bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, disable=True)

    def step(self, epoch: int, step: int, steps: int, loss: float, acc: float, lr: float) -> None:
        pass

    def profiler(self) -> None:
        return None

    def score(self, epoch: int, embeddings: dict[str, np.ndarray], trials: TrialList) -> float:
        return float("nan")  # rank 0 scores; train broadcasts its EER

    def end_epoch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def resumed(self, state: dict[str, Any]) -> None:
        pass

    def summary(self, history: list[dict]) -> dict[str, Any]:
        return {}

    def finish_performance(self, stats: dict[str, float]) -> dict[str, Any]:
        return {}


def _data_set_list(cfg: Config, data_path: Path) -> Path | None:
    """The validation list when the data set holds it (else each run makes its own)."""
    given = data_path / cfg.data.val_trials
    return given if given.is_file() else None


def validation_trials(cfg: Config, data_path: Path, path: Path) -> Path:
    """The data set's validation list, or one kept in the run folder (made from val_from)."""
    return _data_set_list(cfg, data_path) or path / Path(cfg.data.val_trials).name


def held_out_trials(cfg: Config, data_path: Path) -> TrialList:
    """The validation list a run makes when the data set has none: val_pairs balanced pairs of the
    val_from utterances, drawn with the run's seed; a ConfigError when they cannot be made."""
    folder = data_path / cfg.data.val_from
    keys = load_utterances(data_path, cfg.data.val_from, sample_rate=cfg.model.sample_rate, progress=False).keys
    try:
        return make_trials(keys, cfg.data.val_pairs, cfg.train.seed)
    except PairCountError as err:
        raise ConfigError(f"val_pairs={cfg.data.val_pairs}, but the {len(keys)} validation utterances of {folder} "
                          f"give 2 to {err.most} balanced pairs; set data.val_pairs (--val_pairs) within that range, "
                          "or give data.val_trials a list the data set holds") from None
    except ValueError as err:
        raise ConfigError(f"no validation list can be made from {folder}: {err}") from None


def validation_roots(cfg: Config, data_path: Path) -> list[Path]:
    """The folders validation trials are looked up in: the evaluation folders, then val_from."""
    return [data_path / d for d in [*cfg.data.eval_dirs, cfg.data.val_from]]


def check_validation(cfg: Config, data_path: Path) -> None:
    """Before training, not after its first epoch: validation's crops fit the model, and the
    validation list reads (the data set's: every line and its audio) or can be made."""
    if cfg.train.mode != "full":  # performance mode does not validate
        return
    check_crops(cfg.model, cfg.evaluation)
    listed = _data_set_list(cfg, data_path)
    if listed is None:
        held_out_trials(cfg, data_path)
    else:
        read_trials(listed, validation_roots(cfg, data_path))


def _make_folder(cfg: Config, path: Path, data_path: Path, val_trials: Path | None) -> None:
    check_run_dir(cfg)
    replace = cfg.train.overwrite and not cfg.train.resume and path.exists()
    trials = None  # made before anything is written: a val_pairs that cannot be met leaves no folder
    if val_trials is not None and (not val_trials.exists() or (replace and val_trials.parent == path)):
        trials = held_out_trials(cfg, data_path)
    if replace:
        shutil.rmtree(path)
    for sub in ("models", "results", "log", "prof"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for folder in (path, path / "models", path / "results"):  # a write a killed run never finished: never read
        for stale in folder.glob(".*.tmp"):
            if not stale.name.startswith(".avg_last"):  # an evaluation may be averaging (eval/ is left alone too)
                stale.unlink()
    atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_f_params(cfg, path / "f_params.txt")
    if trials is not None:
        write_trials(val_trials, trials)


# -- finding runs again ------------------------------------------------------------------------
def newest_run(out_dir: str | Path = "outputs/train") -> Path:
    """The run folder under out_dir (relative to the repository) whose models/best_opt_eval.pt is newest."""
    root = repo_path(out_dir)
    found = sorted(root.rglob("models/best_opt_eval.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RunNotFoundError(f"no finished run under {root} (no models/best_opt_eval.pt); train one with "
                               "notebooks/train.ipynb or give a checkpoint path")
    return found[-1].parent.parent


def resolve_checkpoint(checkpoint: str | Path | None, pick: str = "best", make: bool = True) -> Path:
    """A checkpoint path (`input_path`: the working folder's, else the repository's); for a run folder, or "" / None
    (the newest run), the model `pick` names in it (`run_checkpoint`: best, last, avg_last<N>;
    `make=False` only names an average)."""
    check_checkpoint_choice(pick)
    if not checkpoint:
        return run_checkpoint(newest_run(), pick, make)
    path = input_path(checkpoint)
    if path.is_dir():
        return run_checkpoint(path, pick, make)
    if pick != "best":
        raise ConfigError(f"pick={pick!r} chooses among a run's models, but {checkpoint} is a file; give its run "
                          f"folder ({path.parent.parent if path.parent.name == 'models' else 'outputs/train/...'}) "
                          "as the checkpoint, or leave pick at best")
    return path


CHECKPOINT_CHOICES = "best, last or avg_last<N> (the last N epochs' weights averaged, N >= 2, e.g. avg_last10)"


def check_checkpoint_choice(which: str) -> int:
    """How many epochs the choice takes from the end of a run (best: 0, last: 1, avg_last<N>: N)."""
    found = re.fullmatch(r"best|last|avg_last(\d+)", str(which))
    if not found or (found[1] is not None and int(found[1]) < 2):
        raise ConfigError(f"unknown checkpoint choice {which!r}; valid: {CHECKPOINT_CHOICES}")
    return {"best": 0, "last": 1}[which] if found[1] is None else int(found[1])


def epoch_models(run: str | Path) -> list[Path]:
    """The run's models/TA_<epoch>_<eer>.pt in epoch order, one per epoch: a run killed between an
    epoch's model and its last.pt trains that epoch again on resume, and the newer file counts."""
    newest = _epoch_files(Path(run))
    return [newest[e] for e in sorted(newest)]


def _epoch_files(run: Path) -> dict[int, Path]:
    newest: dict[int, Path] = {}
    for path in (run / "models").glob("TA_*_*.pt"):
        found = re.fullmatch(r"TA_(\d+)_.*\.pt", path.name)
        epoch = int(found[1]) if found else None
        if epoch is not None and (epoch not in newest or path.stat().st_mtime_ns > newest[epoch].stat().st_mtime_ns):
            newest[epoch] = path
    return newest


def run_state(folder: Path) -> str:
    """`finished` (summary.json), `started` (models/last.pt: a resume continues it) or `new`: a
    folder without last.pt never finished an epoch, so a run there starts from the beginning."""
    if (folder / "summary.json").is_file():
        return "finished"
    return "started" if (folder / "models" / "last.pt").is_file() else "new"


def run_checkpoint(run: str | Path, which: str = "best", make: bool = True) -> Path:
    """The model file of a finished run that `which` names: `best` is best_opt_eval.pt (the epoch
    of lowest validation EER, the reference's choice; a small validation list makes it noisy),
    `last` the last epoch's model (last.pt when it kept no TA file), `avg_last<N>` the mean of the
    last N epochs' weights (written once as models/avg_last<N>.pt, again only when the run gained
    epochs; `make=False` only names the file)."""
    n, run = check_checkpoint_choice(which), Path(run)
    if n == 0:
        return run / "models" / "best_opt_eval.pt"
    if run_state(run) != "finished":
        raise RunNotFoundError(f"{run}: checkpoint {which} needs a finished run (no summary.json yet: training is "
                               "running or was interrupted); finish it (resume: true) or choose best")
    files = _epoch_files(run)
    try:  # the epochs the run finished: a TA file of a later one is from an attempt it never finished
        last = int(json.loads((run / "summary.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        last = max(files, default=0)
    if n > last:
        raise RunNotFoundError(f"{run}: checkpoint {which} needs the models of {n} epochs, the run trained {last}; "
                               "choose fewer epochs or best")
    wanted = range(last - n + 1, last + 1)
    missing = [e for e in wanted if e not in files]
    if n == 1:  # with save_every_epoch: false the last epoch's model is only in last.pt
        return run / "models" / "last.pt" if missing else files[last]
    if missing:
        raise RunNotFoundError(f"{run}: checkpoint {which} averages epochs {wanted[0]}-{last}, but models/ holds no "
                               f"TA_<epoch>_<eer>.pt of epoch(s) {', '.join(map(str, missing))} (written with "
                               "train.save_every_epoch: true); choose fewer epochs or best")
    path, sources = run / "models" / f"{which}.pt", [files[e] for e in wanted]
    if make and (not path.is_file() or read_checkpoint(path).get("averaged") != [p.name for p in sources]):
        save_checkpoint(average_checkpoints(sources), path)
    return path


def default_out_dir(checkpoint: str | Path) -> Path:
    """`<run>/eval/<stem>/` for a checkpoint in a run's models/, else `outputs/eval/<stem>/`."""
    path = Path(checkpoint)
    if path.parent.name == "models":
        return path.parent.parent / "eval" / path.stem
    return REPO_DIR / "outputs" / "eval" / path.stem


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
