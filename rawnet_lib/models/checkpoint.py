"""Reading and writing checkpoints: ours (training and resume) and bare reference state_dicts.

Every load goes through `read_checkpoint`, with `torch.load(weights_only=True)`: a checkpoint
from elsewhere can hold tensors and plain Python values, never code. So what we save is only
that: the config as a dict, the RNG states as lists and tensors, the history as floats.

    model checkpoint (TA_<epoch>_<eer>.pt)  model, config, speakers, epoch, val_eer
    training checkpoint (last.pt, best_opt_eval.pt)  + optimizer, scheduler, scaler, history, rng
"""
from __future__ import annotations

import copy
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rawnet_lib.config import Config, ConfigError, ModelConfig, input_path, load_config
from rawnet_lib.errors import WorkbookError
from rawnet_lib.io import atomic_torch_save
from rawnet_lib.models.rawnet2 import RawNet2, build_model

__all__ = ["CheckpointError", "model_checkpoint", "training_checkpoint", "save_checkpoint", "read_checkpoint",
           "resume_training", "load_checkpoint_model", "checkpoint_model", "infer_model_config",
           "init_from_checkpoint", "average_checkpoints", "carries_config"]

_HELP = ("give a .pt file written by training (models/best_opt_eval.pt, TA_<epoch>_<eer>.pt, last.pt) "
         "or a reference RawNet2 state_dict")
# Checkpoints written before the RNG state was stored as lists hold numpy arrays and scalars;
# rebuilding those runs no code, so they stay readable.
_np_core = np._core if hasattr(np, "_core") else np.core  # numpy 2 | 1
_NUMPY_GLOBALS = [_np_core.multiarray.scalar, _np_core.multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32)), type(np.dtype(np.float64))]


class CheckpointError(WorkbookError, ValueError):
    """A checkpoint that is missing, unreadable, unsafe or not a RawNet2; the message says which."""


# -- writing ---------------------------------------------------------------------------------------
def model_checkpoint(model: torch.nn.Module, cfg: Config, speakers: Sequence[str], epoch: int,
                     val_eer: float) -> dict[str, Any]:
    """What evaluation needs: the weights, the config that builds them, and where they came from."""
    return {"model": model.state_dict(), "config": cfg.to_dict(), "speakers": list(speakers),
            "epoch": int(epoch), "val_eer": float(val_eer)}


