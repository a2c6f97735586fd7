"""Compare recipes over seeds: train every arm x seed, evaluate, and report intervals.

    python -m rawnet_lib.sweep params/sweeps/demo_recipes.yaml --out outputs/sweeps/demo_recipes
    papermill notebooks/sweep.ipynb out.ipynb -p sweep params/sweeps/demo_recipes.yaml

A sweep file holds `seeds: [...]`, `lists: [O, ...]` and `arms: {name: overrides}`, where the
overrides are YAML blocks as in params/ (`loss: {head: aam}`) plus an optional `preset:`
(default: the file's top-level `preset:`, else demo). Each arm x seed is an ordinary run folder,
`DIR/train_1P/DNNS/<arm>-seed<seed>/`, evaluated into its `eval/<checkpoint stem>/`. Every arm's
config is built and checked before anything trains. Run again, the sweep reuses finished runs
and evaluations and resumes an interrupted run from its last finished epoch; `--seeds 1 2 3 4 5`
runs other seeds than the file's into the same folder (more seeds when the intervals are wide).
The tables cover the seeds asked and every other seed whose runs of every arm finished in DIR, so
running the file's seeds again after `--seeds 1 2 3 4 5` still describes all five.

Which model of a run is scored is `pick:` (or `--pick`, as evaluate's): `best` (default; the epoch of
lowest validation EER, as the reference), `last`, or `avg_last<N>` (the last N epochs' weights
averaged, as WeSpeaker). Another choice than `best` reuses the training and writes its tables
under `DIR/<choice>/`, so the comparisons of each choice sit side by side.

Under DIR: runs.csv (one row per run and list, with bootstrap CIs over trials, over enrolment
speakers and over speakers on both sides of the trials (`eer_spk_both_*`), on the demo corpus over
base voices: trials of one speaker are not independent, so the second is wider and the third,
which leaves a voice out of both sides, usually wider still; and its score file, so `sources=DIR`
in the analysis notebook shows every run),
summary.csv / .json (per arm and list: mean EER % and minDCF(0.01) over seeds with 95 % t-intervals),
paired.csv (each arm minus the first over the same seeds), training.csv (per run: best epoch,
validation EER over the last 10 epochs and its epoch-to-epoch movement, final training accuracy),
det_<list>.png (all arms: each seed's curve and their average per arm; scores of different models
are never pooled, as each model's scores have their own scale).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from rawnet_lib.config import PARAMS_DIR, RENAMED, Config, ConfigError, input_path, load_config, read_yaml, repo_path
from rawnet_lib.corpus import base_voices
from rawnet_lib.dataset.augment import AugmentError, check_folders, find_noises, find_rirs
from rawnet_lib.dataset.trials import OFFICIAL_LISTS, list_tag, official_list_path, speaker_of
from rawnet_lib.dataset.utterances import load_utterances, resolve_data_path
from rawnet_lib.errors import MissingPathError, WorkbookError, run_cli
from rawnet_lib.eval.scoring import load_scores, score_stem
from rawnet_lib.eval.stats import bootstrap_eer, paired_difference, t_interval
from rawnet_lib.evaluate import evaluate, evaluation_identity, identity_changes
from rawnet_lib.io import atomic_open, atomic_write_text, file_sha1
from rawnet_lib.models.checkpoint import read_checkpoint
from rawnet_lib.train import train
from rawnet_lib.training.launch import launch
from rawnet_lib.training.run import (CHECKPOINT_CHOICES, FOLDER_NAME, RunExistsError, RunNotFoundError, best_epoch,
                                     check_checkpoint_choice, check_validation, corpus_facts, data_changes,
                                     default_out_dir, resolve_checkpoint, run_changes, run_checkpoint, run_path,
                                     run_state)
from rawnet_lib.views.plots import det_seeds_plot, save_figure

__all__ = ["Sweep", "SweepRunsFailed", "sweep_file", "load_sweep", "run_sweep", "summarise", "main"]

SWEEP_KEYS = ("seeds", "lists", "arms", "preset", "pick")
OWNED = ("seed", "name", "out_dir", "resume", "overwrite", "trial_lists")  # set by the sweep itself
# Settings a resumed run may change (RUN_CONTROL) that its results still depend on: an arm that
# changed one is another arm (params/sweeps/demo_amp.yaml compares arms by amp alone).
ARM_RUN_FIELDS = ("amp", "fast")


@dataclass
class Sweep:
    """A checked sweep: its file, seeds, lists, and one Config per (arm, seed)."""
    path: Path
    out: Path
    seeds: list[int]
    lists: list[str]
    configs: dict[str, dict[int, Config]]
    pick: str = "best"

    @property
    def arms(self) -> list[str]:
        return list(self.configs)

    @property
    def results(self) -> Path:
        """Where the tables and figures go: DIR for the best models, DIR/<choice>/ for another choice."""
        return self.out if self.pick == "best" else self.out / self.pick

    @property
    def command(self) -> str:
        """The command line that runs (or finishes) this very sweep."""
        choice = "" if self.pick == "best" else f" --pick {self.pick}"
        return (f"python -m rawnet_lib.sweep {self.path} --out {self.out} --seeds {' '.join(map(str, self.seeds))}"
                + choice)


def sweep_file(sweep: str | Path) -> Path:
    """A sweep YAML (`input_path`: the working folder's, else the repository's) or a name in params/sweeps/."""
    for candidate in (input_path(sweep), PARAMS_DIR / "sweeps" / f"{sweep}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in (PARAMS_DIR / "sweeps").glob("*.yaml"))
    raise ConfigError(f"sweep file {sweep} does not exist; give a YAML path or one of {', '.join(names)}")


def load_sweep(sweep: str | Path, out: str | Path | None = None, seeds: list[int] | None = None,
               pick: str | None = None) -> Sweep:
    """Read and check a sweep file: every arm's config is built (unknown keys and values raise,
    naming the arm) and its noise / RIR folders and init_from checkpoint are found, before any training.
    `seeds` replaces the file's seeds (the runs of seeds both name are the same runs), `pick` its
    choice of model to score. The sweep's seeds are those and every other seed whose runs of
    every arm finished in the folder with the arms' settings (`_finished_elsewhere`): the tables
    describe every finished seed, not only the last command's."""
    path = sweep_file(sweep)
    spec = read_yaml(path, holds="seeds:, lists: and arms:")
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        renamed = "".join(f" ({k} is now {RENAMED[k]})" for k in unknown if RENAMED.get(k) in SWEEP_KEYS)
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}{renamed}; valid keys: "
                          f"{', '.join(SWEEP_KEYS)}")
    where = f"{path}: seeds" if not seeds else "the seeds given (--seeds, or the notebook's -y 'seeds: [1, 2, 3]')"
    seeds, lists, arms = seeds or spec.get("seeds"), spec.get("lists", ["O"]), spec.get("arms")
    distinct_ints = isinstance(seeds, list) and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)
    if not (seeds and distinct_ints):
        raise ConfigError(f"{where} must be a list of distinct integers, e.g. [1, 2, 3], got {seeds!r}")
    if not (isinstance(lists, list) and lists):
        raise ConfigError(f"{path}: lists must name trial lists, e.g. [O, E, H], got {lists!r}")
    if not (isinstance(arms, dict) and arms):
        raise ConfigError(f"{path}: arms must map names to overrides, e.g. {{baseline: {{preset: demo}}}}, "
                          f"got {arms!r}")
    folded = [str(a).lower() for a in arms]
    if len(set(folded)) != len(folded):
        raise ConfigError(f"{path}: arm names {', '.join(map(str, arms))} differ only in case: their run folders "
                          "would be one on a case-insensitive file system; rename one")
    tags = [list_tag(str(x)) for x in lists]
    if len(set(tags)) < len(tags):  # one list twice would count each run twice in its intervals
        twice = ", ".join(sorted({t for t in tags if tags.count(t) > 1}))
        raise ConfigError(f"{path}: lists {lists!r} would report {twice} twice (a list is reported by its name, a "
                          ".txt file by its stem); name each list once, or rename one of the files")
    out = repo_path(out or Path("outputs") / "sweeps" / path.stem)  # as a run's out_dir
    which = pick or spec.get("pick") or "best"
    try:
        n_epochs = check_checkpoint_choice(which)
    except ConfigError as err:
        raise ConfigError(f"{path if not pick else 'the pick given'}: {err}") from None

    bases = _fine_tuning_bases(path, arms)

    def arm_configs(some: list[int]) -> dict[str, dict[int, Config]]:
        configs = {str(name): {seed: _arm_config(path, str(name), overrides, spec.get("preset") or "demo", seed, lists,
                                                 out) for seed in some} for name, overrides in arms.items()}
        for name, base in bases.items():  # each seed fine-tunes the base arm's run of the same seed
            for seed, cfg in configs[name].items():
                cfg.train.init_from = str(run_path(configs[base][seed]))
        return configs

    configs = arm_configs(seeds)
    for name, by_seed in configs.items():
        _check_inputs(path, name, next(iter(by_seed.values())), linked=name in bases)
        allow = ("init_from",) if name in bases else ()  # the base's run, wherever the sweep folder is now
        for cfg in by_seed.values():
            changes = run_changes(cfg, allow, ARM_RUN_FIELDS) if run_state(run_path(cfg)) != "new" else []
            if changes:  # the arm was edited after this run trained: its results would be another recipe's
                raise ConfigError(f"{path}: arm {name!r}: {run_path(cfg)} was trained with other settings "
                                  f"({'; '.join(changes)}); give the arm another name to train these as new runs, "
                                  "or delete that folder to train it again")
        train_cfg = next(iter(by_seed.values())).train
        if n_epochs > train_cfg.epochs:
            raise ConfigError(f"{path}: arm {name!r} trains {train_cfg.epochs} epochs, pick {which} averages "
                              f"{n_epochs}; choose avg_last{train_cfg.epochs} or fewer")
        if n_epochs > 1 and not train_cfg.save_every_epoch:
            raise ConfigError(f"{path}: arm {name!r} keeps no model per epoch (save_every_epoch: false), which "
                              f"pick {which} needs; remove that override or choose pick: best")
    extra = arm_configs(_finished_elsewhere(configs))
    edited = sorted({seed for name, by_seed in extra.items() for seed, cfg in by_seed.items()
                     if run_changes(cfg, ("init_from",) if name in bases else (), ARM_RUN_FIELDS)})
    if edited:
        warnings.warn(f"{path}: seed(s) {', '.join(map(str, edited))} finished in {out} with other settings of an "
                      "arm than the file's: left out of the tables", stacklevel=2)
    for name, by_seed in extra.items():
        configs[name].update({seed: cfg for seed, cfg in by_seed.items() if seed not in edited})
    seeds = sorted(next(iter(configs.values())))
    return Sweep(path, out, list(seeds), [str(x) for x in lists], configs, which)


