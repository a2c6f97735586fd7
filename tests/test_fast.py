"""The fast path (rawnet_lib/fastsinc.py) computes what the exact path computes; the benchmark runs.

Correctness only, no timing assertions. The element-wise kernels run eagerly here (no compile
time) except in the test that checks the compiled kernels against the eager ones.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from rawnet_lib import bench, fastsinc
from rawnet_lib.config import load_config
from rawnet_lib.model import SincConv, build_model


@pytest.fixture(autouse=True)
def eager_kernels():
    previous = fastsinc.set_compile(False)
    yield
    fastsinc.set_compile(previous)


def _exact_sinc_pool(x, taps):
    return F.max_pool1d(F.conv1d(x.unsqueeze(1), taps.unsqueeze(1)).abs(), 3)


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _pair(preset: str, n_classes: int = 10, calibrate: bool = False):
    """(exact, fast) models of a preset with the same weights; `calibrate` sets the batch-norm
    statistics from one training-mode pass over noise, as training would (fresh statistics of
    0 and 1 leave an untrained network badly scaled in eval mode)."""
    torch.manual_seed(0)
    exact = build_model(preset, n_classes)
    if calibrate:
        bench.calibrate_batch_norm(exact, torch.randn(8, exact.cfg.n_samples, generator=torch.Generator().manual_seed(9)))
    cfg = copy.deepcopy(exact.cfg)
    cfg.fast = True
    fast = build_model(cfg, n_classes)
    fast.load_state_dict(exact.state_dict(), strict=True)
    return exact, fast


# --- the fused sinc operation ----------------------------------------------------------------------

@pytest.mark.parametrize("block", [6, 12])
def test_sinc_abs_pool_is_exact_in_float64(block):
    """Forward and both gradients equal the conv1d -> abs -> max_pool1d chain to rounding."""
    gen = torch.Generator().manual_seed(1)
    taps = torch.randn(5, 31, generator=gen, dtype=torch.float64)
    taps = (taps + taps.flip(-1)) / 2
    x = torch.randn(3, 1000, generator=gen, dtype=torch.float64)
    xe, te = x.clone().requires_grad_(), taps.clone().requires_grad_()
    xf, tf = x.clone().requires_grad_(), taps.clone().requires_grad_()
    ref, out = _exact_sinc_pool(xe, te), fastsinc.sinc_abs_pool(xf, tf, block=block)
    assert out.shape == ref.shape == (3, 5, (1000 - 31 + 1) // 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_x, grad_taps = _grads(ref, [xe, te])
    fast_x, fast_taps = _grads(out, [xf, tf])
    torch.testing.assert_close(fast_x, grad_x, rtol=1e-10, atol=1e-10)
    # symmetric taps: only the gradient's symmetric part reaches the filter parameters
    torch.testing.assert_close(fast_taps, (grad_taps + grad_taps.flip(-1)) / 2, rtol=1e-10, atol=1e-10)


def test_sinc_abs_pool_refuses_asymmetric_taps_and_bad_blocks():
    x = torch.randn(1, 200)
    with pytest.raises(ValueError, match="symmetric"):
        fastsinc.sinc_abs_pool(x, torch.randn(4, 11))
    with pytest.raises(ValueError, match="multiple of 6"):
        fastsinc.sinc_abs_pool(x, torch.ones(4, 11), block=9)


def test_fast_sinc_float32_close_to_exact_with_parameter_gradients():
    """The real SincConv in float32: outputs and the gradients w.r.t. low_hz_ / band_hz_ and the
    input match the exact path (which is itself only float32-accurate: both are compared to a
    float64 run, the fast path must be at least about as close)."""
    torch.manual_seed(0)
    conv = SincConv(32, 251)
    x = torch.randn(2, 8000, generator=torch.Generator().manual_seed(2))
    params = [conv.low_hz_, conv.band_hz_]

    def run(fast: bool, dtype: torch.dtype):
        m = copy.deepcopy(conv).to(dtype)
        xx = x.to(dtype).requires_grad_()
        out = fastsinc.fast_sinc_pool(m, xx) if fast else F.max_pool1d(m(xx.unsqueeze(1)).abs(), 3)
        return [out, *_grads(out, [xx, m.low_hz_, m.band_hz_])]

    truth = run(False, torch.float64)
    fast, exact = run(True, torch.float32), run(False, torch.float32)
    assert fast[0].is_contiguous(memory_format=torch.contiguous_format) is False  # channels innermost
    for name, f, e, t in zip(["output", "input grad", "low_hz_ grad", "band_hz_ grad"], fast, exact, truth):
        err_fast, err_exact = _rel(f.double(), t), _rel(e.double(), t)
        assert err_fast < max(3 * err_exact, 1e-5), (name, err_fast, err_exact)
    assert len(params) == 2


# --- the whole model --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_fast_model_matches_exact_in_float32(preset):
    """Same logits, parameter gradients and batch-norm statistics as the exact path."""
    exact, fast = _pair(preset)
    x = torch.randn(4, exact.cfg.n_samples, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    losses = [F.cross_entropy(m(x), y) for m in (exact, fast)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(loss, list(m.parameters())) for loss, m in zip(losses, (exact, fast))]
    scale = torch.cat([g.flatten() for g in grads[0]]).norm().item()
    for (name, _), ge, gf in zip(exact.named_parameters(), *grads):
        # Relative to each gradient, plus a floor for the conv1 biases: they feed a batch norm, so
        # their true gradient is 0 and both paths return rounding noise. (An argmax of |sinc| that
        # flips between two float32-equal samples moves a ln.gamma gradient by one sample.)
        assert (ge - gf).norm().item() <= 2e-3 * ge.norm().item() + 1e-6 * scale, name
    for (name, be), bf in zip(exact.named_buffers(), fast.buffers()):
        torch.testing.assert_close(bf, be, rtol=1e-4, atol=1e-6, msg=name)
    exact.eval(), fast.eval()
    with torch.no_grad():
        cosine = F.cosine_similarity(exact.embed(x), fast.embed(x))
    assert cosine.min() > 0.99999


def test_fast_bf16_embeddings_close_to_exact_float32(smoke_run, tiny_db):
    """A trained model on speech crops: fast path with bf16 autocast vs the exact path in float32.

    bf16 keeps 8 significant bits (relative rounding up to 2^-9 per value), and the rounding of
    a dozen layers adds up: cosine > 0.99 per crop and > 0.998 on average are loose bounds
    (measured 0.994 / 0.9994 here; 0.9996 / 0.99988 for the demo model after 10 epochs, where
    the exact path under bf16 autocast gets only 0.95 / 0.98 because its sinc phases, up to
    ~400 rad, are rounded to bf16 too). Untrained weights are more sensitive: not used here."""
    from rawnet_lib.checkpoint import load_checkpoint_model
    model, cfg = load_checkpoint_model(smoke_run / "models" / "best_opt_eval.pt")
    x = bench._crops(cfg, 16, tiny_db)
    with torch.no_grad():
        ref = model.embed(x)
        model.cfg.fast = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.embed(x).float()
    cosine = F.cosine_similarity(ref, out)
    assert cosine.min() > 0.99 and cosine.mean() > 0.998


def test_fast_is_a_compute_path_not_a_model():
    """Same state_dict keys and shapes; checkpoints load either way."""
    exact, fast = _pair("smoke")
    assert {k: v.shape for k, v in exact.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    exact.load_state_dict(fast.state_dict(), strict=True)


def test_eval_filter_cache_follows_the_parameters():
    """With gradients off the filters are cached, and rebuilt after an optimiser step or a load."""
    exact, fast = _pair("smoke")
    x = torch.randn(2, fast.cfg.n_samples, generator=torch.Generator().manual_seed(5))
    fast.eval()
    with torch.no_grad():
        before = fast.embed(x)
    key = fastsinc._cache[fast.first_conv][0]
    fast.train()
    optimizer = torch.optim.SGD(fast.parameters(), lr=10.0)
    F.cross_entropy(fast(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    exact.load_state_dict(fast.state_dict())
    fast.eval(), exact.eval()
    with torch.no_grad():
        after, ref = fast.embed(x), exact.embed(x)
    assert fastsinc._cache[fast.first_conv][0] != key
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # load_state_dict copies in place: the cache must notice that too
        fast.first_conv.low_hz_.add_(100.0)
        exact.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast.embed(x), exact.embed(x), rtol=1e-4, atol=1e-5)


def test_forward_hooks_still_fire_on_the_fast_path():
    exact, fast = _pair("smoke")
    seen = []
    handle = fast.block0.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, fast.cfg.n_samples)
    fast.eval(), exact.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast.embed(x), exact.embed(x), rtol=1e-4, atol=1e-5)
    handle.remove()
    assert seen and seen[0][:2] == (2, fast.cfg.blocks[0])


def test_compiled_kernels_match_eager():
    """torch.compile'd pooling kernels give the eager ops' results (float32, exact equality)."""
    gen = torch.Generator().manual_seed(6)
    s, a = torch.randn(50, 1, 3, 8, generator=gen), torch.randn(50, 1, 3, 8, generator=gen)
    grad = torch.randn(50, 2, 8, generator=gen)
    y, grad_y = torch.randn(2, 40, 3, 8, generator=gen), torch.randn(2, 40, 8, generator=gen)
    results = {}
    for compiled in (False, True):
        fastsinc.set_compile(compiled)
        out, code = torch.empty(99, 8), torch.empty(100, 8, dtype=torch.int8)
        fastsinc._kernel("sinc_pool")(s, a, out, code)
        unpooled = fastsinc._kernel("sinc_unpool")(grad, code.view(50, 2, 8))
        peak, pool_code = fastsinc._kernel("pool_peak")(y)
        pool_grad = fastsinc._kernel("pool_grad")(grad_y, pool_code, 122)
        results[compiled] = [out, code, *unpooled, peak, pool_code, pool_grad]
    assert results[False][-1].shape == (2, 122, 8)
    for got, ref in zip(results[True], results[False]):
        assert torch.equal(got, ref)


# --- the benchmark ----------------------------------------------------------------------------------

def test_model_gflop_matches_the_reference_arithmetic():
    """~5.7 GMAC per paper crop forward, a third of it in the sinc layer (rawnet2.md)."""
    flop = bench.model_gflop(load_config("paper").model)
    assert flop["total"] == pytest.approx(2 * 5.69, rel=0.01)
    assert flop["sinc"] / flop["total"] == pytest.approx(1 / 3, abs=0.02)
    assert flop["train"] == pytest.approx(3 * flop["total"])


def test_bench_quick_prints_one_json_line_per_measurement(tiny_db, capsys):
    records = bench.main(["all", "--quick", "--data_path", str(tiny_db)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == records
    names = {r["name"] for r in records}
    assert names == {"matmul_peak", "train_step", "train_memory", "embed", "load", "score"}
    for r in records:
        assert {"device", "torch", "threads", "peak_rss_mib"} <= set(r)
    speed = [r for r in records if r["name"] in ("train_step", "embed")]
    assert {(r["name"], r["path"]) for r in speed} == {(n, p) for n in ("train_step", "embed") for p in ("exact", "fast")}
    assert all(r["crops_per_s"] > 0 and r["gflops"] > 0 and r["ratio"] > 0 for r in speed)
    assert next(r for r in records if r["name"] == "embed" and r["path"] == "fast")["cosine_min"] > 0.99
    assert next(r for r in records if r["name"] == "load")["crops_per_s"] > 0
    assert next(r for r in records if r["name"] == "score")["seconds"] > 0
    assert fastsinc.compile_enabled() is False  # quick mode restored the fixture's setting


@pytest.mark.notebook
def test_benchmark_notebook_quick(run_notebook, tiny_db, tmp_path):
    run_notebook("benchmark", quick=True, data_path=str(tiny_db), out_dir=str(tmp_path))
    (run,) = tmp_path.iterdir()
    records = json.loads((run / "records.json").read_text())
    assert {r["name"] for r in records} >= {"train_step", "embed", "load", "score"}
    assert (run / "speed.png").stat().st_size > 0 and (run / "memory.png").stat().st_size > 0
