"""RawNet2 (Jung et al., Interspeech 2020): a speaker embedding straight from the waveform.

waveform -> layer norm -> SincNet filter bank -> |.| -> max-pool -> BN -> LeakyReLU
         -> 6 residual blocks, each ending in max-pool and filter-wise feature map scaling
         -> BN -> LeakyReLU -> GRU (last step) -> fc1_gru = embedding
         -> (training) the head (rawnet_lib/models/losses.py): softmax = scale to norm 10 -> fc2_gru,
            am / aam = scaled cosine to fc2_gru's rows -> speaker logits

Parameter names and shapes match the reference implementation (`block0.0.conv1.weight`,
`first_conv.low_hz_`, ...), so its checkpoints load with `strict=True`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rawnet_lib.config import Config, LossConfig, ModelConfig, load_config, pooling_blocks, stage_frames
from rawnet_lib.models.fastsinc import fast_frame_features
from rawnet_lib.models.losses import head_logits

__all__ = ["LayerNorm", "SincConv", "FMS", "ResidualBlock", "RawNet2", "build_model", "stage_frames"]

LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default, kept by the reference


class LayerNorm(nn.Module):
    """Affine normalisation over time with one gain and bias per sample (ties input length)."""

    def __init__(self, n_samples: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(n_samples))
        self.beta = nn.Parameter(torch.zeros(n_samples))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (B, T)
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased, as the reference
        return self.gamma * (x - mean) / (std + self.eps) + self.beta


def _to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595 * np.log10(1 + hz / 700)


def _to_hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595) - 1)


class SincConv(nn.Module):
    """SincNet layer: each filter is a windowed band-pass with learnable low cut-off and band.

    Only 2 numbers per filter are learnt, so the first layer keeps a meaningful frequency
    response instead of 251 free taps.
    """

    def __init__(self, out_channels: int = 128, kernel_size: int = 251, sample_rate: int = 16000,
                 min_low_hz: float = 50, min_band_hz: float = 50):
        super().__init__()
        self.out_channels, self.kernel_size, self.sample_rate = out_channels, kernel_size, sample_rate
        self.min_low_hz, self.min_band_hz = min_low_hz, min_band_hz
        # Mel-spaced initial bands between 30 Hz and Nyquist minus the minimum low + band.
        mel = np.linspace(_to_mel(30), _to_mel(sample_rate / 2 - (min_low_hz + min_band_hz)), out_channels + 1)
        hz = _to_hz(mel)
        self.low_hz_ = nn.Parameter(torch.tensor(hz[:-1], dtype=torch.float32).view(-1, 1))
        self.band_hz_ = nn.Parameter(torch.tensor(np.diff(hz), dtype=torch.float32).view(-1, 1))
        # Half of a Hamming window and half of the time axis: filters are symmetric.
        half = kernel_size // 2
        n_lin = torch.linspace(0, kernel_size / 2 - 1, steps=half)
        self.register_buffer("window_", 0.54 - 0.46 * torch.cos(2 * math.pi * n_lin / kernel_size), persistent=False)
        self.register_buffer("n_", 2 * math.pi * torch.arange(-half, 0).view(1, -1) / sample_rate, persistent=False)

    def cutoffs(self) -> tuple[Tensor, Tensor]:
        """Low and high cut-off frequencies in Hz, each (out_channels, 1)."""
        low = self.min_low_hz + self.low_hz_.abs()
        high = torch.clamp(low + self.min_band_hz + self.band_hz_.abs(), self.min_low_hz, self.sample_rate / 2)
        return low, high

    def filters(self) -> Tensor:
        """The band-pass filter taps, (out_channels, 1, kernel_size), peak gain normalised to 1.

        Always float32, autocast or not: the phases `high @ n_` reach ~400 rad, where bf16's
        spacing is 2 rad (filter taps off by up to 21 %) and fp16's 0.25 rad.
        """
        with torch.autocast(self.low_hz_.device.type, enabled=False):
            low, high = self.cutoffs()
            band = high - low
            left = (torch.sin(high @ self.n_) - torch.sin(low @ self.n_)) / (self.n_ / 2) * self.window_
            taps = torch.cat([left, 2 * band, left.flip(dims=[1])], dim=1) / (2 * band)
        return taps.view(self.out_channels, 1, self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, T) -> (B, C, T - kernel + 1)
        return F.conv1d(x, self.filters())


class FMS(nn.Module):
    """Filter-wise feature map scaling: a sigmoid gate per channel, applied as x * s + s."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def scale(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, 1)
        return torch.sigmoid(self.fc(x.mean(-1))).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale(x)
        return x * s + s