def _finished_elsewhere(configs: dict[str, dict[int, Config]]) -> list[int]:
    """The seeds beyond those in `configs` whose runs of every arm finished in the sweep's folder."""
    finished: set[int] | None = None
    for name, by_seed in configs.items():
        folder = run_path(next(iter(by_seed.values()))).parent
        pattern = re.compile(rf"{re.escape(name)}-seed([1-9][0-9]*|0)")  # as the sweep names them: no 01
        names = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        found = {int(m[1]) for p in names if (m := pattern.fullmatch(p.name)) and run_state(p) == "finished"}
        finished = found if finished is None else finished & found
    return sorted((finished or set()) - {seed for by_seed in configs.values() for seed in by_seed})


def _fine_tuning_bases(path: Path, arms: dict) -> dict[str, str]:
    """{arm: the earlier arm whose run of each seed it fine-tunes} of the arms with `init_from_arm`
    (their runs start from that run's best model, as `init_from: <run folder>` does)."""
    bases, names = {}, [str(a) for a in arms]
    for i, (name, overrides) in enumerate(arms.items()):
        base = overrides.get("init_from_arm") if isinstance(overrides, dict) else None
        if base is None:
            continue
        where = f"{path}: arm {name!r}: init_from_arm {base!r}"
        if str(base) not in names[:i]:
            earlier = ", ".join(names[:i]) or "none (it is the first arm)"
            raise ConfigError(f"{where} is not an arm before it (each seed's runs train in the file's order); "
                              f"arms before it: {earlier}")
        train = overrides.get("train")
        if isinstance(train, dict) and train.get("init_from"):
            raise ConfigError(f"{where} and train.init_from both say where it starts; keep one")
        bases[str(name)] = str(base)
    return bases


