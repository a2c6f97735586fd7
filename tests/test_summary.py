"""Tests for rawnet_lib.views.summary: the layer table, the sinc filter bank and the FMS gates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rawnet_lib.config import load_config
from rawnet_lib.models.rawnet2 import build_model, stage_frames
from rawnet_lib.views.summary import fms_scales, layer_table, notebook_model, sinc_bank, sinc_figures


@pytest.fixture(scope="module")
def smoke_model():
    torch.manual_seed(0)
    return build_model("smoke", n_classes=6)


def test_layer_table_rows_and_total(smoke_model):
    table = layer_table(smoke_model)
    assert list(table.columns) == ["layer", "type", "output shape", "parameters"]
    layers = table["layer"].tolist()
    assert layers[-1] == "total"
    # Every top-level layer appears, in forward order (the shared LeakyReLU runs twice).
    assert [name for name in layers if name != "lrelu_keras"] == [
        "ln", "first_conv", "first_bn", *[f"block{i}" for i in range(6)], "bn_before_gru", "gru", "fc1_gru",
        "fc2_gru", "total"]
    body = table.iloc[:-1]
    total = sum(p.numel() for p in smoke_model.parameters())
    assert table["parameters"].iloc[-1] == total
    assert body["parameters"].sum() == total
    assert body.set_index("layer")["parameters"].drop("lrelu_keras").to_dict() == {
        name: sum(p.numel() for p in module.parameters()) for name, module in smoke_model.named_children()
        if name != "lrelu_keras"}


def test_layer_table_shapes_follow_stage_frames(smoke_model):
    table = layer_table(smoke_model).iloc[:-1].drop_duplicates("layer").set_index("layer")
    shapes = table["output shape"].to_dict()
    frames = dict(stage_frames(smoke_model.cfg))
    assert shapes["ln"] == (1, 6561)
    assert shapes["first_conv"] == (1, 8, frames["first_conv"])
    assert shapes["first_bn"] == (1, 8, frames["first pool"])
    for i, width in enumerate([8, 8, 16, 16, 16, 16]):
        assert shapes[f"block{i}"] == (1, width, frames[f"block{i}"])
    assert shapes["gru"] == (1, frames["block5"], 32)
    assert shapes["fc1_gru"] == (1, 32)
    assert shapes["fc2_gru"] == (1, 6)
    assert table.loc["block0", "type"] == "ResidualBlock"


def test_layer_table_without_output_layer_and_keeps_mode():
    torch.manual_seed(0)
    model = build_model("smoke").train()
    table = layer_table(model)
    assert "fc2_gru" not in table["layer"].tolist()
    assert table["parameters"].iloc[-1] == sum(p.numel() for p in model.parameters())
    assert model.training                       # restored after the eval-mode pass
    assert not any(m._forward_hooks for m in model.modules())       # hooks removed


def test_layer_table_other_length_and_depth():
    """A paper-derived model with three blocks and no layer norm, at a chosen crop length."""
    model = build_model(load_config("paper", layer_norm=False, sinc_filters=8, blocks=[8, 8, 16]).model, 3)
    table = layer_table(model, n_samples=2000)
    shapes = table.drop_duplicates("layer").set_index("layer")["output shape"].to_dict()
    assert shapes["block2"] == (1, 16, dict(stage_frames(model.cfg, 2000))["block2"]) == (1, 16, 21)
    assert table["parameters"].iloc[-1] == table["parameters"].iloc[:-1].sum() \
        == sum(p.numel() for p in model.parameters())


def test_sinc_bank(smoke_model):
    bank = sinc_bank(smoke_model)
    assert set(bank) == {"low_hz", "high_hz", "taps"}
    assert bank["low_hz"].shape == bank["high_hz"].shape == (8,)
    assert bank["taps"].shape == (8, 61)
    assert all(isinstance(v, np.ndarray) for v in bank.values())
    assert np.all(bank["high_hz"] > bank["low_hz"])
    assert np.all(bank["low_hz"] >= 50) and np.all(bank["high_hz"] <= 8000)
    np.testing.assert_allclose(bank["taps"][:, 30], 1.0, rtol=1e-6)
    assert np.all(np.diff(bank["low_hz"]) > 0)                # mel-spaced, increasing at init


def test_fms_scales(smoke_model):
    wave = np.random.default_rng(0).normal(size=6561).astype(np.float32)
    smoke_model.train()
    scales = fms_scales(smoke_model, wave)
    assert smoke_model.training
    assert list(scales) == [f"block{i}" for i in range(6)]
    for (name, s), width in zip(scales.items(), [8, 8, 16, 16, 16, 16]):
        assert s.shape == (width,), name
        assert np.all((s > 0) & (s < 1)), name
    # The gate is the sigmoid of the FMS linear layer on the block's time-averaged features.
    block0 = smoke_model.block0[0]
    captured = {}
    hook = block0.mp.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        smoke_model.eval()
        with torch.no_grad():
            smoke_model.embed(torch.as_tensor(wave)[None])
    finally:
        hook.remove()
        smoke_model.train()
    with torch.no_grad():
        want = torch.sigmoid(block0.frm.fc(captured["x"].mean(-1)))[0].numpy()
    np.testing.assert_allclose(scales["block0"], want, rtol=1e-6)


def test_the_model_notebooks_figures_go_beside_the_runs_own(smoke_run, tiny_db):
    """A run's model draws into `<run>/figures/model/<file>`, so same-named runs of two sweeps
    never share a folder; `out_dir` gathers them, one folder per run and file."""
    values = {"preset": "paper", "checkpoint": str(smoke_run), "n_classes": 5994, "data_path": str(tiny_db),
              "demo_size": None, "out_dir": ""}
    namespace = {"__annotations__": dict.fromkeys(values, str), **values}
    model, cfg, figures = notebook_model(namespace)
    assert figures == smoke_run / "figures" / "model" / "best_opt_eval" and cfg.data.data_path == str(tiny_db)
    namespace["out_dir"] = "/elsewhere"
    assert notebook_model(namespace)[2] == Path("/elsewhere") / f"{smoke_run.name}-best_opt_eval"
    namespace.update(checkpoint="", preset="smoke", n_classes=3, out_dir="")
    assert notebook_model(namespace)[2].parts[-3:] == ("outputs", "model", "smoke")


def test_sinc_figures_keep_the_arrays_that_redraw_them(smoke_model, tmp_path):
    bands, responses = sinc_figures(smoke_model, tmp_path)
    bank = sinc_bank(smoke_model)
    assert bands.axes[0].get_ylabel() == "frequency (Hz)"
    assert responses.axes[0].get_xlim() == (0.0, smoke_model.first_conv.sample_rate / 2)
    for name, keys in (("sinc_bands", ("low_hz", "high_hz")), ("sinc_responses", ("taps",))):
        assert (tmp_path / f"{name}.png").stat().st_size > 0 and (tmp_path / f"{name}.svg").is_file()
        with np.load(tmp_path / f"{name}.npz") as saved:
            assert sorted(saved.files) == sorted(keys)
            for key in keys:
                np.testing.assert_array_equal(saved[key], bank[key])
