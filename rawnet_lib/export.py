"""Export the embedding network of a checkpoint to ONNX or TorchScript, for use outside PyTorch.

    python -m rawnet_lib.export --checkpoint outputs/train/.../models/best_opt_eval.pt --format onnx --out rawnet2.onnx
    python -m rawnet_lib.export --checkpoint C --format torchscript --out rawnet2.pt

One input, `waveform` (batch, n_samples): peak-normalised crops of the model's crop length at
16 kHz, the batch dimension dynamic; one output, `embedding` (batch, embedding_dim), the
`fc1_gru` output. Cutting a file into crops and averaging their embeddings stays outside
(`rawnet_lib.verify` does both for an exported model too).

What needed care:
* the sinc layer computes its filters from `low_hz_` and `band_hz_` on every call; the export
  stores the filters of the trained parameters as one constant conv weight (the same numbers);
* the fast path's fused kernels (`model.fast`) are not exportable: the exact path is exported,
  which computes the same function;
* the GRU becomes one ONNX `GRU` op (opset 18, torch.export-based exporter), of which only the
  last time step feeds `fc1_gru`.
The model's config travels in the ONNX file's metadata (`rawnet_config`), so the crop length
and test-time hop are known without the checkpoint, and so does the checkpoint's SHA-1
(`rawnet_checkpoint_sha1`), which a calibration names; the file's description
(`input_description`) says in words how to prepare the input and average the output, for a user
of the file alone. The checkpoint's calibration is copied beside the export, and one left there
by an earlier export is replaced or removed with it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rawnet_lib.config import Config, ConfigError, cli_parser
from rawnet_lib.errors import WorkbookError, run_cli
from rawnet_lib.eval.calibrate import calibration_path
from rawnet_lib.io import atomic_path, atomic_write_bytes, check_output, file_sha1
from rawnet_lib.models.checkpoint import load_checkpoint_model
from rawnet_lib.models.rawnet2 import RawNet2

__all__ = ["OPSET", "FORMATS", "ExportError", "embedding_network", "input_description", "export_model",
           "onnx_embedder", "exported_from", "main"]

OPSET = 18
FORMATS = ("onnx", "torchscript")
CONFIG_KEY = "rawnet_config"
SOURCE_KEY = "rawnet_checkpoint_sha1"


class ExportError(WorkbookError, ValueError):
    """An export that cannot be made or an exported file that cannot be used."""


class _FixedFilters(nn.Module):
    """The sinc layer with its filters computed once: a plain convolution with constant taps."""

    def __init__(self, taps: Tensor):
        super().__init__()
        self.register_buffer("taps", taps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.taps)


class _Embedder(nn.Module):
    def __init__(self, model: RawNet2):
        super().__init__()
        self.model = model

    def forward(self, waveform: Tensor) -> Tensor:
        return self.model.embed(waveform)


def embedding_network(model: RawNet2) -> nn.Module:
    """waveform (batch, n_samples) -> fc1_gru embedding: a float32, eval-mode copy on the CPU with
    constant sinc filters, the exact path, and no classification head."""
    net = copy.deepcopy(model).float().cpu().eval()
    net.cfg = dataclasses.replace(model.cfg, fast=False)
    with torch.no_grad():
        net.first_conv = _FixedFilters(net.first_conv.filters().detach().clone())
    if hasattr(net, "fc2_gru"):
        del net.fc2_gru
    return _Embedder(net).eval()


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, preset: str = "paper",
                 overwrite: bool = False) -> Path:
    """Write the embedding network of `checkpoint` as ONNX or TorchScript to `out` (and its
    calibration beside it, when the checkpoint has one); returns `out`. An existing `out` or
    calibration there is replaced (or, when the checkpoint has none, removed) only with
    `overwrite`; the checkpoint itself never."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_output(out, overwrite, [checkpoint])
    calibration, beside_out = calibration_path(checkpoint), calibration_path(out)
    own = beside_out.resolve() == calibration.resolve()  # best.pt -> best.onnx: the same file, kept
    copy_calibration = calibration.is_file() and not own
    if not own and (copy_calibration or beside_out.exists()):
        check_output(beside_out, overwrite, [checkpoint, calibration])
    model, cfg = load_checkpoint_model(checkpoint, base=preset)
    meta = {CONFIG_KEY: json.dumps(cfg.to_dict()), SOURCE_KEY: file_sha1(checkpoint)}
    description = input_description(cfg)
    net = embedding_network(model)
    example = torch.randn(2, cfg.model.n_samples, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on tracing; parity is tested instead
        if fmt == "onnx":
            _export_onnx(net, example, tmp, meta, description)
        else:
            traced = torch.jit.trace(net, example)
            torch.jit.save(traced, str(tmp), _extra_files={**meta, "description": description})
    if copy_calibration:
        atomic_write_bytes(beside_out, calibration.read_bytes())
    elif not own and beside_out.exists():  # an earlier export's: it calibrates other weights
        beside_out.unlink()
    return out


def input_description(cfg: Config) -> str:
    """How to feed the exported network and use its output, for whoever has the file alone: the
    rate, the normalisation and the crops that `rawnet_lib.verify` applies (`utterance_crops`)."""
    m, hop = cfg.model, cfg.evaluation.eval_hop
    return (f"RawNet2 speaker embedding (fc1_gru). Input waveform (batch, {m.n_samples}): mono float32 audio at "
            f"{m.sample_rate} Hz; divide each utterance by its peak (x / max|x|), then cut it into "
            f"floor((length - {m.n_samples - hop}) / {hop}) + 1 crops of {m.n_samples} samples {hop} apart from "
            f"the start, except that the last crop ends at the utterance's end (an utterance of at most "
            f"{m.n_samples} samples is repeated to fill one crop). Output embedding (batch, {m.embedding_dim}): "
            "average an utterance's crop embeddings; the score of two utterances is the cosine of their averages. "
            f"The model's config is the {CONFIG_KEY} metadata; python -m rawnet_lib.verify does all of this.")


def _export_onnx(net: nn.Module, example: Tensor, path: Path, meta: dict[str, str], description: str) -> None:
    import onnx
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(net, (example,), str(path), input_names=["waveform"], output_names=["embedding"],
                      dynamic_shapes={"waveform": {0: batch}}, opset_version=OPSET, dynamo=True,
                      external_data=False, verbose=False)
    graph = onnx.load(str(path))
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.doc_string = description  # what viewers and onnxruntime's modelmeta.description show
    onnx.save(graph, str(path))


def exported_from(path: str | Path) -> str:
    """The SHA-1 of the checkpoint an ONNX file was exported from (its own for files exported
    before it was recorded): what a calibration beside it must have been fitted for."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in graph.metadata_props}.get(SOURCE_KEY) or file_sha1(path)


def onnx_embedder(path: str | Path, threads: int = 0) -> tuple[Callable[[np.ndarray], np.ndarray], Config]:
    """(crops (batch, n_samples) float32 -> embeddings, the model's Config) of an exported ONNX
    file, run by onnxruntime on the CPU (`threads` 0: its default)."""
    import onnxruntime as ort
    path = Path(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own types for bad files)
        raise ExportError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0][:200]}); give a file "
                          "written by python -m rawnet_lib.export --format onnx") from None
    meta = session.get_modelmeta().custom_metadata_map
    if CONFIG_KEY not in meta:
        raise ExportError(f"{path}: an ONNX file without {CONFIG_KEY} metadata, so its crop length is unknown; "
                          "export it with python -m rawnet_lib.export")
    try:
        cfg = Config.from_dict(json.loads(meta[CONFIG_KEY]))
    except (ConfigError, ValueError) as err:
        raise ExportError(f"{path}: its {CONFIG_KEY} metadata is not a config this version reads ({err}); export "
                          "the checkpoint again with python -m rawnet_lib.export") from None
    name = session.get_inputs()[0].name

    def run(crops: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(crops, dtype=np.float32)})[0]
    return run, cfg


def main(argv: list[str] | None = None) -> Path:
    parser = cli_parser("python -m rawnet_lib.export", __doc__, preset="paper", fields=(),
                        config_help="settings for a bare reference state_dict: preset name or YAML")
    parser.add_argument("--checkpoint", required=True, help="a .pt file: ours or a bare reference state_dict")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its calibration)")
    args = parser.parse_args(argv)
    out = export_model(args.checkpoint, args.format, args.out, args.config, overwrite=args.overwrite)
    print(json.dumps({"checkpoint": str(args.checkpoint), "format": args.format, "out": str(out),
                      "opset": OPSET if args.format == "onnx" else None}))
    return out


if __name__ == "__main__":
    run_cli(main)