class ResidualBlock(nn.Module):
    """Pre-activation residual block, then max-pool by 3 (the reference's every block; `pool`) and FMS
    (`frm`)."""

    def __init__(self, in_channels: int, out_channels: int, first: bool = False, pool: bool = True):
        super().__init__()
        self.first, self.pool = first, pool
        if not first:
            self.bn1 = nn.BatchNorm1d(in_channels)
        self.lrelu = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_downsample = nn.Conv1d(in_channels, out_channels, kernel_size=1)
        self.mp = nn.MaxPool1d(3) if pool else nn.Identity()  # no weights: the names stay the reference's
        self.frm = FMS(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.first else self.lrelu(self.bn1(x))
        out = self.conv2(self.lrelu(self.bn2(self.conv1(out))))
        identity = self.conv_downsample(x) if hasattr(self, "conv_downsample") else x
        return self.frm(self.mp(out + identity))


class RawNet2(nn.Module):
    def __init__(self, cfg: ModelConfig, n_classes: int = 0, loss: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.loss = loss or LossConfig()
        if cfg.layer_norm:
            self.ln = LayerNorm(cfg.n_samples)
        self.first_conv = SincConv(cfg.sinc_filters, cfg.sinc_kernel, cfg.sample_rate)
        self.first_bn = nn.BatchNorm1d(cfg.sinc_filters)
        self.lrelu_keras = nn.LeakyReLU(LEAKY_SLOPE)
        widths = [cfg.sinc_filters, *cfg.blocks]
        pools = pooling_blocks(cfg)
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            # nn.Sequential only to keep the reference's key names (`block0.0.conv1.weight`).
            setattr(self, f"block{i}", nn.Sequential(ResidualBlock(c_in, c_out, first=i == 0, pool=pools[i])))
        self.n_blocks = len(cfg.blocks)
        self.bn_before_gru = nn.BatchNorm1d(widths[-1])
        self.gru = nn.GRU(widths[-1], cfg.gru_units, num_layers=cfg.gru_layers, batch_first=True)
        self.fc1_gru = nn.Linear(cfg.gru_units, cfg.embedding_dim)
        if n_classes:
            self.fc2_gru = nn.Linear(cfg.embedding_dim, n_classes)
        self.apply(_init_weights)
        if n_classes and self.loss.head != "softmax":
            self.fc2_gru.bias.requires_grad_(False)  # cosine heads have no bias; the key stays for the names

    def blocks(self) -> list[ResidualBlock]:
        return [getattr(self, f"block{i}")[0] for i in range(self.n_blocks)]

    def frame_features(self, x: Tensor) -> Tensor:
        """Waveform (B, T) -> frame-level features (B, C, frames) before the GRU."""
        if self.cfg.layer_norm:
            if x.shape[-1] != self.cfg.n_samples:
                raise ValueError(f"input has {x.shape[-1]} samples but the layer norm needs exactly "
                                 f"{self.cfg.n_samples}; crop the audio or use a model with layer_norm: false")
            x = self.ln(x)
        if self.cfg.fast:  # the same maths, fused and channels-last (rawnet_lib/models/fastsinc.py)
            return fast_frame_features(self, x)
        with torch.autocast(x.device.type, enabled=False):  # sinc, |.| and pool in float32 (README: AMP)
            x = F.max_pool1d(self.first_conv(x.unsqueeze(1)).abs(), 3)
        x = self.lrelu_keras(self.first_bn(x))
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i}")(x)  # the registered child, so hooks on `block<i>` fire
        return self.lrelu_keras(self.bn_before_gru(x))

    def embed(self, x: Tensor) -> Tensor:
        """Speaker embedding (B, embedding_dim): `fc1_gru` of the GRU's last time step."""
        frames = self.frame_features(x).transpose(1, 2)  # (B, frames, C)
        self.gru.flatten_parameters()
        out, _ = self.gru(frames)
        return self.fc1_gru(out[:, -1])

    def forward(self, x: Tensor) -> Tensor:
        """Speaker logits (B, n_classes) of the head (softmax: fc2_gru of the embedding scaled to norm 10)."""
        return head_logits(self.embed(x), self.fc2_gru, self.loss)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        module.bias.data.fill_(0.0001)
    elif isinstance(module, nn.Conv1d):
        nn.init.kaiming_normal_(module.weight, a=0.01)


def build_model(config: Config | ModelConfig | str = "paper", n_classes: int = 0) -> RawNet2:
    """RawNet2 for a config, its model block, or a preset name; n_classes=0 leaves out fc2_gru.
    A full Config also gives the head (its loss block); a model block alone gets softmax."""
    if isinstance(config, str):
        config = load_config(config)
    if isinstance(config, Config):
        return RawNet2(config.model, n_classes, config.loss)
    return RawNet2(config, n_classes)
