"""The fast path (rawnet_lib/models/fastsinc.py) computes what the exact path computes; the benchmark runs.

Correctness only, no timing assertions. The element-wise kernels run eagerly here (no compile
time) except in the test that checks the compiled kernels against the eager ones.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rawnet_lib import bench
from rawnet_lib.config import load_config
from rawnet_lib.models import fastsinc
from rawnet_lib.models.rawnet2 import SincConv, build_model


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

def _loss_and_grads(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def _module_scales(model, grads) -> dict[str, float]:
    """Each parameter's scale: the norm of the gradient of the whole module that owns it. A conv
    bias that feeds a batch norm has a true gradient of 0, so its own norm is no scale; its
    module's weight gradient is (the rounding noise of the bias is of the weight's order)."""
    owner = {name: name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
    sums: dict[str, float] = {}
    for name, g in zip(owner, grads):
        sums[owner[name]] = sums.get(owner[name], 0.0) + g.double().pow(2).sum().item()
    return {name: sums[owner[name]] ** 0.5 for name in owner}


@pytest.mark.parametrize("preset", ["smoke", "demo", pytest.param(
    load_config("smoke", blocks=[8, 8, 16, 16, 16, 16, 16], block_pool=[True, False, True, False, True, False, True]),
    id="smoke-pool-per-stage")])
def test_fast_model_is_the_same_function_in_float64(preset):
    """Both paths in float64: logits, every parameter gradient and the batch-norm statistics agree
    to float64 rounding (2.2e-16 relative, amplified by depth: 1e-9 of each module's gradient
    scale leaves six orders of margin and is met on any CPU, since no max-pool tie flips in
    float64). This is the test of the maths; float32 below only checks its precision."""
    exact, fast = _pair(preset)
    exact, fast = exact.double(), fast.double()
    x = torch.randn(4, exact.cfg.n_samples, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    (loss_e, grads_e), (loss_f, grads_f) = _loss_and_grads(exact, x, y), _loss_and_grads(fast, x, y)
    assert abs(loss_f.item() - loss_e.item()) <= 1e-12 * loss_e.item()
    scales = _module_scales(exact, grads_e)
    for (name, _), ge, gf in zip(exact.named_parameters(), grads_e, grads_f):
        assert (ge - gf).norm().item() <= 1e-9 * scales[name], name
    for (name, be), bf in zip(exact.named_buffers(), fast.buffers()):
        torch.testing.assert_close(bf, be, rtol=1e-12, atol=1e-12 * be.abs().max().item(), msg=name)


@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_fast_model_in_float32_is_as_close_to_float64_as_the_exact_path(preset):
    """Both paths in float32 against the float64 truth.

    The forward pass is continuous, so logits, loss, batch-norm statistics and embeddings are
    bounded by rounding: float32 keeps 2^-24 relative per operation; a few thousand operations
    in a row give at most ~1e-4 of each quantity's own scale. Gradients are not continuous: where
    two samples of a max-pool window are equal to float32 rounding, the argmax (and with it the
    gradient's route) can flip, moving a layer's gradient by several per cent (measured up to
    5 % in one layer, 1.6 % of the whole gradient, on either path, depending on the CPU's
    summation order). So float32 gradients are compared as a whole: they must point the same
    way as float64's (cosine >= 0.998, i.e. a relative error below ~6 %); every layer's
    gradient is checked exactly in float64 above."""
    exact, fast = _pair(preset)
    truth = copy.deepcopy(exact).double()
    x = torch.randn(4, exact.cfg.n_samples, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    loss_t, grads_t = _loss_and_grads(truth, x.double(), y)
    flat_t = torch.cat([g.flatten() for g in grads_t])
    for model in (exact, fast):
        loss, grads = _loss_and_grads(model, x, y)
        assert abs(loss.item() - loss_t.item()) <= 1e-4 * loss_t.item()
        flat = torch.cat([g.flatten() for g in grads]).double()
        assert F.cosine_similarity(flat, flat_t, dim=0).item() >= 0.998
        for (name, bt), b in zip(truth.named_buffers(), model.buffers()):
            if b.is_floating_point():
                assert (b.double() - bt).abs().max().item() <= 1e-4 * (bt.abs().max().item() + 1e-30), name
    truth.eval(), exact.eval(), fast.eval()
    with torch.no_grad():
        ref = truth.embed(x.double())
        for model in (exact, fast):
            assert F.cosine_similarity(model.embed(x).double(), ref).min().item() > 1 - 1e-6


def test_fast_bf16_embeddings_close_to_exact_float32(smoke_run, tiny_db):
    """A trained model on speech crops: fast path with bf16 autocast vs the exact path in float32.

    bf16 keeps 8 significant bits (relative rounding up to 2^-9 per value), and the rounding of
    a dozen layers adds up: cosine > 0.99 per crop and > 0.998 on average are loose bounds
    (measured 0.994 / 0.9994 here; 0.9996 / 0.99988 for the demo model after 10 epochs, where
    the exact path under bf16 autocast gets only 0.95 / 0.98 because its sinc phases, up to
    ~400 rad, are rounded to bf16 too). Untrained weights are more sensitive: not used here."""
    from rawnet_lib.models.checkpoint import load_checkpoint_model
    model, cfg = load_checkpoint_model(smoke_run / "models" / "best_opt_eval.pt")
    x, source = bench.speech_crops(cfg, 16, tiny_db)
    assert source == "speech"
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


def _window_values(code, y, signed):
    """The sample of each 3-sample window (..., 3, C) that a code (1..3, negative for a negative
    sample when signed) names."""
    idx = code.abs().long() - 1
    chosen = torch.gather(y, -2, idx.unsqueeze(-2)).squeeze(-2)
    if signed:
        assert torch.equal(code < 0, chosen < 0)
        chosen = chosen.abs()
    return chosen


ONE_ROUNDING = {"rtol": 2.0 ** -23, "atol": 2.0 ** -23}


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    """torch.compile'd pooling kernels compute what the eager ops compute.

    The kernels only compare, add, negate and multiply by 0/+-1 masks: each value goes through at
    most one rounding, whatever the vector width or instruction order the compiler picks, so values
    agree to one float32 rounding (2^-24 relative; inputs are of unit scale). A vectorised loop may
    pick another of two equal maxima, so codes are checked by what they select (a maximum of the
    window), and the compiled gradient kernels against the eager ones given the same codes."""
    gen = torch.Generator().manual_seed(6)
    s, a = torch.randn(50, 1, 3, 8, generator=gen), torch.randn(50, 1, 3, 8, generator=gen)
    grad = torch.randn(50, 2, 8, generator=gen)
    y, grad_y = torch.randn(2, 40, 3, 8, generator=gen), torch.randn(2, 40, 8, generator=gen)
    results = {}
    for compiled in (False, True):
        fastsinc.set_compile(compiled)
        out, code = torch.empty(99, 8), torch.empty(100, 8, dtype=torch.int8)
        fastsinc._kernel("sinc_pool")(s, a, out, code)
        peak, pool_code = fastsinc._kernel("pool_peak")(y)
        results[compiled] = out, code, peak, pool_code
    (out_e, _, peak_e, _), (out_c, code_c, peak_c, pool_code_c) = results[False], results[True]
    torch.testing.assert_close(out_c, out_e, **ONE_ROUNDING)
    torch.testing.assert_close(peak_c, peak_e, **ONE_ROUNDING)
    # each code picks a window maximum: top half windows hold s + a, bottom half s - a, reversed
    windows = torch.cat([s + a, (s - a).flip(1)], 1).view(100, 3, 8)
    torch.testing.assert_close(_window_values(code_c, windows, signed=True), windows.abs().amax(1), **ONE_ROUNDING)
    torch.testing.assert_close(_window_values(pool_code_c, y, signed=False), peak_e, **ONE_ROUNDING)
    fastsinc.set_compile(False)
    eager_unpool = fastsinc._kernel("sinc_unpool")(grad, code_c.view(50, 2, 8))
    eager_pool_grad = fastsinc._kernel("pool_grad")(grad_y, pool_code_c, 122)
    fastsinc.set_compile(True)
    unpooled = fastsinc._kernel("sinc_unpool")(grad, code_c.view(50, 2, 8))
    pool_grad = fastsinc._kernel("pool_grad")(grad_y, pool_code_c, 122)
    assert pool_grad.shape == (2, 122, 8)
    for got, ref in zip([*unpooled, pool_grad], [*eager_unpool, eager_pool_grad]):
        torch.testing.assert_close(got, ref, **ONE_ROUNDING)


_KERNEL_RUN = """
import os
import torch
from rawnet_lib.models import fastsinc
g = torch.Generator().manual_seed(0)
s, a = torch.randn(100, 1, 3, 20, generator=g), torch.randn(100, 1, 3, 20, generator=g)
out, ref = torch.full((199, 20), float("nan")), torch.empty(199, 20)
fastsinc._kernel("sinc_pool")(s, a, out, None)
fastsinc.set_compile(False)
fastsinc._kernel("sinc_pool")(s, a, ref, None)
print(float((out - ref).abs().max() / ref.abs().max()), os.path.basename(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
"""


@pytest.mark.slow
def test_a_kernel_cache_shared_by_two_isas_stays_correct(tmp_path):
    """Inductor's disk cache does not key on the vector ISA (torch 2.13): a kernel generated for
    AVX2 and served under AVX-512 wrote past its buffers (NaN, heap corruption; seen on an Intel
    Xeon). Each ISA gets its own folder (`fastsinc._cache_per_isa`); here two processes share
    one cache, the first at ATEN_CPU_CAPABILITY=avx2, the second at the CPU's own level (the
    same ISA on an AVX2-only CPU: then this checks only that the cache is reused correctly)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    folders = set()
    for capability in ({"ATEN_CPU_CAPABILITY": "avx2"}, {}):
        done = subprocess.run([sys.executable, "-c", _KERNEL_RUN], env={**env, **capability}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        error, folder = done.stdout.split()[-2:]
        assert float(error) <= 2.0 ** -23, (capability, done.stdout)  # one float32 rounding of the largest value
        folders.add(folder)
    assert folders == {d.name for d in tmp_path.iterdir() if d.name.startswith("isa-")} and "isa-avx2" in folders


# --- the benchmark ----------------------------------------------------------------------------------

def test_model_gflop_matches_the_reference_arithmetic():
    """~5.7 GMAC per paper crop forward, a third of it in the sinc layer (rawnet2.md)."""
    flop = bench.model_gflop(load_config("paper").model)
    assert flop["total"] == pytest.approx(2 * 5.69, rel=0.01)
    assert flop["sinc"] / flop["total"] == pytest.approx(1 / 3, abs=0.02)
    assert flop["train"] == pytest.approx(3 * flop["total"])


def test_bench_figures_keep_significant_digits_of_small_rates():
    """A smoke model on a loaded machine does ~0.01 GFLOP/s: fixed decimals printed it as 0."""
    assert bench.sig(0.0123456) == 0.01235 and bench.sig(1234.56) == 1235.0 and bench.sig(0.0) == 0.0


@pytest.mark.slow
def test_bench_quick_prints_one_json_line_per_measurement(tiny_db, capsys):
    records = bench.main(["all", "--quick", "--data_path", str(tiny_db)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == records
    names = {r["name"] for r in records}
    assert names == {"matmul_peak", "train_step", "train_memory", "embed", "load", "score"}
    for r in records:
        assert {"device", "torch", "threads", "peak_rss_mib"} <= set(r)
    speed = [r for r in records if r["name"] in ("train_step", "embed")]
    assert {(r["name"], r["path"]) for r in speed} == {("train_step", "exact"), ("train_step", "fast"),
                                                       ("embed", "exact"), ("embed", "fast"), ("embed", "onnxruntime")}
    assert all(r["crops_per_s"] > 0 and r["gflops"] > 0 and r["ratio"] > 0 for r in speed)
    assert all(r["cosine_min"] > 0.99 and 0 < r["peak_share"] for r in speed if r["name"] == "embed")
    loads = {r["path"]: r for r in records if r["name"] == "load"}
    assert set(loads) == {"plain", "augment"} and all(r["crops_per_s"] > 0 for r in loads.values())
    assert next(r for r in records if r["name"] == "score")["seconds"] > 0
    assert fastsinc.compile_enabled() is False  # quick mode restored the fixture's setting


@pytest.mark.notebook
def test_benchmark_notebook_quick(run_notebook, tiny_db, tmp_path):
    run_notebook("benchmark", quick=True, data_path=str(tiny_db), out_dir=str(tmp_path))
    (run,) = tmp_path.iterdir()
    records = json.loads((run / "records.json").read_text())
    assert {r["name"] for r in records} >= {"train_step", "embed", "load", "score"}
    assert (run / "speed.png").stat().st_size > 0 and (run / "memory.png").stat().st_size > 0


def test_subnormals_are_counted_in_weights_and_optimizer_state(tmp_path, capsys):
    """`bench subnormals` finds exactly the denormals put into a checkpoint (|x| < 1.18e-38)."""
    from rawnet_lib.models.checkpoint import model_checkpoint, save_checkpoint
    cfg = load_config("smoke")
    torch.manual_seed(0)
    model = build_model(cfg, 5)
    optimizer = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(torch.randn(2, cfg.model.n_samples)), torch.tensor([0, 1])).backward()
    optimizer.step()
    with torch.no_grad():
        model.fc1_gru.weight[0, :3] = torch.tensor([1e-40, -2e-39, 1e-30])  # two subnormal, one normal
    state = optimizer.state_dict()
    state["state"][0]["exp_avg_sq"].view(-1)[:4] = 1e-41
    save_checkpoint({**model_checkpoint(model, cfg, [], 1, 0.5), "optimizer": state}, tmp_path / "c.pt")
    records = {r["path"]: r for r in bench.bench_subnormals(tmp_path / "c.pt", batch=2, data_path=tmp_path)}
    n_params = sum(p.numel() for p in model.parameters())
    assert (records["weights"]["subnormal"], records["weights"]["values"]) == (2, n_params)
    assert records["optimizer"]["subnormal"] == 4 and records["optimizer"]["values"] == 2 * n_params
    assert records["activations"]["values"] > 0 and records["gradients"]["values"] == n_params
    assert {r["input"] for r in records.values()} == {"noise"} and records["weights"]["loss_head"] == "softmax"
    assert bench.subnormals([torch.tensor([0.0, 1e-45, 1.0]), torch.tensor([1, 2])]) == (1, 3)  # ints skipped
    assert bench.subnormals([torch.tensor([1e-5, 1e-3], dtype=torch.float16)]) == (1, 2)  # fp16's own threshold
    save_checkpoint(model_checkpoint(build_model(cfg), cfg, [], 1, 0.5), tmp_path / "no_head.pt")
    with pytest.raises(ValueError, match="no classifier"):
        bench.bench_subnormals(tmp_path / "no_head.pt", batch=2, data_path=tmp_path)