def _arm_config(path: Path, name: str, overrides: Any, preset: str, seed: int, lists: list, out: Path) -> Config:
    where = f"{path}: arm {name!r}"
    if not FOLDER_NAME.fullmatch(str(name)):  # the run folder <name>-seed<N> must be one too
        raise ConfigError(f"{where}: an arm name becomes a folder name; use letters, digits, '.', '-' and '_', "
                          "not starting with '.'")
    overrides = dict(overrides or {}) if isinstance(overrides, dict) or overrides is None else overrides
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: the overrides must be a mapping of blocks (loss: {{head: aam}}), "
                          f"got {overrides!r}")
    owned = [k for k in OWNED if k in overrides or any(isinstance(v, dict) and k in v for v in overrides.values())]
    if owned:
        raise ConfigError(f"{where}: {', '.join(owned)} are set by the sweep (seeds:, lists:, --out); remove them")
    arm_preset = overrides.pop("preset", preset)
    overrides.pop("init_from_arm", None)  # _fine_tuning_bases
    try:
        cfg = load_config(arm_preset, overrides, seed=seed, name=f"{name}-seed{seed}", out_dir=str(out),
                          trial_lists=[str(x) for x in lists])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if cfg.train.nnodes != 1:
        raise ConfigError(f"{where}: nnodes {cfg.train.nnodes}: a sweep trains on one machine (devices: N there runs "
                          "each run on N ranks); train a multi-node run with torchrun on every node")
    return cfg


