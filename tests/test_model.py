"""Tests for rawnet_lib.models.rawnet2 against the facts in shared/reference/rawnet2.md.

The key test (`test_forward_matches_functional_transcription`) runs the model next to an
independent functional transcription of the reference forward pass, written here from the
facts file with torch.nn.functional only and fed the model's state_dict.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rawnet_lib.config import ConfigError, ModelConfig, load_config
from rawnet_lib.models.rawnet2 import RawNet2, build_model, stage_frames

PAPER_CLASSES = 5994  # VoxCeleb2 dev speakers


@pytest.fixture(scope="module")
def paper_model() -> RawNet2:
    torch.manual_seed(0)
    return build_model("paper", PAPER_CLASSES)


def _expected_shapes(cfg: ModelConfig, n_classes: int) -> dict[str, tuple[int, ...]]:
    """Every state_dict entry and its shape, written out from the facts file."""
    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.layer_norm:
        shapes |= {"ln.gamma": (cfg.n_samples,), "ln.beta": (cfg.n_samples,)}
    shapes |= {"first_conv.low_hz_": (cfg.sinc_filters, 1), "first_conv.band_hz_": (cfg.sinc_filters, 1)}
    shapes |= bn("first_bn", cfg.sinc_filters)
    c_in = cfg.sinc_filters
    for i, c_out in enumerate(cfg.blocks):
        p = f"block{i}.0"
        if i > 0:
            shapes |= bn(f"{p}.bn1", c_in)
        shapes |= {f"{p}.conv1.weight": (c_out, c_in, 3), f"{p}.conv1.bias": (c_out,)}
        shapes |= bn(f"{p}.bn2", c_out)
        shapes |= {f"{p}.conv2.weight": (c_out, c_out, 3), f"{p}.conv2.bias": (c_out,)}
        if c_in != c_out:
            shapes |= {f"{p}.conv_downsample.weight": (c_out, c_in, 1), f"{p}.conv_downsample.bias": (c_out,)}
        shapes |= {f"{p}.frm.fc.weight": (c_out, c_out), f"{p}.frm.fc.bias": (c_out,)}
        c_in = c_out
    shapes |= bn("bn_before_gru", c_in)
    h = cfg.gru_units
    shapes |= {"gru.weight_ih_l0": (3 * h, c_in), "gru.weight_hh_l0": (3 * h, h),
               "gru.bias_ih_l0": (3 * h,), "gru.bias_hh_l0": (3 * h,)}
    shapes |= {"fc1_gru.weight": (cfg.embedding_dim, h), "fc1_gru.bias": (cfg.embedding_dim,)}
    if n_classes:
        shapes |= {"fc2_gru.weight": (n_classes, cfg.embedding_dim), "fc2_gru.bias": (n_classes,)}
    return shapes


def _learnable(shapes: dict[str, tuple[int, ...]]) -> int:
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(stats))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- sizes and names ------------------------------------------------------------------------

def test_paper_parameter_counts(paper_model):
    cfg = load_config("paper").model
    assert _n_params(paper_model) == 13_258_428
    assert _n_params(paper_model) - paper_model.fc2_gru.weight.numel() - paper_model.fc2_gru.bias.numel() \
        == 7_114_578
    assert _n_params(build_model("paper")) == 7_114_578
    assert _n_params(paper_model.ln) == 118_098
    # The facts-derived shape table gives the same totals.
    assert _learnable(_expected_shapes(cfg, PAPER_CLASSES)) == 13_258_428
    assert _learnable(_expected_shapes(cfg, 0)) == 7_114_578


def test_demo_parameter_count():
    assert _n_params(build_model("demo", 50)) == 480_640
    assert _learnable(_expected_shapes(load_config("demo").model, 50)) == 480_640


def test_paper_state_dict_names_and_shapes(paper_model):
    sd = paper_model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == _expected_shapes(load_config("paper").model, PAPER_CLASSES)
    # The entries the reference checkpoints are known by, spelt out.
    assert got["ln.gamma"] == (59049,)
    assert got["first_conv.low_hz_"] == (128, 1)
    assert got["first_conv.band_hz_"] == (128, 1)
    assert got["block0.0.conv1.weight"] == (128, 128, 3)
    assert not any(k.startswith("block0.0.bn1") for k in got)
    assert got["block1.0.bn1.weight"] == (128,)
    assert got["block2.0.conv_downsample.weight"] == (256, 128, 1)
    assert not any("conv_downsample" in k for k in got if not k.startswith("block2."))
    assert got["block3.0.frm.fc.bias"] == (256,)
    assert got["block5.0.frm.fc.bias"] == (256,)
    assert {k for k in got if k.startswith("bn_before_gru.")} == {
        f"bn_before_gru.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert got["gru.weight_ih_l0"] == (3072, 256)
    assert got["fc1_gru.weight"] == (1024, 1024)
    assert got["fc2_gru.weight"] == (5994, 1024)


def test_sinc_window_and_time_axis_are_not_in_the_state_dict(paper_model):
    sd = paper_model.state_dict()
    assert [k for k in sd if k.startswith("first_conv.")] == ["first_conv.low_hz_", "first_conv.band_hz_"]
    persistent = set(sd)
    buffers = {name for name, _ in paper_model.named_buffers()}
    assert {b for b in buffers - persistent} and all(b.startswith("first_conv.") for b in buffers - persistent)


def test_no_output_layer_without_classes():
    model = build_model("smoke")
    assert not hasattr(model, "fc2_gru")
    assert not any(k.startswith("fc2_gru") for k in model.state_dict())


def test_build_model_accepts_config_block_or_name():
    cfg = load_config("smoke")
    sizes = {_n_params(build_model(c, 5)) for c in ("smoke", cfg, cfg.model)}
    assert len(sizes) == 1


# --- frames ---------------------------------------------------------------------------------

def test_stage_frames_paper():
    stages = stage_frames(load_config("paper").model)
    assert [n for _, n in stages] == [59049, 58799, 19599, 6533, 2177, 725, 241, 80, 26]
    assert stages[0] == ("input", 59049)
    assert [name for name, _ in stages[-6:]] == [f"block{i}" for i in range(6)]


def test_stage_frames_match_the_forward_pass():
    torch.manual_seed(0)
    model = build_model("demo").eval()
    seen: dict[str, int] = {}
    hooks = [getattr(model, f"block{i}").register_forward_hook(
        lambda m, i, o, name=f"block{i}": seen.__setitem__(name, o.shape[-1])) for i in range(6)]
    hooks.append(model.first_conv.register_forward_hook(lambda m, i, o: seen.__setitem__("first_conv", o.shape[-1])))
    with torch.no_grad():
        frames = model.frame_features(torch.randn(1, 19683))
    for h in hooks:
        h.remove()
    want = dict(stage_frames(model.cfg))
    assert set(seen) == {"first_conv", *(f"block{i}" for i in range(6))}
    assert {k: want[k] for k in seen} == seen
    assert frames.shape == (1, 64, want["block5"]) == (1, 64, 8)


def test_blocks_that_do_not_pool_keep_the_names_and_more_frames():
    """RawNet2-modified's public model pools once per stage (the last block of each): `block_pool`
    leaves the other blocks unpooled; pooling has no weights, so every state_dict name and shape stays."""
    cfg = load_config("smoke", blocks=[8, 8, 16, 16, 16, 16, 16, 16],
                      block_pool=[True, True, True, False, True, True, False, True])
    torch.manual_seed(0)
    model = build_model(cfg, 5).eval()
    seen: dict[str, int] = {}
    hooks = [getattr(model, f"block{i}").register_forward_hook(
        lambda m, i, o, name=f"block{i}": seen.__setitem__(name, o.shape[-1])) for i in range(8)]
    with torch.no_grad():
        frames = model.frame_features(torch.randn(1, cfg.model.n_samples))
    for h in hooks:
        h.remove()
    want = dict(stage_frames(cfg.model))
    assert {k: want[k] for k in seen} == seen and want["block3"] == want["block2"]
    assert frames.shape[-1] == want["block7"]
    assert frames.shape[-1] == dict(stage_frames(load_config("smoke").model))["block5"]  # 6 pools, as the paper's
    # pooling after every block would leave the smoke crop no frame (refused), so compare with none
    unpooled = build_model(load_config("smoke", blocks=cfg.model.blocks, block_pool=[False] * 8), 5)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in unpooled.state_dict().items()}
    with pytest.raises(ConfigError, match=r"block_pool=\[True\] needs one true/false per block"):
        load_config("smoke", block_pool=[True])


# --- initialisation -------------------------------------------------------------------------

def _mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def test_sinc_initial_bands_are_mel_spaced(paper_model):
    low = paper_model.first_conv.low_hz_.detach().double().numpy()[:, 0]
    band = paper_model.first_conv.band_hz_.detach().double().numpy()[:, 0]
    points = 700.0 * (10 ** (np.linspace(_mel(30.0), _mel(16000 / 2 - (50 + 50)), 129) / 2595.0) - 1)
    np.testing.assert_allclose(low, points[:-1], rtol=1e-5)
    np.testing.assert_allclose(band, np.diff(points), rtol=1e-5)
    assert low[0] == pytest.approx(30.0, abs=1e-3)
    assert low[-1] + band[-1] == pytest.approx(7900.0, abs=1e-2)
    np.testing.assert_allclose(np.diff(_mel(np.r_[low, low[-1] + band[-1]])), np.diff(_mel(points)).mean(), rtol=1e-4)


def test_sinc_filters_peak_at_the_centre_tap(paper_model):
    with torch.no_grad():
        taps = paper_model.first_conv.filters()[:, 0]
        low, high = paper_model.first_conv.cutoffs()
    assert taps.shape == (128, 251)
    centre = taps[:, 125]
    torch.testing.assert_close(centre, torch.ones(128))
    torch.testing.assert_close(taps.abs().max(dim=1).values, centre)     # the centre is the peak
    torch.testing.assert_close(taps, taps.flip(1))                       # linear phase (symmetric)
    assert torch.all(low >= 50) and torch.all(high <= 8000) and torch.all(high > low)
    assert high.max().item() == pytest.approx(8000.0)


def test_linear_init_xavier_uniform_with_bias_1e4(paper_model):
    linears = [m for m in paper_model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 + 2     # six FMS gates, fc1_gru, fc2_gru
    for lin in linears:
        assert torch.all(lin.bias == torch.tensor(0.0001))
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))
        w = lin.weight.detach()
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.98 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_conv_init_kaiming_normal(paper_model):
    convs = [m for m in paper_model.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 6 * 2 + 1   # conv1 + conv2 per block, one conv_downsample
    z = torch.cat([(c.weight.detach() / (math.sqrt(2 / (1 + 0.01 ** 2)) / math.sqrt(c.weight[0].numel()))).flatten()
                   for c in convs]).double()
    assert z.numel() > 1_000_000
    assert abs(z.mean().item()) < 0.01
    assert z.std().item() == pytest.approx(1.0, rel=0.02)
    kurtosis = ((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.1)      # normal, not uniform (1.8)
    for c in convs:                                     # biases kept, at PyTorch's default init
        assert c.bias is not None
        assert c.bias.detach().abs().max().item() <= 1 / math.sqrt(c.weight[0].numel())
        assert c.bias.detach().std().item() > 0


def test_other_layers_at_pytorch_defaults(paper_model):
    torch.testing.assert_close(paper_model.ln.gamma.detach(), torch.ones(59049))
    torch.testing.assert_close(paper_model.ln.beta.detach(), torch.zeros(59049))
    for m in paper_model.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert m.eps == 1e-5
    bound = 1 / math.sqrt(1024)
    for p in paper_model.gru.parameters():
        assert p.detach().abs().max().item() <= bound


# --- forward --------------------------------------------------------------------------------

def test_output_shapes_and_modes():
    torch.manual_seed(0)
    model = build_model("smoke", 7)
    x = torch.randn(3, 6561)
    assert model(x).shape == (3, 7)         # training mode too
    model.eval()
    with torch.no_grad():
        assert model.embed(x).shape == (3, 32)
        assert model.frame_features(x).shape == (3, 16, 2)


def test_wrong_input_length_raises():
    model = build_model("smoke").eval()
    with pytest.raises(ValueError, match="layer_norm") as info:
        model.embed(torch.randn(1, 6560))
    assert "6560" in str(info.value) and "6561" in str(info.value)


def test_without_layer_norm_any_length_works():
    cfg = load_config("smoke", layer_norm=False).model
    model = build_model(cfg).eval()
    assert not hasattr(model, "ln")
    with torch.no_grad():
        assert model.embed(torch.randn(2, 9000)).shape == (2, 32)


def test_strict_load_of_a_fresh_state_dict():
    torch.manual_seed(1)
    a = build_model("smoke", 5).eval()
    torch.manual_seed(2)
    b = build_model("smoke", 5).eval()
    x = torch.randn(2, 6561)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
        result = b.load_state_dict(a.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_logits_are_fc2_of_embedding_scaled_to_norm_10():
    torch.manual_seed(3)
    model = build_model("smoke", 4).eval()
    x = torch.randn(2, 6561)
    with torch.no_grad():
        code = model.embed(x)
        scaled = code * 10 / code.norm(dim=1, keepdim=True)
        torch.testing.assert_close(scaled.norm(dim=1), torch.full((2,), 10.0))
        torch.testing.assert_close(model(x), model.fc2_gru(scaled))


# --- the functional transcription of the reference forward pass --------------------------------

LEAKY = 0.3
BN_EPS = 1e-5   # PyTorch BatchNorm1d default, which the reference keeps


def _sinc_taps(low_hz_: Tensor, band_hz_: Tensor, kernel: int, sr: int) -> Tensor:
    """Facts, item 2: SincNet band-pass taps (C, 1, kernel), divided by 2 * band."""
    low = 50 + low_hz_.abs()
    high = torch.clamp(low + 50 + band_hz_.abs(), 50, sr / 2)
    band = (high - low)[:, 0]
    half = kernel // 2                                                    # 125 for 251 taps
    dtype = low_hz_.dtype
    n_ = 2 * math.pi * torch.arange(-half, 0, dtype=dtype) / sr           # arange(-125, 0)
    n_lin = torch.linspace(0, kernel / 2 - 1, half, dtype=dtype)          # linspace(0, 124.5, 125)
    window = 0.54 - 0.46 * torch.cos(2 * math.pi * n_lin / kernel)
    left = (torch.sin(high * n_) - torch.sin(low * n_)) / (n_ / 2) * window
    taps = torch.cat([left, (2 * band)[:, None], left.flip(1)], dim=1) / (2 * band)[:, None]
    return taps[:, None, :]


def _bn(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=BN_EPS)


def _gru_last(seq: Tensor, sd: dict[str, Tensor]) -> Tensor:
    """One-layer GRU (PyTorch's gate layout r, z, n in weight_*_l0), output at the last step."""
    w_ih, w_hh, b_ih, b_hh = (sd[f"gru.{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h = seq.new_zeros(seq.shape[0], w_hh.shape[1])
    for t in range(seq.shape[1]):
        gi = F.linear(seq[:, t], w_ih, b_ih)
        gh = F.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
    return h


def reference_embed(sd: dict[str, Tensor], x: Tensor, n_blocks: int, kernel: int, sr: int = 16000) -> Tensor:
    """Facts, items 1-7: waveform (B, T) -> fc1_gru embedding, in eval mode."""
    # 1. ln: affine norm over time, unbiased std, eps added to the std
    x = sd["ln.gamma"] * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6) + sd["ln.beta"]
    # 2-3. sinc filter bank, |.|, max-pool 3, first_bn, LeakyReLU(0.3)
    x = F.conv1d(x[:, None, :], _sinc_taps(sd["first_conv.low_hz_"], sd["first_conv.band_hz_"], kernel, sr))
    x = F.leaky_relu(_bn(F.max_pool1d(x.abs(), 3), sd, "first_bn"), LEAKY)
    # 4-5. residual blocks with FMS
    for i in range(n_blocks):
        p = f"block{i}.0"
        out = x if i == 0 else F.leaky_relu(_bn(x, sd, f"{p}.bn1"), LEAKY)
        out = F.conv1d(out, sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
        out = F.leaky_relu(_bn(out, sd, f"{p}.bn2"), LEAKY)
        out = F.conv1d(out, sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1)
        if f"{p}.conv_downsample.weight" in sd:
            identity = F.conv1d(x, sd[f"{p}.conv_downsample.weight"], sd[f"{p}.conv_downsample.bias"])
        else:
            identity = x
        out = F.max_pool1d(out + identity, 3)
        s = torch.sigmoid(F.linear(out.mean(-1), sd[f"{p}.frm.fc.weight"], sd[f"{p}.frm.fc.bias"]))[:, :, None]
        x = out * s + s
    # 6. bn_before_gru, LeakyReLU, GRU (last step)
    x = F.leaky_relu(_bn(x, sd, "bn_before_gru"), LEAKY)
    h = _gru_last(x.transpose(1, 2), sd)
    # 7. embedding
    return F.linear(h, sd["fc1_gru.weight"], sd["fc1_gru.bias"])


def reference_logits(sd: dict[str, Tensor], code: Tensor) -> Tensor:
    """Facts, item 8: scale the code to L2 norm 10, then fc2_gru."""
    code = code / (code.norm(p=2, dim=1, keepdim=True) / 10)
    return F.linear(code, sd["fc2_gru.weight"], sd["fc2_gru.bias"])


def _randomise(model: RawNet2, generator: torch.Generator) -> None:
    """Move every parameter and BN statistic away from its init, so the comparison sees them all."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator))
        model.ln.gamma.add_(0.1 * torch.randn(model.ln.gamma.shape, generator=generator))
        model.ln.beta.add_(0.1 * torch.randn(model.ln.beta.shape, generator=generator))
        model.first_conv.low_hz_[0] *= -1            # |low_hz_| must be taken
        model.first_conv.band_hz_[-1] = 20000.0      # the high cut-off must be clamped to 8 kHz
        model.first_conv.low_hz_[1:-1] += 20 * torch.randn(model.first_conv.low_hz_[1:-1].shape, generator=generator)
        for lin in [m for m in model.modules() if isinstance(m, nn.Linear)]:
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=generator))
        for p in model.gru.parameters():
            p.mul_(2.0)


@pytest.mark.parametrize("preset, dtype, tol", [
    ("demo", torch.float64, 1e-12),
    ("smoke", torch.float64, 1e-12),
    ("demo", torch.float32, 1e-5),
    ("smoke", torch.float32, 1e-5),
])
def test_forward_matches_functional_transcription(preset, dtype, tol):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = load_config(preset).model
    # Built under the comparison's default dtype, so the model's sinc window and time axis are
    # computed at that precision too (float32 constants would limit float64 to ~1e-6).
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(cfg, n_classes=11)
    finally:
        torch.set_default_dtype(default)
    _randomise(model, gen)
    model = model.to(dtype).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    x = torch.randn(3, cfg.n_samples, generator=gen, dtype=torch.float64)
    x[1] *= 5.0
    x = x.to(dtype)
    with torch.no_grad():
        want_code = reference_embed(sd, x, len(cfg.blocks), cfg.sinc_kernel, cfg.sample_rate)
        want_logits = reference_logits(sd, want_code)
        got_code = model.embed(x)
        got_logits = model(x)
    assert got_code.dtype == dtype
    assert got_code.shape == (3, cfg.embedding_dim) and got_logits.shape == (3, 11)
    assert want_code.abs().max() > 0.1                    # a non-trivial output
    scale = want_code.abs().max().item()
    torch.testing.assert_close(got_code, want_code, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol * want_logits.abs().max().item())
    # The transcription's taps are the model's taps (the clamp and |.| were exercised).
    taps = _sinc_taps(sd["first_conv.low_hz_"], sd["first_conv.band_hz_"], cfg.sinc_kernel, cfg.sample_rate)
    with torch.no_grad():
        torch.testing.assert_close(model.first_conv.filters(), taps, rtol=tol, atol=tol)
        assert model.first_conv.cutoffs()[1][-1].item() == pytest.approx(8000.0)


def test_functional_transcription_is_sensitive(monkeypatch):
    """The comparison is not vacuous: the same transcription with one detail wrong (PyTorch's
    default LeakyReLU slope 0.01 instead of Keras' 0.3) no longer matches the model."""
    torch.manual_seed(0)
    cfg = load_config("smoke").model
    model = build_model(cfg).double().eval()
    sd = model.state_dict()
    x = torch.randn(2, cfg.n_samples, dtype=torch.float64)
    with torch.no_grad():
        got = model.embed(x)
        torch.testing.assert_close(reference_embed(sd, x, 6, cfg.sinc_kernel), got)
        monkeypatch.setattr(sys.modules[__name__], "LEAKY", 0.01)
        assert not torch.allclose(reference_embed(sd, x, 6, cfg.sinc_kernel), got, rtol=1e-3, atol=1e-3)
