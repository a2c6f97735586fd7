"""One typed configuration for notebooks and command line, loaded from YAML.

Layers, later wins: dataclass defaults (the reference RawNet2 recipe) -> the preset YAML in
`params/` -> YAML blocks (`model:`, `data:`, `optim:`, `train:`, `evaluation:`, as papermill
injects them with `-f params/x.yaml`) -> flat overrides (`devices=8`, `data_path=...`).
Unknown keys raise, because papermill only warns about them and a misspelt option would
otherwise vanish silently.

Notebooks and command lines reach the same layers through one door each: `notebook_config`
(the parameters papermill injected, checked against those the notebook declares) and
`cli_parser` / `cli_config` (one flag per field, generated from the dataclasses).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Mapping

import yaml

from rawnet_lib.dataset.audio import SAMPLE_RATE
from rawnet_lib.errors import WorkbookError

__all__ = [
    "ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "EvalConfig", "LossConfig", "AugmentConfig", "Config",
    "BLOCK_NAMES", "PARAMS_DIR", "RENAMED", "REPO_DIR", "RUN_CONTROL", "ConfigError", "load_config", "recipe_changes",
    "preset_path", "repo_path", "input_path", "read_yaml", "write_f_params", "declared_parameters", "notebook_config",
    "cli_parser", "cli_config", "cli_overrides", "with_overrides", "pooling_blocks", "stage_frames",
]


def _workspace() -> Path:
    """Where `outputs/` lives: the source checkout the package is imported from (an editable
    install, PYTHONPATH, torchrun's ranks), else the nearest folder at or above the working
    directory holding `notebooks/` (a checkout used with a regular `pip install .`; papermill
    runs notebooks inside `notebooks/`), else the working directory itself."""
    source = Path(__file__).resolve().parents[1]
    if (source / "pyproject.toml").is_file():
        return source
    cwd = Path.cwd()
    return next((d for d in (cwd, *cwd.parents) if (d / "notebooks").is_dir() and (d / "params").is_dir()), cwd)


REPO_DIR = _workspace()
# The presets are package data (rawnet_lib/params/*.yaml; `params/` at the top of the checkout
# links to them, for `papermill -f params/x.yaml`), so a regular install finds them too.
PARAMS_DIR = Path(os.fspath(resources.files("rawnet_lib") / "params"))
BLOCK_NAMES = ("model", "data", "optim", "train", "evaluation", "loss", "augment")
# Names of notebook parameters and sweep keys since made one across the workbook: an old name is
# told its new one where that is declared (every output folder is `out_dir`, a run's model `pick`).
RENAMED = {"figures_dir": "out_dir", "out": "out_dir", "batch": "batch_size", "checkpoint": "pick"}
HEADS = ("softmax", "am", "aam")
# Fields that only act under some values of another field: {field: (that field, those values)}.
# The augmentation folders are left out: a shared base YAML may name them for the arms that augment.
_ONLY_WITH: dict[str, tuple[str, tuple[Any, ...]]] = {
    **dict.fromkeys(("margin", "scale", "margin_schedule", "add_ce"), ("head", ("am", "aam"))),
    "easy_margin": ("head", ("aam",)),
    **dict.fromkeys(("momentum", "nesterov"), ("optimizer", ("sgd",))),
    "amsgrad": ("optimizer", ("adam", "adamw")),
    "keras_decay": ("lr_decay", ("keras",)),
    "min_lr": ("lr_decay", ("cosine", "sgdr")),
    "lr_gamma": ("lr_decay", ("exponential", "step")),
    "step_epochs": ("lr_decay", ("step",)),
    **dict.fromkeys(("restart_epochs", "restart_mult"), ("lr_decay", ("sgdr",))),
    **dict.fromkeys(("noise_prob", "rir_prob", "snr_noise", "snr_music", "snr_babble", "babble_files"),
                    ("enabled", (True,))),
    **dict.fromkeys(("asnorm_top_k", "asnorm_cohort"), ("asnorm", (True,))),
    "perf_steps": ("mode", ("performance",)),
}
LR_SCHEDULES = ("keras", "none", "cosine", "exponential", "step", "sgdr")
OPTIMIZERS = ("adam", "adamw", "sgd")


class ConfigError(WorkbookError, ValueError):
    """A configuration value or key the workbook cannot use; the message says the fix."""


@dataclass
class ModelConfig:
    """RawNet2 architecture; defaults are the paper / reference model."""
    n_samples: int = 59049          # crop length (3^10); also the size of the `ln` layer
    sample_rate: int = SAMPLE_RATE  # the audio every file must have (VoxCeleb: 16 kHz)
    sinc_filters: int = 128         # SincNet band-pass filters in `first_conv`
    sinc_kernel: int = 251          # taps of each sinc filter (odd)
    blocks: list[int] = field(default_factory=lambda: [128, 128, 256, 256, 256, 256])
    block_pool: list[bool] = field(default_factory=list)  # per block: max-pool by 3 at its end; [] every block
    gru_units: int = 1024
    gru_layers: int = 1
    embedding_dim: int = 1024       # `fc1_gru` output, the speaker embedding
    layer_norm: bool = True         # the reference's learnable affine norm over time (fixes length)
    fast: bool = False              # fast path (cheaper sinc filtering); false = exact reference maths


def pooling_blocks(cfg: ModelConfig) -> list[bool]:
    """Whether each residual block max-pools by 3: `block_pool`, or every block ([], the reference)."""
    return cfg.block_pool or [True] * len(cfg.blocks)


def stage_frames(cfg: ModelConfig, n_samples: int | None = None) -> list[tuple[str, int]]:
    """Time frames after each stage, e.g. 59049 -> 58799 -> 19599 -> ... -> 26 GRU steps (here, not in
    the model's module, so that validation can refuse a crop that leaves the GRU no frame)."""
    t = n_samples or cfg.n_samples
    stages = [("input", t), ("first_conv", t := t - cfg.sinc_kernel + 1), ("first pool", t := t // 3)]
    for i, pool in enumerate(pooling_blocks(cfg)):
        stages.append((f"block{i}", t := t // 3 if pool else t))
    return stages


@dataclass
class DataConfig:
    """Where the audio and lists are; an empty data_path means the built-in demo corpus."""
    data_path: str = ""                         # folder holding VoxCeleb1/ and VoxCeleb2/ (the seed's DB/)
    demo_size: str = "demo"                     # demo corpus size used when data_path is empty
    train_dir: str = "VoxCeleb2/wav"            # training utterances, spk/video/utt.wav
    eval_dirs: list[str] = field(default_factory=lambda: ["VoxCeleb1/eval_wav", "VoxCeleb1/dev_wav"])
    val_trials: str = "VoxCeleb1/veri_test.txt" # per-epoch validation list (reference: Vox1-O)
    val_from: str = "VoxCeleb1/dev_wav"         # held-out folder for a generated val_trial.txt
    val_pairs: int = 2000                       # trials in a generated val_trial.txt
    num_workers: int = 2                        # data-loader workers per rank
    on_bad_audio: str = "stop"                  # stop | skip: what training does with unreadable files
    min_seconds: float = 1.0                    # the check warns about files shorter than this
    speed_perturb: list[float] = field(default_factory=lambda: [1.0])  # speed factors; each a new speaker


@dataclass
class OptimConfig:
    """Adam with amsgrad and the per-iteration "keras" decay, as the reference."""
    lr: float = 1e-3
    weight_decay: float = 1e-4      # not applied to batch-norm parameters
    amsgrad: bool = True
    lr_decay: str = "keras"         # keras: lr / (1 + keras_decay * step) | none | cosine | exponential | step | sgdr
    keras_decay: float = 1e-4
    optimizer: str = "adam"         # adam | adamw | sgd
    momentum: float = 0.9           # sgd only
    nesterov: bool = False          # sgd only
    warmup_epochs: float = 0.0      # linear warm-up from 0, per iteration, before any lr_decay
    min_lr: float = 5e-6            # the floor of cosine and sgdr (RawNet2-modified: 5e-6)
    lr_gamma: float = 0.75          # exponential / step: lr *= gamma per epoch / per step_epochs
    step_epochs: int = 1            # step: epochs between decays (voxceleb_trainer: its test_interval, 10)
    restart_epochs: int = 10        # sgdr: epochs of the first cosine cycle
    restart_mult: int = 1           # sgdr: each cycle this many times longer than the one before


@dataclass
class TrainConfig:
    """The run: how long, on what, where results go."""
    name: str = "rawnet2"
    epochs: int = 80
    batch_size: int = 100           # global batch, split evenly across ranks
    devices: int = 1                # processes (one per accelerator; gloo ranks on CPU)
    device: str = "auto"            # auto | cpu | cuda | npu
    amp: str = "off"                # off | bf16 | fp16
    mode: str = "full"              # full: train + evaluate | performance: fixed steps, speed only
    perf_steps: int = 50            # steps measured in performance mode
    warmup_steps: int = 5           # first steps excluded from throughput figures
    seed: int = 1234
    out_dir: str = "outputs/train"  # runs go to <out_dir>/train_<devices>P/DNNS/<name>/
    resume: bool = False
    overwrite: bool = False
    profile: bool = False           # torch.profiler trace of a few steps into prof/
    save_every_epoch: bool = True   # models/TA_<epoch>_<eer>.pt besides the best model
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    init_from: str = ""             # start from these weights only (a .pt, or a run folder: its best model)


@dataclass
class EvalConfig:
    """Test-time embedding and scoring."""
    crop_mode: str = "reference"    # reference: averaged fixed crops | full: whole utterance
    eval_hop: int = 47239           # hop between test crops (overlap 11,810 at 59,049 samples)
    eval_batch_size: int = 32       # crops per forward pass
    trial_lists: list[str] = field(default_factory=lambda: ["O"])  # O, E, H; O2/E2/H2 cleaned
    asnorm: bool = False
    asnorm_top_k: int = 100
    asnorm_cohort: int = 1000       # training utterances in the cohort


@dataclass
class LossConfig:
    """The classification head and its loss; softmax is the reference (numerically unchanged)."""
    head: str = "softmax"           # softmax | am (additive margin) | aam (additive angular margin)
    margin: float = 0.2             # am: cos - m; aam: cos(theta + m) at the target class
    scale: float = 30.0             # am / aam: logits are scale * cosine
    margin_schedule: list[int] = field(default_factory=list)  # [first, last] epoch: margin 0 -> margin
    add_ce: bool = False            # am / aam: add cross-entropy of the plain scaled cosines
    easy_margin: bool = False       # aam: margin only where cos(theta) > 0 (ArcFace's easy margin)


@dataclass
class AugmentConfig:
    """Additive noise (MUSAN layout) and reverberation (RIRS_NOISES layout) of training crops."""
    enabled: bool = False           # off: the reference recipe (no augmentation)
    noise_dir: str = ""             # folder with noise/ music/ speech/ (MUSAN); empty = built-in set
    rir_dir: str = ""               # folder of room impulse responses (RIRS_NOISES); empty = built-in set
    noise_prob: float = 0.5         # share of crops with additive noise
    rir_prob: float = 0.5           # share of crops with reverberation
    snr_noise: list[float] = field(default_factory=lambda: [0.0, 15.0])  # dB range, noise/
    snr_music: list[float] = field(default_factory=lambda: [5.0, 15.0])  # dB range, music/
    snr_babble: list[float] = field(default_factory=lambda: [13.0, 20.0])  # dB range, speech/ babble
    babble_files: list[int] = field(default_factory=lambda: [3, 7])  # speech files per babble, range
    sets_dir: str = "outputs/augment_sets"  # where the built-in sets are made on first use


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preset: str = ""

    def flat(self) -> dict[str, Any]:
        """Every parameter by its (unique) field name, in block order."""
        return {f.name: getattr(block, f.name) for block in self.blocks().values()
                for f in dataclasses.fields(block)}

    def blocks(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "optim": self.optim,
                "train": self.train, "evaluation": self.evaluation, "loss": self.loss, "augment": self.augment}

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, **{k: dataclasses.asdict(v) for k, v in self.blocks().items()}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """The inverse of `to_dict` (the config a checkpoint or an export carries), validated."""
        config = load_config(None, {k: v for k, v in values.items() if k != "preset"})
        config.preset = str(values.get("preset", ""))
        return config

    def validate(self) -> "Config":
        choices = {("train", "amp"): ("off", "bf16", "fp16"), ("train", "mode"): ("full", "performance"),
                   ("train", "device"): ("auto", "cpu", "cuda", "npu"),
                   ("optim", "lr_decay"): LR_SCHEDULES, ("data", "on_bad_audio"): ("stop", "skip"),
                   ("evaluation", "crop_mode"): ("reference", "full"), ("loss", "head"): HEADS,
                   ("optim", "optimizer"): OPTIMIZERS}
        for (block, key), allowed in choices.items():
            value = getattr(getattr(self, block), key)
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
        flat = self.flat()
        for key in ("epochs", "batch_size", "devices", "nnodes", "n_samples", "sample_rate", "sinc_filters",
                    "sinc_kernel", "gru_units", "gru_layers", "embedding_dim", "eval_batch_size", "eval_hop",
                    "perf_steps", "val_pairs", "asnorm_top_k", "asnorm_cohort"):
            if flat[key] < 1:
                raise ConfigError(f"{key}={flat[key]} must be at least 1")
        for key in ("num_workers", "warmup_steps", "node_rank", "weight_decay", "keras_decay", "momentum",
                    "min_seconds"):
            if not flat[key] >= 0:
                raise ConfigError(f"{key}={flat[key]} must be 0 or more")
        if not (math.isfinite(self.optim.lr) and self.optim.lr > 0):
            raise ConfigError(f"lr={self.optim.lr} must be a positive number, e.g. 1e-3")
        if self.train.node_rank >= self.train.nnodes or not 1 <= self.train.master_port <= 65535:
            raise ConfigError(f"node_rank={self.train.node_rank}, nnodes={self.train.nnodes}, "
                              f"master_port={self.train.master_port}: node_rank counts from 0 to nnodes - 1 and "
                              "the port is between 1 and 65535")
        if any(width < 1 for width in self.model.blocks):
            raise ConfigError(f"blocks={self.model.blocks}: every block needs at least 1 filter")
        if not self.evaluation.trial_lists:
            raise ConfigError("trial_lists=[] names no list to score; use e.g. [O] or [O, E, H]")
        ranks = self.train.devices * self.train.nnodes
        if not 0 <= self.train.seed <= 2**32 - ranks:  # numpy takes 32-bit seeds; each rank seeds with seed + rank
            raise ConfigError(f"seed={self.train.seed} must be between 0 and 2**32 - {ranks} (rank r seeds with "
                              "seed + r)")
        if self.model.sinc_kernel % 2 == 0:
            raise ConfigError(f"sinc_kernel={self.model.sinc_kernel} must be odd (symmetric filters)")
        if not self.model.blocks:
            raise ConfigError("blocks must list at least one block width, e.g. [128, 128, 256]")
        if self.model.block_pool and len(self.model.block_pool) != len(self.model.blocks):
            raise ConfigError(f"block_pool={self.model.block_pool} needs one true/false per block of blocks="
                              f"{self.model.blocks} ({len(self.model.blocks)}), or [] to pool after every block")
        if stage_frames(self.model)[-1][1] < 1:  # else max_pool1d fails at the first training step
            pools = 1 + sum(pooling_blocks(self.model))
            raise ConfigError(f"n_samples={self.model.n_samples} leaves the GRU no time frame: the sinc layer takes "
                              f"sinc_kernel - 1 samples, then {pools} max-pools divide by 3; use n_samples of at least "
                              f"{3 ** pools + self.model.sinc_kernel - 1}, or fewer pooling blocks (block_pool)")
        for item in self.evaluation.trial_lists:
            if item not in ("O", "E", "H", "O2", "E2", "H2") and not item.endswith(".txt"):
                raise ConfigError(f"trial list {item!r}: use O, E, H (O2, E2, H2 cleaned) or a .txt path")
        for key, value in flat.items():  # YAML reads .nan and .inf as floats; no field can use them
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{key}={value} must be a finite number")
        self._validate_recipe()
        return self

    def _validate_recipe(self) -> None:
        """The loss, augmentation, speed and schedule fields (issue 12)."""
        loss, aug, optim = self.loss, self.augment, self.optim
        if loss.scale <= 0 or loss.margin < 0:
            raise ConfigError(f"scale={loss.scale}, margin={loss.margin}: the scale must be positive, the margin >= 0")
        if loss.head == "aam" and loss.margin >= math.pi / 2:
            raise ConfigError(f"margin={loss.margin}: an angular margin is in radians and must stay below pi/2 "
                              "(published ones are 0.2-0.5)")
        schedule = loss.margin_schedule
        if schedule and (len(schedule) != 2 or not 0 <= schedule[0] <= schedule[1]):
            raise ConfigError(f"margin_schedule={schedule} must be [first_epoch, last_epoch] with "
                              "0 <= first <= last, or [] for a constant margin")
        if not self.data.speed_perturb or any(f <= 0 for f in self.data.speed_perturb) \
                or len(set(self.data.speed_perturb)) != len(self.data.speed_perturb):
            raise ConfigError(f"speed_perturb={self.data.speed_perturb} must list distinct positive factors, "
                              "e.g. [0.9, 1.0, 1.1], or [1.0] for none")
        for name in ("snr_noise", "snr_music", "snr_babble", "babble_files"):
            pair = getattr(aug, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(f"{name}={pair} must be a range [low, high] with low <= high")
        if aug.babble_files[0] < 1:
            raise ConfigError(f"babble_files={aug.babble_files}: a babble needs at least 1 speech file")
        for name in ("noise_prob", "rir_prob"):
            if not 0 <= getattr(aug, name) <= 1:
                raise ConfigError(f"{name}={getattr(aug, name)} must be a probability between 0 and 1")
        if optim.warmup_epochs < 0 or optim.min_lr < 0 or not 0 < optim.lr_gamma <= 1:
            raise ConfigError(f"warmup_epochs={optim.warmup_epochs}, min_lr={optim.min_lr}, lr_gamma={optim.lr_gamma}: "
                              "warm-up and min_lr must be >= 0 and lr_gamma in (0, 1]")
        if optim.optimizer == "sgd" and optim.nesterov and optim.momentum <= 0:
            raise ConfigError(f"nesterov: true needs momentum > 0 (momentum={optim.momentum})")
        for name in ("step_epochs", "restart_epochs", "restart_mult"):
            if getattr(optim, name) < 1:
                raise ConfigError(f"{name}={getattr(optim, name)} must be at least 1")


# Where and how a run executes rather than what it learns: these may differ when a run is resumed
# (another machine or node split, precision, test-time setting); no other field may.
RUN_CONTROL = frozenset({
    "name",  # the run folder is the run: a copied or renamed one resumes as itself
    "eval_dirs", "num_workers", "on_bad_audio", "min_seconds", "fast", "devices", "device", "amp", "mode",
    "perf_steps", "warmup_steps", "out_dir", "resume", "overwrite", "profile", "save_every_epoch", "nnodes",
    "node_rank", "master_addr", "master_port", "sets_dir", *(f.name for f in dataclasses.fields(EvalConfig))})
# Folders may move; the built-in data ("") against a folder of one's own is another recipe.
_FOLDERS = ("data_path", "noise_dir", "rir_dir")


def recipe_changes(saved: Mapping[str, Any], config: Config, allow: Collection[str] = (),
                   also: Collection[str] = ()) -> list[str]:
    """The fields in which `config` would train something other than the run whose `config.yaml` held
    `saved` (RUN_CONTROL and `allow` aside, the RUN_CONTROL fields in `also` counted), as
    `name: run's value -> this value`."""
    before, now = Config.from_dict(saved).flat(), config.flat()

    def changed(key: str) -> bool:
        if key in _FOLDERS:
            return bool(before[key]) != bool(now[key])
        return (key in also or key not in RUN_CONTROL and key not in allow) and before[key] != now[key]
    return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in now if changed(k)]


def repo_path(path: str | Path) -> Path:
    """A path a notebook or command names: relative ones are the repository's (where `outputs/`
    is), as `out_dir` is, wherever the kernel or the shell started."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_DIR / path


def input_path(path: str | Path) -> Path:
    """A file or folder a notebook or command reads: a relative one from the working folder when
    it is there (a shell's), else the repository's when it is there (a notebook's kernel runs in
    notebooks/), else as given, for the error that names it."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (REPO_DIR / path).exists():
        return path
    return REPO_DIR / path


def preset_path(preset: str | Path) -> Path:
    """A preset name (`demo`) or a YAML path -> the YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not _is_file(path):
            raise ConfigError(f"config file {path} does not exist")
        return path
    path = PARAMS_DIR / f"{preset}.yaml"
    if not _is_file(path):
        names = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(names)} or give a .yaml path")
    return path


def _is_file(path: Path) -> bool:
    """is_file, False for a name the file system cannot hold (too long), as for any missing file."""
    try:
        return path.is_file()
    except OSError:
        return False


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may repeat on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, holds: str = "a mapping of blocks (model:, data:, ...)") -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); ConfigError naming the file (and line) otherwise."""
    try:
        with open(path, encoding="utf-8") as stream:  # a stream: the error's line names the file
            data = yaml.load(stream, Loader=_StrictLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        tabs = " (indent with spaces: YAML does not allow tabs)" if "'\\t'" in str(err) else ""
        raise ConfigError(f"{path} is not valid YAML{tabs}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold {holds}, not {type(data).__name__}")
    return data


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML / papermill value to the field's type (YAML reads `1e-3` as a string)."""
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(name, v, item) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in the config")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif hint in (int, float) and not isinstance(value, bool):
        if isinstance(value, (int, float)) and (hint is float or float(value).is_integer()):
            return hint(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return hint(value)  # YAML reads `1e-3` as a string
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    raise ConfigError(f"{name}={value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _apply(config: Config, values: Mapping[str, Any], where: str) -> list[str]:
    """Set fields from a flat mapping, or `block: {field: value}` sub-mappings; returns the fields set."""
    blocks, owner = config.blocks(), _owners(config)
    done: list[str] = []
    for key, value in values.items():
        if key == "preset":
            continue
        if key in blocks:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: block {key!r} must be a mapping of fields, got {value!r}")
            for sub, subvalue in value.items():
                if owner.get(sub) != key:
                    if sub in owner:
                        raise ConfigError(f"{where}: {sub!r} is a field of the {owner[sub]}: block, not of {key}:; "
                                          f"move it there")
                    _unknown(f"{key}.{sub}", [f.name for f in dataclasses.fields(blocks[key])], where, key)
                done.append(_set(blocks[key], sub, subvalue, where))
        elif key in owner:
            if value is not None:   # None in a notebook parameter means "keep the preset's value"
                done.append(_set(blocks[owner[key]], key, value, where))
        else:
            _unknown(key, list(owner) + list(blocks), where)
    return done


def _owners(config: Config) -> dict[str, str]:
    """Each field's block (`{"margin": "loss", ...}`); field names are unique across blocks."""
    return {f.name: name for name, block in config.blocks().items() for f in dataclasses.fields(block)}


def _set(block: Any, name: str, value: Any, where: str) -> str:
    hints = typing.get_type_hints(type(block))
    try:
        setattr(block, name, _coerce(name, value, hints[name]))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return name


def _unknown(key: Any, valid: list[str], where: str, block: str = "") -> typing.NoReturn:
    """The error of an unknown name: the closest valid ones, and all of them when there are few
    (a block's fields) or none is close."""
    key = str(key)  # YAML keys can be numbers, booleans or dates (`1: 2`)
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if block or not close:
        hint += f"{';' if not close else ''} valid keys{f' of {block}' if block else ''}: {', '.join(valid)}"
    raise ConfigError(f"{where}: unknown parameter {key!r}{hint}")


def load_config(preset: str | Path | Config | None = "demo", blocks: Mapping[str, Any] | None = None,
                **overrides: Any) -> Config:
    """Build the run's config: defaults, then the preset YAML, then `blocks`, then `overrides`.

    `preset` may also be a Config (a checkpoint's) to start from instead of defaults and YAML.

    >>> load_config("paper", devices=8).train.devices
    8
    """
    if blocks is not None and not isinstance(blocks, Mapping):
        # `blocks` is also the model field (block widths, `--blocks [64, 64]` on the command line).
        overrides = {"blocks": blocks, **overrides}
        blocks = None
    config = Config()
    layers: list[tuple[str, list[str]]] = []  # (where, the fields it set), in the order applied
    if isinstance(preset, Config):
        config = copy.deepcopy(preset)
    elif preset:
        config.preset = _apply_preset(config, preset, layers)
    n_files = len(layers)
    for values, where in ((dict(blocks or {}), "YAML blocks"), (overrides, "parameters")):
        layers.append((where, _apply(config, values, where)))
    last = {name: i for i, (_, names) in enumerate(layers) for name in names}  # field -> the layer that set it last
    try:
        config.validate()
    except ConfigError as err:
        from_file = {name: layers[i][0] for name, i in last.items() if i < n_files}  # values a preset file gave
        sources = {from_file.get(key) for key in re.findall(r"(\w+)=", str(err))}
        where = sources.pop() if len(sources) == 1 else None  # every value it names came from one file
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    _refuse_ruled_out(config, layers, last)
    return config


def _refuse_ruled_out(config: Config, layers: list[tuple[str, list[str]]], last: Mapping[str, int]) -> None:
    """Refuse a field that the choice it belongs to rules out (`margin` under `head: softmax`):
    training would ignore it without a word. Only a value set after the choice counts, so a preset's
    margin left over when a later layer (a sweep arm, a flag) switches the head to softmax is no
    error, nor one set in the same layer as the choice (a run's config.yaml names every field)."""
    def word(value: Any) -> str:  # as YAML writes it: true, not True
        return str(value).lower() if isinstance(value, bool) else str(value)

    owner, flat = _owners(config), config.flat()
    for name, (choice, allowed) in _ONLY_WITH.items():
        if flat[choice] not in allowed and last.get(name, -1) > last.get(choice, -1):
            needed = " or ".join(map(word, allowed))
            field_name, choice_name = f"{owner[name]}.{name}", f"{owner[choice]}.{choice}"
            raise ConfigError(f"{layers[last[name]][0]}: {field_name} acts only with {choice_name}: {needed}, not "
                              f"{word(flat[choice])}, so it would be ignored; set {choice_name}: {needed}, or remove "
                              f"{field_name}")


def with_overrides(cfg: Config, **overrides: Any) -> Config:
    """A copy of `cfg` with flat overrides (`data_path=`, `crop_mode=` ...), validated like load_config."""
    out = load_config(None, cfg.to_dict(), **overrides)
    out.preset = cfg.preset
    return out


def _apply_preset(config: Config, preset: str | Path, layers: list[tuple[str, list[str]]],
                  seen: tuple[Path, ...] = ()) -> str:
    """A preset YAML over `config`, each file it starts from first, appending (file, fields set) to
    `layers`; returns its name. A YAML of one's own that names a preset (`preset: demo`) starts from
    that preset, as `-f` in a notebook and a sweep arm do."""
    path = preset_path(preset)
    values = read_yaml(path)
    base = values.get("preset")
    if base and not isinstance(base, str):
        raise ConfigError(f"{path}: preset {base!r} must be a preset name or a YAML path")
    if base:
        base_path = path.parent / base if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute() else base
        try:
            start = preset_path(base_path)
        except ConfigError:
            if set(BLOCK_NAMES) <= set(values):  # a run's resolved config.yaml: every block there, `preset` a label
                start = path
            else:
                names = ", ".join(sorted(q.stem for q in PARAMS_DIR.glob("*.yaml")))
                raise ConfigError(f"{path}: preset {base!r} is neither a preset ({names}) nor a YAML file; name "
                                  "the preset this file starts from, or remove the line") from None
        if start.resolve() != path.resolve():
            if path.resolve() in seen:
                raise ConfigError(f"{path}: preset {base!r} leads back to {path}")
            _apply_preset(config, base_path, layers, (*seen, path.resolve()))
    layers.append((str(path), _apply(config, values, str(path))))
    return str(base or preset)


def write_f_params(config: Config, path: Path) -> None:
    """The seed's `f_params.txt`: every parameter as `key:<tab>value`, written atomically."""
    from rawnet_lib.io import atomic_write_text
    lines = [f"preset:\t{config.preset}"] + [f"{k}:\t{v}" for k, v in config.flat().items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _layered(start: str | Path | Config | None, blocks: Mapping[str, Any], overrides: Mapping[str, Any]) -> Config:
    """load_config, except that over a base Config (a checkpoint's) the model block must stay
    that of the weights: a changed model field would otherwise be silently ignored."""
    overrides = dict(overrides)
    if "blocks" in overrides:   # the model field, whose name is load_config's `blocks` argument
        model = blocks.get("model") or {}
        if not isinstance(model, Mapping):
            raise ConfigError(f"YAML blocks: block 'model' must be a mapping of fields, got {model!r}")
        blocks = {**blocks, "model": {**model, "blocks": overrides.pop("blocks")}}
    config = load_config(start, blocks, **overrides)
    if isinstance(start, Config) and config.model != start.model:
        changed = [f.name for f in dataclasses.fields(ModelConfig)
                   if getattr(config.model, f.name) != getattr(start.model, f.name)]
        raise ConfigError(f"model.{', model.'.join(changed)}: the model block comes from the checkpoint's weights "
                          f"({', '.join(f'{k}={getattr(start.model, k)!r}' for k in changed)}); "
                          "remove these from the parameters or the YAML")
    return config


# -- notebooks -------------------------------------------------------------------------------
def _injected(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The names and values papermill injected: IPython keeps each executed cell's source in
    `In`, and papermill's cell starts with `# Parameters`, one `name = literal` per line."""
    values: dict[str, Any] = {}
    for source in namespace.get("In") or ():
        if not source.lstrip().startswith("# Parameters"):
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                try:
                    values[name] = ast.literal_eval(node.value)
                except ValueError:      # not a literal (papermill writes literals): the value it left
                    values[name] = namespace.get(name)
    return values


def declared_parameters(namespace: Mapping[str, Any], accept: Collection[str] = ()) -> dict[str, Any]:
    """A notebook's parameters and their values; refuses injected names it does not declare.

    Declared means annotated in the parameters cell (`epochs: int = None  # help`), which IPython
    records in `__annotations__`. papermill only warns about an undeclared `-p epcohs 3` and runs
    on with the default, so it is an error here, with the closest declared names. `accept` names
    more that may be injected without a declaration (the YAML blocks of `-f params/x.yaml`).
    Outside papermill (JupyterLab, a plain dict) nothing is injected and nothing is refused.
    """
    declared = list(namespace.get("__annotations__") or {})
    injected = _injected(namespace)
    for name in injected:
        if name in declared or name in accept:
            continue
        if RENAMED.get(name) in declared:
            raise ConfigError(f"papermill parameters (-p / -f): {name!r} is now {RENAMED[name]!r}; "
                              f"give -p {RENAMED[name]} ...")
        _unknown(name, declared + list(accept), "papermill parameters (-p / -f)")
    return {**{name: namespace.get(name) for name in declared}, **injected}


def notebook_config(namespace: Mapping[str, Any], base: Config | None = None, own: Collection[str] = ()) -> Config:
    """The notebook's Config: its preset (or `base`, e.g. a checkpoint's config), then the YAML
    blocks papermill injected with `-f params/x.yaml`, then the declared parameters that are
    Config fields and not None. Call it as `cfg = notebook_config(globals())`.

    Parameters default to None, "keep what the preset or YAML says", so nothing the notebook
    declares overrides a value silently. `own` names the parameters the notebook uses itself: those
    that are no Config field (a parameter that is neither is an error), and those that share a
    field's name but mean the notebook's own thing (evaluate's `out_dir` is where its results go).
    """
    values = declared_parameters(namespace, accept=("preset", *BLOCK_NAMES))
    fields = Config().flat()
    stray = [k for k in values if k not in fields and k not in own and k not in ("preset", *BLOCK_NAMES)]
    if stray:  # a misnamed field would be silently ignored (evaluate once had `lists` for trial_lists)
        raise ConfigError(f"notebook parameter(s) {', '.join(stray)} are no Config field; name the field, or list "
                          "what the notebook uses itself in notebook_config(..., own=(...))")
    blocks = {k: values[k] for k in BLOCK_NAMES if values.get(k) is not None}
    overrides = {k: v for k, v in values.items() if k in fields and k not in own and v is not None}
    return _layered(base if base is not None else values.get("preset"), blocks, overrides)


# -- command lines ---------------------------------------------------------------------------
_DEST = "config."   # argparse dest prefix of the generated flags, so that cli_config finds them


def _items(values: list[Any]) -> list[Any]:
    """`--blocks 16 16 32` and `--blocks "[16, 16, 32]"` mean the same list."""
    return values[0] if len(values) == 1 and isinstance(values[0], list) else values


def _field_help() -> dict[str, str]:
    """Each field's trailing comment in the dataclasses above, the one place that documents it."""
    source = Path(__file__).read_text(encoding="utf-8")
    return {m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^#\n]+#(.*)$", source, re.M)}


class _Parser(argparse.ArgumentParser):
    """argparse, with a did-you-mean for a misspelt flag (`--epcohs 3` names `--epochs`)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        unknown = [a.split("=")[0] for a in extra if a.startswith("--")]
        if extra:
            flags = [o for action in self._actions for o in action.option_strings]
            hints = [f"{u} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(u, flags, n=2))
                     else u for u in unknown]
            self.error(f"unrecognized arguments: {' '.join(hints or extra)}")
        return parsed


def cli_parser(prog: str, doc: str | None, preset: str | None = "demo", fields: Collection[str] | None = None,
               skip: Collection[str] = (), config_help: str = "preset name in params/ or a YAML file"
               ) -> argparse.ArgumentParser:
    """A module's argument parser: `--config` (a preset name or a YAML) and one flag per Config
    field (or those in `fields`), minus `skip`, the flags the module adds itself.

    A flag left out keeps the preset's value. Booleans take a value or none (`--resume` is
    `--resume true`), lists one or more (`--trial_lists O E H`).
    """
    parser = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
    parser.add_argument("--config", default=preset,
                        help=config_help if preset is None else f"{config_help} (default {preset})")
    group = parser.add_argument_group("config fields", "each overrides the preset's value")
    notes = _field_help()
    for name, default in Config().flat().items():
        if (fields is not None and name not in fields) or name in skip:
            continue
        kind = type(default)
        options: dict[str, Any] = {"type": str if kind is str else yaml.safe_load, "default": None,
                                   "dest": _DEST + name, "metavar": kind.__name__.upper(),
                                   "help": f"{notes.get(name, name)} (built-in default {default!r})"}
        if kind is bool:
            options.update(nargs="?", const=True)
        elif kind is list:
            options.update(nargs="+", metavar="ITEM")
        group.add_argument(f"--{name}", **options)
    return parser


def cli_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The Config of parsed `cli_parser` arguments: `base` (e.g. a checkpoint's) or `--config`,
    then every generated flag that was given."""
    return _layered(base if base is not None else args.config, {}, cli_overrides(args))


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags, by name (`{"fast": False}`); flags not given are absent."""
    return {k.removeprefix(_DEST): _items(v) if isinstance(v, list) else v
            for k, v in vars(args).items() if k.startswith(_DEST) and v is not None}