def _check_inputs(path: Path, name: str, cfg: Config, linked: bool = False) -> None:
    """The arm's noise and RIR folders hold audio and its init_from checkpoint reads (not that of an
    arm fine-tuning another arm's runs: `linked`, those are trained first)."""
    where = f"{path}: arm {name!r}"
    aug = cfg.augment
    try:
        if aug.enabled and aug.noise_dir:
            find_noises(aug.noise_dir)
        if aug.enabled and aug.rir_dir:
            find_rirs(aug.rir_dir)
        if cfg.train.init_from and not linked:
            read_checkpoint(resolve_checkpoint(cfg.train.init_from))
    except WorkbookError as err:
        raise type(err)(f"{where}: {err}") from None


def _check_data(path: Path, name: str, cfg: Config, lists: list[str]) -> None:
    """What only the data can tell (run_sweep calls it; load_sweep stays cheap): every noise and RIR
    file can be used, the validation list can be made and the test lists exist, so no run trains
    for an evaluation, or an arm, that cannot happen."""
    try:
        check_folders(cfg.augment, cfg.model.sample_rate)
        data_path = resolve_data_path(cfg.data)
        check_validation(cfg, data_path)
        for item in lists:
            listed = official_list_path(data_path, item)
            if not listed.is_file():
                fix = (f"the seed's layout keeps the official lists in {listed.parent}: put it there"
                       if item in OFFICIAL_LISTS
                       else f"give an existing file (a relative path is read from {Path.cwd()})")
                raise ConfigError(f"trial list {item}: {listed} does not exist; {fix}, or remove it from lists")
    except (ConfigError, AugmentError) as err:
        raise type(err)(f"{path}: arm {name!r}: {err}") from None


class SweepRunsFailed(WorkbookError):
    """Runs of a sweep failed (each named with its reason) after the others were trained and scored."""


# -- running ---------------------------------------------------------------------------------------
def _check_trained_on(path: Path, arm: str, cfg: Config,
                      corpora: dict[tuple[str, str, str, int], tuple[Path, tuple[int, float] | None]]) -> None:
    """A finished run is reused only while the arm's training data is the corpus it trained on
    (`data_changes`); each folder is scanned once per sweep (`corpora`). A training folder that is
    gone (scoring again on a machine with VoxCeleb1 only) cannot be checked: a warning says so."""
    key = (cfg.data.data_path, cfg.data.demo_size, cfg.data.train_dir, cfg.model.sample_rate)
    try:
        if key not in corpora:
            data_path = resolve_data_path(cfg.data)
            root = data_path / cfg.data.train_dir
            utts = (load_utterances(data_path, cfg.data.train_dir, sample_rate=cfg.model.sample_rate, progress=False)
                    if root.is_dir() else None)
            corpora[key] = root, None if utts is None else corpus_facts(utts, cfg.model.sample_rate)
    except WorkbookError as err:
        raise type(err)(f"{path}: arm {arm!r}: {err}") from None
    root, corpus = corpora[key]
    if corpus is None:
        warnings.warn(f"{path}: arm {arm!r}: {root} is not there, so whether the finished run {run_path(cfg).name} "
                      "trained on the arm's data is not checked", stacklevel=2)
        return
    changes = data_changes(run_path(cfg), *corpus)
    if changes:
        back = ("point data_path back" if cfg.data.data_path else
                "the built-in corpus changed (another demo_size or corpus version): set demo_size back")
        raise RunExistsError(f"{path}: arm {arm!r}: {changes} ({root}): its results would describe other data; "
                             f"{back}, or move {run_path(cfg)} elsewhere (or delete it) to train the arm on this data")


