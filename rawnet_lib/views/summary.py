"""Looking inside a RawNet2: layer shapes and sizes, the sinc filter bank, the FMS gates."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from rawnet_lib.config import BLOCK_NAMES, Config, declared_parameters, notebook_config, repo_path
from rawnet_lib.dataset.audio import peak_normalise, read_audio, tile
from rawnet_lib.dataset.utterances import load_utterances, resolve_data_path
from rawnet_lib.models.checkpoint import load_checkpoint_model
from rawnet_lib.models.rawnet2 import RawNet2, build_model
from rawnet_lib.training.run import resolve_checkpoint
from rawnet_lib.views.plots import filter_responses, fms_plot, frequency_response, save_figure

__all__ = ["OWN", "notebook_model", "layer_table", "sinc_bank", "fms_scales", "example_crop", "checkpoint_label",
           "sinc_figures", "fms_figure"]

OWN = ("checkpoint", "n_classes", "out_dir")  # the model notebook's own parameters (out_dir: its figures)


def notebook_model(namespace: Mapping[str, Any]) -> tuple[RawNet2, Config, Path]:
    """The model notebook's model, Config and figures folder, from its parameters.

    With `checkpoint` (a .pt file, or a run folder: its best model) the trained model, with the
    notebook's parameters over the checkpoint's config; without, a freshly initialised model of
    `preset` with `n_classes` outputs. Figures go to `out_dir/<checkpoint label or preset>`;
    without out_dir, a run's model's to `<run>/figures/model/<file stem>` (beside the analysis
    notebook's figures of the run), others to `outputs/model/<label>`. A misspelt parameter is
    named before anything loads.
    """
    values = declared_parameters(namespace, accept=BLOCK_NAMES)
    checkpoint = None
    if values["checkpoint"]:
        checkpoint = resolve_checkpoint(values["checkpoint"])
        model, cfg = load_checkpoint_model(checkpoint, base=values["preset"])
        cfg = notebook_config(namespace, base=cfg, own=OWN)  # the checkpoint's, then the parameters
        label = checkpoint_label(checkpoint)
    else:
        cfg = notebook_config(namespace, own=OWN)
        model, label = build_model(cfg, values["n_classes"]), cfg.preset
    if values["out_dir"]:
        figures = repo_path(values["out_dir"]) / label
    elif checkpoint is not None and checkpoint.parent.name == "models":  # a run's model: with the run's figures
        figures = checkpoint.parent.parent / "figures" / "model" / checkpoint.stem
    else:
        figures = repo_path("outputs/model") / label
    return model, cfg, figures


def layer_table(model: RawNet2, n_samples: int | None = None) -> pd.DataFrame:
    """One row per top-level layer: output shape for one input crop and parameter count."""
    n_samples = n_samples or model.cfg.n_samples
    rows: list[dict] = []
    hooks = []
    for name, module in model.named_children():
        def record(mod, inputs, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            rows.append({"layer": name, "type": type(mod[0] if isinstance(mod, torch.nn.Sequential) else mod).__name__,
                         "output shape": tuple(out.shape),
                         "parameters": sum(p.numel() for p in mod.parameters())})
        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(1, n_samples)) if hasattr(model, "fc2_gru") else model.embed(torch.randn(1, n_samples))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    table = pd.DataFrame(rows)
    total = pd.DataFrame([{"layer": "total", "type": "", "output shape": "",
                           "parameters": sum(p.numel() for p in model.parameters())}])
    return pd.concat([table, total], ignore_index=True)


def sinc_bank(model: RawNet2) -> dict[str, np.ndarray]:
    """Cut-off frequencies (Hz) and taps of the first layer's band-pass filters."""
    with torch.no_grad():
        low, high = model.first_conv.cutoffs()
        taps = model.first_conv.filters()[:, 0]
    return {"low_hz": low[:, 0].numpy(), "high_hz": high[:, 0].numpy(), "taps": taps.numpy()}


def fms_scales(model: RawNet2, wave: np.ndarray) -> dict[str, np.ndarray]:
    """The sigmoid gate of each block's FMS for one crop: which filters a block turns up or down."""
    scales: dict[str, np.ndarray] = {}
    hooks = [block.frm.fc.register_forward_hook(
        lambda mod, inp, out, name=f"block{i}": scales.__setitem__(name, torch.sigmoid(out)[0].numpy()))
        for i, block in enumerate(model.blocks())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.embed(torch.as_tensor(wave, dtype=torch.float32)[None])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return scales


def sinc_figures(model: RawNet2, figures: Path) -> list[Figure]:
    """The first layer's passbands and magnitude responses, saved with their arrays (`sinc_bands`,
    `sinc_responses`) so they can be redrawn or compared between checkpoints without the model."""
    bank = sinc_bank(model)
    bands = filter_responses(bank["low_hz"], bank["high_hz"])
    save_figure(bands, figures, "sinc_bands", {"low_hz": bank["low_hz"], "high_hz": bank["high_hz"]})
    responses = frequency_response(bank["taps"], sr=model.first_conv.sample_rate)
    save_figure(responses, figures, "sinc_responses", {"taps": bank["taps"]})
    return [bands, responses]


def fms_figure(model: RawNet2, cfg: Config, figures: Path) -> Figure:
    """Each block's FMS gates on the middle crop of the first evaluation utterance (its key in the
    title), saved with the gates as `fms_scales`."""
    key, wave = example_crop(cfg)
    scales = fms_scales(model, wave)
    fig = fms_plot(scales)
    fig.suptitle(key, fontsize="small")
    save_figure(fig, figures, "fms_scales", scales)
    return fig


def example_crop(cfg: Config, index: int = 0) -> tuple[str, np.ndarray]:
    """(key, the middle n_samples of one evaluation utterance, peak-normalised)."""
    data_path = resolve_data_path(cfg.data)
    utts = load_utterances(data_path, cfg.data.eval_dirs[0], sample_rate=cfg.model.sample_rate, progress=False)
    key = utts.keys[index % len(utts)]
    x = peak_normalise(read_audio(utts.root / key, sample_rate=cfg.model.sample_rate))
    n = cfg.model.n_samples
    start = max(0, (len(x) - n) // 2)
    return key, tile(x[start:start + n], n)


def checkpoint_label(checkpoint: str | Path) -> str:
    """A folder name for a checkpoint's figures: its run and its file (`demo-best_opt_eval`), so the
    best models of two runs do not share one."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}-{path.stem}" if path.parent.name == "models" else path.stem