def training_checkpoint(weights: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                        history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """A `model_checkpoint` plus everything `resume_training` restores."""
    return {**weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "history": [{k: _plain(v) for k, v in h.items()} for h in history],
            "rng": _rng_state()}


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write atomically: a run killed mid-write keeps the previous file."""
    atomic_torch_save(state, path)


def _plain(value: Any) -> Any:
    """numpy scalars (np.float64 from a sum, np.bool_) as the Python values weights_only reads."""
    return value.item() if isinstance(value, np.generic) else value


def _rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, key.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Any]:
    """A model checkpoint whose weights are the mean of those of `paths` (model checkpoints of one
    run, e.g. its last epochs): WeSpeaker's and ESPnet's final model, smoother than any one epoch.

    Sums are taken in float64; integer buffers (batch norm's step counts) come from the last file.
    The result names its sources (`averaged`) and has no val_eer of its own.
    """
    states = [read_checkpoint(p) for p in paths]
    if not states or any(not isinstance(s, dict) or "config" not in s for s in states):
        raise CheckpointError(f"averaging needs model checkpoints written by training (TA_<epoch>_<eer>.pt), "
                              f"got {', '.join(map(str, paths)) or 'none'}")
    last = states[-1]
    for path, state in zip(paths, states):
        if state["config"]["model"] != last["config"]["model"] or state["model"].keys() != last["model"].keys():
            raise CheckpointError(f"{path} holds another model than {paths[-1]}; average checkpoints of one run only")
    weights = {k: (sum(s["model"][k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point()
               else v for k, v in last["model"].items()}
    return {**{k: last[k] for k in ("config", "speakers", "epoch")}, "model": weights, "val_eer": float("nan"),
            "averaged": [Path(p).name for p in paths]}


# -- reading ---------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, fix: str = _HELP) -> Any:
    """The stored object, loaded with weights_only=True (tensors and plain values only); `fix`
    ends the message when the file is missing or not a checkpoint."""
    path = input_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many types for a file that is not a checkpoint)
        text = str(err)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise CheckpointError(f"{path} holds Python objects besides tensors and plain values ({unsafe[1]}); "
                                  "loading them could run code, so it is refused. If you trust its source, load "
                                  "it yourself and save only its state_dict") from None
        detail = text.split("WeightsUnpickler error:")[-1].strip() or type(err).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail.splitlines()[0]}); "
                              f"{fix}") from None


def resume_training(path: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, speakers: list[str] | None = None) -> dict[str, Any] | None:
    """Restore a training checkpoint (`last.pt`) into these objects and the RNGs; None without one.
    `speakers`: the classes the data gives now, which must be those the run trained."""
    if path is None:
        return None
    back = ("copy models/best_opt_eval.pt (a training checkpoint of the best epoch) over it to resume from that "
            "epoch, or set overwrite: true to start the run again")
    state = read_checkpoint(path, fix=f"it was not written by a finished epoch: {back}")
    missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "rng", "history", "epoch") if k not in state]
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing)}: it is not a training checkpoint as "
                              f"models/last.pt is written; {back}")
    if speakers is not None and state.get("speakers", speakers) != speakers:
        before = state["speakers"]
        first = next((f"{a} -> {b}" for a, b in zip(before, speakers) if a != b), "the same first ones")
        raise CheckpointError(f"{path} trained on {len(before)} speakers, the training data now gives {len(speakers)} "
                              f"({first}); resume with the data it trained on (data_path), or give the new data a "
                              "run of its own (another name)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run trained without fp16: a resume in fp16 starts a fresh scale
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return state


def init_from_checkpoint(path: str | Path, model: torch.nn.Module,
                         speakers: Sequence[str] | None = None) -> list[str]:
    """Fine-tuning start (`init_from`): the weights only of one of our checkpoints or a bare state_dict.

    The layer norm `ln` is sized by the crop length, so longer fine-tuning crops re-initialise it
    (gamma 1, beta 0 is the identity affine; the normalisation itself keeps working); a model
    without one (`layer_norm: false`) drops it, and one with it where the checkpoint had none
    starts it afresh. `fc2_gru`'s rows are classes: with `speakers` (the run's class names) and a
    checkpoint that names its own, each class keeps the row of its name and the others start
    fresh, so other data or another order of speed factors never hands a class another speaker's
    row; without names, rows are kept by position when the count fits. Each of these gets a note
    for the run log; any other difference is an error, as a wrong model would be.
    """
    obj = read_checkpoint(path, fix=f"init_from: {_HELP}")
    state, _ = _weights(obj, f"init_from: {path}")
    own = model.state_dict()
    notes = []
    ln_state, ln_own = {k for k in state if k.startswith("ln.")}, {k for k in own if k.startswith("ln.")}
    if ln_state and not ln_own:
        notes.append(f"init_from {path}: this model has no layer norm (layer_norm: false): the checkpoint's ln "
                     "dropped, so the first layers see the crops unnormalised until fine-tuning adapts them")
    elif ln_own and (ln_state != ln_own or any(state[k].shape != own[k].shape for k in ln_own)):
        why = (f"the crop length changed: ln re-initialised (gamma 1, beta 0) for {tuple(own['ln.gamma'].shape)} "
               f"(checkpoint {tuple(state['ln.gamma'].shape)})" if "ln.gamma" in state
               else "the checkpoint has no layer norm: ln starts as the identity affine (gamma 1, beta 0)")
        notes.append(f"init_from {path}: {why}")
    if notes:  # so far only the layer norm's: the run's own, fresh, or none
        state = {k: v for k, v in state.items() if not k.startswith("ln.")} | {k: own[k] for k in ln_own}
    named = obj.get("speakers") if isinstance(obj, Mapping) else None
    weight = state.get("fc2_gru.weight")
    if weight is not None and "fc2_gru.weight" in own and weight.shape[1:] == own["fc2_gru.weight"].shape[1:]:
        if speakers is not None and named is not None and list(named) != list(speakers):
            row = {name: i for i, name in enumerate(named)}
            pairs = [(j, row[name]) for j, name in enumerate(speakers) if name in row]
            for key in ("fc2_gru.weight", "fc2_gru.bias"):
                rows = own[key].clone()
                if pairs and key in state:
                    rows[[j for j, _ in pairs]] = state[key][[i for _, i in pairs]].to(rows.dtype)
                state[key] = rows
            notes.append(f"init_from {path}: the classes changed: fc2_gru keeps the rows of the {len(pairs)} "
                         f"speaker(s) of the checkpoint's {len(named)} that this run has, by name; "
                         f"{len(speakers) - len(pairs)} of the run's {len(speakers)} start fresh")
        elif weight.shape != own["fc2_gru.weight"].shape:
            notes.append(f"init_from {path}: the classes changed: fc2_gru re-initialised for "
                         f"{tuple(own['fc2_gru.weight'].shape)} (checkpoint {tuple(weight.shape)})")
            state.update({k: v for k, v in own.items() if k.startswith("fc2_gru.")})
    _load_strict(model, state, f"init_from {path}: the weights do not fit this run's model",
                 "give the model block of the checkpoint's run (only n_samples and layer_norm may change)")
    return notes


def infer_model_config(state: Mapping[str, torch.Tensor], base: ModelConfig | None = None) -> tuple[ModelConfig, int]:
    """(ModelConfig, n_classes) read off a RawNet2 state_dict's tensor shapes.

    The sinc kernel length and sample rate are not stored in the weights (the filters are
    computed), so they come from `base` (the paper's 251 taps by default).
    """
    needed = ["first_conv.low_hz_", "block0.0.conv1.weight", "gru.weight_hh_l0", "fc1_gru.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"not a RawNet2 state_dict: no {', '.join(missing)} among its {len(state)} keys "
                              f"(first: {', '.join(list(state)[:4])})")
    cfg = copy.deepcopy(base or ModelConfig())
    cfg.layer_norm = "ln.gamma" in state
    if cfg.layer_norm:
        cfg.n_samples = int(state["ln.gamma"].shape[0])
    cfg.sinc_filters = int(state["first_conv.low_hz_"].shape[0])
    cfg.blocks = []
    while f"block{len(cfg.blocks)}.0.conv1.weight" in state:
        cfg.blocks.append(int(state[f"block{len(cfg.blocks)}.0.conv1.weight"].shape[0]))
    if len(cfg.block_pool) != len(cfg.blocks):  # pooling has no weights: the base's when it fits, else every block
        cfg.block_pool = []
    cfg.gru_units = int(state["gru.weight_hh_l0"].shape[1])
    cfg.gru_layers = sum(1 for k in state if k.startswith("gru.weight_hh_l"))
    cfg.embedding_dim = int(state["fc1_gru.weight"].shape[0])
    n_classes = int(state["fc2_gru.weight"].shape[0]) if "fc2_gru.weight" in state else 0
    return cfg, n_classes


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu",
                          base: Config | str = "paper") -> tuple[RawNet2, Config]:
    """(model in eval mode on `device`, its Config) from one of our checkpoints or a bare state_dict.

    Our checkpoints carry their config. For a bare reference state_dict (optionally saved from
    nn.DataParallel, keys `module.*`), or weights saved as {"model": state_dict} without a
    config, the architecture is inferred from the tensor shapes and the other blocks come from
    `base` (a Config or preset name). Loading is strict; fc2_gru is kept
    when present so that every key is accounted for.
    """
    return checkpoint_model(read_checkpoint(path), Path(path), device, base)


def checkpoint_model(stored: Any, path: str | Path, device: str | torch.device = "cpu",
                     base: Config | str = "paper") -> tuple[RawNet2, Config]:
    """`load_checkpoint_model` of what `read_checkpoint(path)` returned, for a caller that also
    needs the rest of it (the optimiser state, the epoch)."""
    state, config = _weights(stored, str(path))
    if config is not None:
        try:
            cfg = Config.from_dict(config)
        except ConfigError as err:
            raise CheckpointError(f"{path}: the config it carries does not load here ({err}); a checkpoint of "
                                  "another version of the workbook loads with that version") from None
        _, n_classes = infer_model_config(state, cfg.model)
    else:
        cfg = load_config(base) if isinstance(base, str) else copy.deepcopy(base)
        try:
            cfg.model, n_classes = infer_model_config(state, cfg.model)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}; {_HELP}") from None
    model = build_model(cfg.model, n_classes)
    _load_strict(model, state, f"{path}: the weights do not fit a RawNet2 of {cfg.model}",
                 "for a bare state_dict pick the preset whose sinc_kernel matches (base=...)")
    return model.to(device).eval(), cfg


def carries_config(stored: Any) -> bool:
    """Whether what `read_checkpoint` returned is one of our checkpoints, whose config travels with
    the weights (a bare state_dict's model settings come from a preset or YAML instead)."""
    return _weights(stored, "checkpoint")[1] is not None


def _weights(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state_dict, config dict or None) of one of our checkpoints or of a bare state_dict;
    `module.` (nn.DataParallel's prefix, on every key) is taken off."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state, config = obj["model"], obj.get("config")
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, config = obj, None
    else:
        keys = list(obj)[:6] if isinstance(obj, Mapping) else []
        raise CheckpointError(f"{where} holds a {type(obj).__name__} (keys {keys}), neither a training checkpoint "
                              f"(model, config, ...) nor a state_dict; {_HELP}")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state), config


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """load_state_dict(strict=True), its error cut to a readable line that says the fix."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{what} ({' '.join(str(err).split())[:400]}); {fix}") from None