def _train_run(cfg: Config, log: Callable[[str], Any]) -> Path:
    """Train (or reuse, or resume) one arm x seed; returns its run folder."""
    folder = run_path(cfg)
    state = run_state(folder)
    if state == "finished":
        log(f"reuse   {folder.name} (finished)")
        return folder
    resume = state == "started"
    log(f"{'resume ' if resume else 'train  '} {folder.name}")
    cfg.train.resume, cfg.train.overwrite = resume, not resume
    if cfg.train.devices > 1:
        launch(cfg, cwd=Path.cwd())  # torchrun with one rank per device; paths as load_sweep checked them
    else:
        train(cfg)
    return folder


def _evaluate_run(folder: Path, cfg: Config, lists: list[str], progress: bool, which: str = "best") -> pd.DataFrame:
    """Evaluate a run's `which` model on `lists` with the arm's settings. Earlier results are reused
    while they come from the same model and settings and each list's file is the one they scored (a
    new corpus version rewrites the lists; a corpus moved elsewhere is the same); those of a model the
    run has since replaced are replaced; those of the same model scored otherwise (the arm's
    evaluation edited, or a user's own) are kept."""
    checkpoint = run_checkpoint(folder, which)
    out = default_out_dir(checkpoint)
    done = out / "metrics.json"
    meta = json.loads(done.read_text()) if done.is_file() else {}
    data_path = resolve_data_path(cfg.data)  # once: for the demo corpus it checks the whole tree
    identity = evaluation_identity(checkpoint, cfg, [data_path / d for d in cfg.data.eval_dirs])
    before = meta.get("identity") or {}
    if {**before, "roots": identity["roots"]} == identity:  # the arm's scoring (of a corpus perhaps since moved)
        rows = pd.DataFrame(meta.get("metrics", []))
        cosine = rows[rows["scoring"] == "cosine"] if "list_sha1" in rows else None
        scored = {} if cosine is None else dict(zip(cosine["list"], cosine["list_sha1"]))
        paths = [(list_tag(n), official_list_path(data_path, n)) for n in lists]
        if all(path.is_file() and scored.get(tag) == file_sha1(path) for tag, path in paths):
            return rows
    elif before.get("fingerprint") == identity["fingerprint"]:
        changed = identity_changes(before, identity)
        raise RunExistsError(f"{out} holds results of this model scored with other settings than the arm's "
                             f"(differing: {', '.join(changed)}); move that folder elsewhere to keep them, or "
                             "delete it, and run the sweep again to score the model with the arm's settings")
    return evaluate(checkpoint, cfg, lists, out, progress=progress, overwrite=bool(meta) and before != identity)


