"""Export: ONNX (onnxruntime) and TorchScript embeddings match PyTorch fp32, for the demo and paper presets."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from rawnet_lib.bench import calibrate_batch_norm
from rawnet_lib.config import load_config
from rawnet_lib.export import OPSET, embedding_network, export_model, onnx_embedder
from rawnet_lib.models.checkpoint import model_checkpoint, save_checkpoint
from rawnet_lib.models.rawnet2 import build_model

PARITY = 0.9999  # cosine to PyTorch fp32 (issue 13); both run the same float32 maths


def _checkpoint(preset: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    calibrate_batch_norm(model, torch.randn(2, cfg.model.n_samples))  # untrained weights, sane statistics
    path = tmp_path / f"{preset}.pt"
    save_checkpoint(model_checkpoint(model, cfg, [], 0, 0.0), path)
    return model.eval(), path


@pytest.fixture(scope="module")
def smoke_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The smoke preset (small enough to export in the quick loop) and its ONNX export."""
    tmp = tmp_path_factory.mktemp("export")
    model, ckpt = _checkpoint("smoke", tmp)
    return model, export_model(ckpt, "onnx", tmp / "smoke.onnx")


def test_onnx_is_float32_pytorch_up_to_float32_rounding(smoke_onnx) -> None:
    """Against the float64 evaluation of the same network, onnxruntime's float32 error is of
    the order of PyTorch's float32 error (both round the same maths; a wrong filter, eps or GRU
    gate would be far above it), at batch 1 and 5 on the dynamic batch axis."""
    model, out = smoke_onnx
    run, cfg = onnx_embedder(out)
    net = embedding_network(model)
    x = torch.randn(5, cfg.model.n_samples, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        exact = copy.deepcopy(net).double()(x)
        float32 = net(x.float()).double()
    for batch in (x[:1], x):
        got = torch.from_numpy(run(batch.float().numpy())).double()
        want, ours = exact[:len(batch)], float32[:len(batch)]
        assert got.shape == want.shape
        assert (got - want).norm() <= 10 * max((ours - want).norm(), np.finfo(np.float32).eps * want.norm())


def test_an_onnx_file_alone_says_how_to_feed_it(smoke_onnx) -> None:
    """Whoever gets only the .onnx file learns from it the rate, the normalisation and the
    crops its embeddings were made with, not only their length; and its opset and dtype."""
    import onnxruntime as ort
    model, out = smoke_onnx
    graph = onnx.load(str(out))
    assert {o.domain: o.version for o in graph.opset_import}[""] == OPSET
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    text = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().description
    m = model.cfg
    for needed in (f"{m.sample_rate} Hz", "mono float32", "max|x|", f"crops of {m.n_samples} samples",
                   f"{load_config('smoke').evaluation.eval_hop} apart", "last crop ends", "repeated",
                   "average", "cosine"):
        assert needed in text, needed


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_onnx_export_matches_pytorch(preset: str, tmp_path: Path) -> None:
    model, ckpt = _checkpoint(preset, tmp_path)
    out = export_model(ckpt, "onnx", tmp_path / f"{preset}.onnx")
    graph = onnx.load(str(out))
    assert "GRU" in {n.op_type for n in graph.graph.node}       # one ONNX GRU op, not an unrolled loop
    assert [i.name for i in graph.graph.input] == ["waveform"]
    run, cfg = onnx_embedder(out)
    assert cfg.model == model.cfg
    x = torch.randn(3, cfg.model.n_samples, generator=torch.Generator().manual_seed(1))  # batch 3: dynamic
    with torch.no_grad():
        ref = model.embed(x)
    got = torch.from_numpy(run(x.numpy()))
    assert got.shape == ref.shape
    assert F.cosine_similarity(got.double(), ref.double()).min() >= PARITY


@pytest.mark.slow
def test_torchscript_export_and_onnx_verifier(tmp_path: Path) -> None:
    from rawnet_lib.verify import Verifier
    model, ckpt = _checkpoint("demo", tmp_path)
    ts = torch.jit.load(str(export_model(ckpt, "torchscript", tmp_path / "demo.ts.pt")))
    x = torch.randn(5, model.cfg.n_samples, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert F.cosine_similarity(ts(x), model.embed(x)).min() >= PARITY
    onnx_file = export_model(ckpt, "onnx", tmp_path / "demo.onnx")
    from rawnet_lib.io import OutputExistsError
    with pytest.raises(OutputExistsError, match=r"demo\.onnx exists; give another output path, or --overwrite"):
        export_model(ckpt, "onnx", onnx_file)
    with pytest.raises(OutputExistsError, match=r"is also an input"):
        export_model(ckpt, "torchscript", ckpt, overwrite=True)  # the checkpoint itself, never
    assert export_model(ckpt, "onnx", onnx_file, overwrite=True) == onnx_file
    audio = np.sin(np.linspace(0, 4000, 40000)).astype(np.float32)
    by_torch = Verifier.from_checkpoint(ckpt, device="cpu", amp="off").embed(audio)  # not bf16 (cpu_amp)
    by_onnx = Verifier.from_checkpoint(onnx_file)
    assert by_onnx.backend == "onnxruntime"
    emb = by_onnx.embed(audio)
    assert float(np.dot(emb, by_torch) / np.linalg.norm(emb) / np.linalg.norm(by_torch)) >= PARITY
    from rawnet_lib.eval.calibrate import calibration_path
    calibration_path(ckpt).write_text("{}")  # beside C.pt, and so beside C.onnx too: kept, not copied onto itself
    assert export_model(ckpt, "onnx", ckpt.with_suffix(".onnx"), overwrite=True).is_file()
    assert calibration_path(ckpt).read_text() == "{}"


@pytest.mark.slow
def test_an_export_carries_its_checkpoints_calibration_and_drops_a_stale_one(tmp_path: Path) -> None:
    from rawnet_lib.eval.calibrate import calibration_path, fit_calibration, load_calibration
    from rawnet_lib.io import OutputExistsError, file_sha1
    from rawnet_lib.verify import Verifier
    _, ckpt = _checkpoint("demo", tmp_path)
    protocol = Verifier.from_checkpoint(ckpt, device="cpu").protocol
    scores, labels = np.r_[np.linspace(0.3, 0.9, 6), np.linspace(-0.2, 0.5, 6)], np.r_[np.ones(6), np.zeros(6)]
    fit_calibration(scores, labels, source={"model_sha1": file_sha1(ckpt), **protocol}).save(calibration_path(ckpt))
    out = export_model(ckpt, "onnx", tmp_path / "shipped" / "rawnet2.onnx")
    assert Verifier.from_checkpoint(out).calibration is not None  # fitted for the weights the ONNX file holds
    other = tmp_path / "other"
    other.mkdir()
    _, bare = _checkpoint("demo", other)  # another checkpoint, without a calibration
    with pytest.raises(OutputExistsError):
        export_model(bare, "onnx", out)
    export_model(bare, "onnx", out, overwrite=True)
    assert not calibration_path(out).exists()  # the earlier export's calibration went with it
    assert load_calibration(calibration_path(ckpt)).source["model_sha1"] == file_sha1(ckpt)  # the source's, kept