def run_sweep(sweep: str | Path | Sweep, out: str | Path | None = None, progress: bool = True,
              n_boot: int = 1000, seeds: list[int] | None = None, pick: str | None = None
              ) -> dict[str, pd.DataFrame]:
    """Train and evaluate every arm x seed (reusing what is done), then `summarise`. `sweep` is a
    sweep file, or the `Sweep` that `load_sweep` made of one (then `out`, `seeds`, `pick` are its)."""
    _check_n_boot(n_boot)
    if isinstance(sweep, Sweep) and (out, seeds, pick) != (None, None, None):
        raise ConfigError("give out, seeds and pick to load_sweep, which made this Sweep, not to run_sweep")
    spec = sweep if isinstance(sweep, Sweep) else load_sweep(sweep, out, seeds, pick)
    corpora: dict[tuple[str, str, str, int], tuple[Path, tuple[int, float] | None]] = {}
    for arm, by_seed in spec.configs.items():  # before anything trains; an arm with nothing to train has no need
        finished = {seed: run_state(run_path(cfg)) == "finished" for seed, cfg in by_seed.items()}
        to_train = [cfg for seed, cfg in by_seed.items() if not finished[seed]]
        if to_train:
            _check_data(spec.path, arm, to_train[0], spec.lists)
        for seed, cfg in by_seed.items():
            if finished[seed]:
                _check_trained_on(spec.path, arm, cfg, corpora)
    _check_own_folder(spec)
    spec.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.out / "sweep.yaml", spec.path.read_text())
    failed: dict[str, str] = {}  # run -> why: one diverged or out-of-memory run does not stop a night's sweep
    for seed in spec.seeds:  # seed-major: an interrupted sweep leaves every arm with as many seeds
        for arm, by_seed in spec.configs.items():
            try:
                folder = _train_run(by_seed[seed], print)
                _evaluate_run(folder, by_seed[seed], spec.lists, progress, spec.pick)
            except Exception as err:  # noqa: BLE001 - reported below and in summary.json; Ctrl-C still stops
                failed[f"{arm}-seed{seed}"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                print(f"failed  {arm}-seed{seed}: the sweep goes on with its other runs")
    tables = summarise(spec, n_boot, failed)
    if failed:
        raise SweepRunsFailed(
            f"{len(failed)} run(s) of {spec.path} failed; the tables in {spec.results} cover the others:\n"
            + "\n".join(f"  {name}: {why.splitlines()[0][:300]}" for name, why in failed.items())
            + f"\nFix the cause and run `{spec.command}` again: it retries these runs and reuses the rest (a run "
            "that stopped on a NaN loss resumes from its last epoch: delete its folder to train it anew)")
    return tables


def _check_own_folder(spec: Sweep) -> None:
    """Refuse a folder holding the tables another sweep file wrote (two files of one name in different
    folders share the default folder), for any choice of model (DIR, DIR/<choice>/): this sweep would
    overwrite DIR/sweep.yaml and take that sweep's runs of arms of the same names for its own."""
    for done in (spec.out / "summary.json", *sorted(spec.out.glob("*/summary.json"))):
        try:
            other = Path(json.loads(done.read_text())["sweep"]) if done.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            other = None  # unreadable tables: this sweep writes them again
        if other is not None and other.is_file() and other.resolve() != spec.path.resolve():
            raise RunExistsError(f"{done.parent} holds the tables of the sweep {other}, not of {spec.path}; give "
                                 "this sweep a folder of its own (--out, or the notebook's out_dir), or delete "
                                 f"{done} to let it write its tables there")


def _check_n_boot(n_boot: int) -> None:
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ConfigError(f"n_boot={n_boot!r}: the bootstrap needs at least 1 resample (1000 is usual)")


def _runs_table(spec: Sweep, n_boot: int) -> tuple[pd.DataFrame, dict[str, dict[str, list[np.ndarray]]], list[str]]:
    rows, trials, missing, first_scored, moved = [], {}, [], {}, {}
    for arm, by_seed in spec.configs.items():
        for seed, cfg in by_seed.items():
            run = run_path(cfg)
            out = _eval_dir(run, spec.pick)
            if out is None or not (out / "metrics.json").is_file():  # not trained or evaluated yet
                missing.append(f"{arm}-seed{seed}")
                continue
            meta = json.loads((out / "metrics.json").read_text())
            recorded = meta.get("data_path") or ""  # where the corpus was when the run was scored
            if not (recorded and Path(recorded).is_dir()):  # moved since: where the arm finds it now
                if cfg.data.data_path not in moved:
                    moved[cfg.data.data_path] = resolve_data_path(cfg.data)
                recorded = moved[cfg.data.data_path]
            metrics, voices = pd.DataFrame(meta["metrics"]), base_voices(recorded)
            method = "asnorm" if cfg.evaluation.asnorm else "cosine"  # what the arm says its runs are scored with
            for tag in spec.lists:
                tag = list_tag(tag)
                found = metrics[(metrics["list"] == tag) & (metrics["scoring"] == method)]
                if found.empty:
                    raise MissingPathError(f"{out / 'metrics.json'} holds no {method} result of list {tag}; run "
                                           f"`{spec.command}`: it scores every run on the sweep's lists")
                m = found.iloc[0]
                sha = m["list_sha1"] if isinstance(m.get("list_sha1"), str) else ""
                other, first = first_scored.setdefault(tag, (sha, f"{arm}-seed{seed}"))
                if other != sha:  # never an interval over runs scored on different lists
                    raise WorkbookError(f"{spec.out}: {arm}-seed{seed} scored another version of list {tag} than "
                                        f"{first} (the corpus changed between them, or one recorded none); run "
                                        f"`{spec.command}` again: it scores every run on the lists there are now")
                scores_file = _scores_file(out, tag, method)
                scores = load_scores(scores_file)
                data = scores[["score", "label"]].to_numpy(float)
                low, high = bootstrap_eer(data[:, 0], data[:, 1], n_boot, seed=seed)
                spk = both = (float("nan"), float("nan"))
                if "enroll" in scores:
                    enroll, test = (_voices(scores[side], voices) for side in ("enroll", "test"))
                    spk = bootstrap_eer(data[:, 0], data[:, 1], n_boot, seed=seed, groups=enroll)
                    both = bootstrap_eer(data[:, 0], data[:, 1], n_boot, seed=seed, groups=enroll, test_groups=test)
                rows.append({"arm": arm, "seed": seed, "list": tag, "eer": 100 * m["eer"],
                             "eer_boot_low": 100 * low, "eer_boot_high": 100 * high,
                             "eer_spk_low": 100 * spk[0], "eer_spk_high": 100 * spk[1],
                             "eer_spk_both_low": 100 * both[0], "eer_spk_both_high": 100 * both[1],
                             "min_dcf_0.01": m["min_dcf_0.01"], "trials": int(m["trials"]), "run": str(run),
                             "list_sha1": sha, "scores": os.path.relpath(scores_file, spec.results),
                             "scoring": method})
                trials.setdefault(tag, {}).setdefault(arm, []).append(data)
    if missing:
        warnings.warn(f"{spec.out}: {len(missing)} run(s) not finished yet, left out of the summary: "
                      f"{', '.join(missing)}; run `{spec.command}` to finish them", stacklevel=3)
    if not rows:
        raise MissingPathError(f"{spec.out}: no run of this sweep is finished yet; run `{spec.command}`")
    return pd.DataFrame(rows), trials, missing


def _voices(keys: pd.Series, voices: dict[str, str]) -> np.ndarray:
    """The speaker of each utterance key, as its base voice where the corpus names one (`base_voices`)."""
    return keys.map(speaker_of).map(lambda spk: voices.get(spk, spk)).to_numpy()


def _eval_dir(run: Path, which: str) -> Path | None:
    """Where the sweep evaluated a run's `which` model, making nothing (None: the run is not finished)."""
    if run_state(run) != "finished":
        return None
    try:
        return default_out_dir(run_checkpoint(run, which, make=False))
    except RunNotFoundError:  # fewer epoch models than the choice needs: never evaluated
        return None


def _scores_file(out: Path, tag: str, method: str) -> Path:
    """A run's score file of one list and scoring: the one with the trial names when the evaluation
    wrote it (the test speakers of the speaker bootstrap, the analysis notebook's players)."""
    stem = score_stem(tag, method)
    names = out / f"{stem}_names.txt"
    return names if names.is_file() else out / f"{stem}.txt"


def _training_table(runs: pd.DataFrame) -> pd.DataFrame:
    """How each run trained, from its history.json: what says whether a recipe still learns, how
    much its validation EER moves from epoch to epoch (so how much luck the best epoch holds) and
    whether it memorises its training speakers. EERs in %."""
    rows = []
    for (arm, seed, run), _ in runs.groupby(["arm", "seed", "run"], sort=False):
        history = json.loads((Path(run) / "history.json").read_text())
        val = np.array([h["val_eer"] for h in history], dtype=float) * 100
        half = val[len(val) // 2:]
        best = best_epoch(history)
        rows.append({"arm": arm, "seed": seed, "epochs": len(history), "best_epoch": best.get("epoch"),
                     "best_val_eer": 100 * best["val_eer"] if best else np.nan,
                     "val_eer_last10": float(np.nanmean(val[-10:])),
                     "val_eer_step_median": float(np.nanmedian(np.abs(np.diff(half)))) if len(half) > 1 else np.nan,
                     "train_accuracy": history[-1].get("accuracy", np.nan),
                     "epoch_seconds_median": float(np.nanmedian([h.get("epoch_seconds", np.nan) for h in history])),
                     "run": run})
    return pd.DataFrame(rows)


def summarise(spec: Sweep, n_boot: int = 1000, failed: dict[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """runs.csv, summary.csv/.json, paired.csv, training.csv and det_<list>.png under the sweep folder;
    returns the tables. `failed`: the runs run_sweep could not train or score, and why (summary.json)."""
    _check_n_boot(n_boot)
    _check_own_folder(spec)
    runs, trials, missing = _runs_table(spec, n_boot)
    summary, paired = [], []
    base = spec.arms[0]
    for (arm, tag), group in runs.groupby(["arm", "list"], sort=False):
        eer_m, eer_lo, eer_hi = t_interval(group["eer"])
        dcf_m, dcf_lo, dcf_hi = t_interval(group["min_dcf_0.01"])
        summary.append({"arm": arm, "list": tag, "n_seeds": len(group), "eer_mean": eer_m, "eer_ci_low": eer_lo,
                        "eer_ci_high": eer_hi, "min_dcf_0.01_mean": dcf_m, "min_dcf_0.01_ci_low": dcf_lo,
                        "min_dcf_0.01_ci_high": dcf_hi})
        if arm != base:
            ref = runs[(runs["arm"] == base) & (runs["list"] == tag)].set_index("seed")["eer"]
            mine = group.set_index("seed")["eer"]
            common = sorted(set(ref.index) & set(mine.index))
            diff, lo, hi = paired_difference(ref[common], mine[common])
            paired.append({"arm": arm, "baseline": base, "list": tag, "n_pairs": len(common), "eer_diff": diff,
                           "eer_diff_ci_low": lo, "eer_diff_ci_high": hi,
                           "relative_change_percent": 100 * diff / ref[common].mean()})
    tables = {"runs": runs, "summary": pd.DataFrame(summary), "paired": pd.DataFrame(paired),
              "training": _training_table(runs)}
    for name, table in tables.items():
        with atomic_open(spec.results / f"{name}.csv", "w") as f:
            table.to_csv(f, index=False)
    records = {k: json.loads(t.to_json(orient="records", double_precision=15)) for k, t in tables.items()}  # NaN: null
    atomic_write_text(spec.results / "summary.json", json.dumps(
        {"sweep": str(spec.path.resolve()), "seeds": spec.seeds, "lists": spec.lists, "pick": spec.pick,
         "baseline": base, "unfinished": missing, "failed": failed or {}, "confidence": 0.95, "eer_unit": "percent",
         **records}, indent=1))
    for old in spec.results.glob("det_*.*"):  # figures of lists the sweep no longer scores
        if old.stem.removeprefix("det_") not in trials and old.suffix in (".png", ".svg"):
            old.unlink()
    for tag, arms in trials.items():
        fig = det_seeds_plot({arm: [(p[:, 0], p[:, 1]) for p in parts] for arm, parts in arms.items()})
        fig.axes[0].set_title(f"{spec.path.stem}: list {tag}" + ("" if spec.pick == "best"
                                                                  else f", {spec.pick} models"))
        save_figure(fig, spec.results, f"det_{tag}")
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rawnet_lib.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (seeds, lists, arms) or a name in params/sweeps/")
    parser.add_argument("--out", "--out_dir", dest="out", default=None,
                        help="sweep folder (default outputs/sweeps/<sweep name>; relative: the repository's)")
    parser.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples per run and list")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="these seeds instead of the file's (e.g. 1 2 3 4 5 to add two to a 3-seed sweep); "
                             "the tables also cover every other seed finished in DIR")
    parser.add_argument("--pick", default=None, help=f"the model of each run to score instead of the file's "
                                                     f"choice: {CHECKPOINT_CHOICES}; tables go to DIR/<choice>/")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # the old name of --pick
    args = parser.parse_args(argv)
    if args.checkpoint:
        parser.error(f"--checkpoint is now --pick (--pick {args.checkpoint}), as in python -m rawnet_lib.evaluate")
    tables = run_sweep(args.sweep, args.out, n_boot=args.n_boot, seeds=args.seeds, pick=args.pick)
    print(tables["summary"].to_string(index=False))
    if not tables["paired"].empty:
        print(tables["paired"].to_string(index=False))


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: run the same command again to continue the sweep")
