"""The fast compute path of RawNet2 (`model.fast: true`): same parameters, same maths, cheaper.

Two changes, both exact in float32 up to rounding:

1. The sinc front end, max_pool1d(|SincConv(x)|, 3), is one operation (`sinc_abs_pool`).
   The exact path runs `conv1d` (128 filters x 251 taps, one input channel), `abs` and
   `max_pool1d` one after another and keeps three full-rate tensors for the backward pass.
   Here outputs are computed in blocks of `BLOCK` consecutive samples. Block t needs the input
   window w_t = x[t*BLOCK : t*BLOCK + BLOCK + K - 1], and output p of filter c is w_t times
   filter c shifted by p: the filter bank is a banded matrix B (BLOCK*C, BLOCK+K-1), and all
   outputs are one GEMM per crop. The filters are symmetric (linear phase), so B equals itself
   with rows and columns reversed. Then the first half of the rows, B_top, gives the second
   half of the outputs too (B_top applied to the reversed window), and splitting the window
   into its symmetric and antisymmetric halves, s = w[:n] + w[::-1][:n], a = w[:n] - w[::-1][:n]
   (n = (BLOCK+K-1)/2), gives S = s @ B_s and A = a @ B_a with half-width matrices:
   first-half outputs = S + A, second-half outputs (reversed) = S - A. That is
   (BLOCK+K-1)/(2K) = 0.51x the multiply-adds of the direct convolution, as large regular
   GEMMs that run near the CPU's matmul peak (float32, also under autocast: see below).
   BLOCK/2 is a multiple of 3, so |.| and the max over each pooling window are taken straight
   on S and A, already in (time, channel) order. The backward pass is written out: only the
   argmax and sign of each window are kept (int8); the gradients are two more pairs of GEMMs
   of the same shape, a banded sum (taps) and an overlap-add (input). The element-wise parts
   (|.| + max + argmax, routing the gradient back) are compiled into single loops with
   torch.compile, once per shape (set RAWNET_FAST_COMPILE=0, or `set_compile(False)`, to run
   them as eager ops: same results, slower).
2. The residual body runs in channels-last layout ((B, C, 1, T) with channels innermost) with
   the model's own modules' parameters: `conv2d` (bf16 convolutions run ~2x faster there than
   in the (B, C, T) layout), 1x1 convolutions as matrix products, `batch_norm` with the
   activation in place, max-pooling by 3 that keeps int8 argmax codes for the backward pass
   (compiled like the sinc kernels) instead of max_pool2d's int64 indices, and the FMS time
   mean as a product with a vector of ones. If any module of the model has a forward hook
   (layer summaries, FMS inspection), the blocks are called as modules instead, so the hooks
   still fire.

AMP follows the exact path's policy: the filters (`SincConv.filters()`, whose sines take phases
up to ~400 rad that bf16 cannot represent) and the sinc front end run in float32 under autocast,
and so does the residual sum of each block; the convolutions, FMS and GRU run in the AMP dtype.
Filters are built once per forward. With gradients off
(evaluation, embedding) the half-width filter matrices are cached per module until `low_hz_`
or `band_hz_` change (their version counter moves on every optimiser step and load_state_dict).

The fast preset is `model.fast: true` with `train.amp: bf16` (autocast; no loss scaling needed).
rawnet_lib/bench/ measures speed and agreement against the exact path.
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BLOCK", "folded_taps", "sinc_abs_pool", "fast_sinc_pool", "fast_frame_features",
           "set_compile", "compile_enabled"]

BLOCK = 6  # outputs per window; a multiple of 6 (two halves, each whole pooling windows)
POOL = 3
LEAKY_SLOPE = 0.3

_cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# --- the fused sinc front end ------------------------------------------------------------------

def _top_index(block: int, kernel: int, channels: int, device: torch.device) -> Tensor:
    """Flat positions of tap k of filter c shifted by p < block/2 in a (block/2 * C, block+K-1) matrix."""
    width, half = block + kernel - 1, block // 2
    p = torch.arange(half, device=device).view(-1, 1, 1)
    c = torch.arange(channels, device=device).view(1, -1, 1)
    k = torch.arange(kernel, device=device).view(1, 1, -1)
    return ((p * channels + c) * width + p + k).view(-1)  # order (p, c, k)


def folded_taps(taps: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Symmetric (C, K) taps -> (B_s, B_a), each (block/2 * C, (block+K-1)/2).

    B_top (block/2 * C, block+K-1) holds filter c shifted right by p in row (p, c);
    B_s = (left half + reversed right half) / 2, B_a = (left half - reversed right half) / 2.
    """
    c, k = taps.shape
    width = block + k - 1
    top = taps.new_zeros(block // 2 * c * width)
    top[_top_index(block, k, c, taps.device)] = taps.expand(block // 2, c, k).reshape(-1)
    top = top.view(block // 2 * c, width)
    left, right = top[:, :width // 2], top[:, width // 2:].flip(-1)
    return (left + right) / 2, (left - right) / 2


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Element-wise kernels (compiled, see `_kernel`). Shapes: nt windows, C channels, h = block/2.

def _max3(y: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(..., 3, C) -> max over the window (..., C) of |y| (signed) or y, and code = argmax + 1 as
    int8, negated where the chosen sample is negative (signed). The first maximum wins, as in
    max_pool1d. The code is computed in floating point and cast once: torch.compile vectorises
    that well, integer `where` chains it does not (4x slower)."""
    y0, y1, y2 = y.unbind(-2)
    a0, a1, a2 = (y0.abs(), y1.abs(), y2.abs()) if signed else (y0, y1, y2)
    first_two = torch.maximum(a0, a1)
    take1, take2 = a1 > a0, a2 > first_two
    work = torch.promote_types(y.dtype, torch.float32)
    index = 1 + take1.to(work) * (~take2).to(work) + 2 * take2.to(work)
    if signed:
        chosen = torch.where(take2, y2, torch.where(take1, y1, y0))
        index = torch.where(chosen < 0, -index, index)
    return torch.maximum(first_two, a2), index.to(torch.int8)


def _unmax3(grad: Tensor, code: Tensor) -> Tensor:
    """Gradient of `_max3`'s maximum (..., C) -> gradient of y (..., 3, C), at least float32.
    Float masks again, for the same reason."""
    work = torch.promote_types(grad.dtype, torch.float32)
    slot = torch.arange(1, POOL + 1, dtype=work, device=grad.device).view(-1, 1)
    code = code.to(work).unsqueeze(-2)
    return grad.to(work).unsqueeze(-2) * ((code == slot).to(work) - (code == -slot).to(work))


def _sinc_pool(s: Tensor, a: Tensor, out: Tensor, code: Tensor | None) -> None:
    """S, A (nt, h/3, 3, C) -> pooled |y| in time order into out (n_pool, C), codes into code
    (nt*block/3, C) unless None. First-half outputs are S + A at times t*block + p, second-half
    outputs S - A at times t*block + block-1-p, so their pooling windows come reversed."""
    peak_top, code_top = _max3(s + a, signed=True)
    peak_bot, code_bot = _max3(s - a, signed=True)
    c = out.shape[-1]
    out.copy_(torch.cat([peak_top, peak_bot.flip(1)], 1).view(-1, c)[:out.shape[0]])
    if code is not None:
        code.copy_(torch.cat([code_top, code_bot.flip(1)], 1).view(-1, c))


def _sinc_unpool(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the pooled output (nt, block/3, C) -> gradients of S and A (nt, h/3, 3, C)."""
    g = grad.shape[1] // 2
    top = _unmax3(grad[:, :g], code[:, :g])
    bot = _unmax3(grad[:, g:].flip(1), code[:, g:].flip(1))
    return (top + bot).to(grad.dtype), (top - bot).to(grad.dtype)


def _pool_peak(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T', 3, C) -> max over the window and codes, for the body's max-pool."""
    return _max3(x, signed=False)


def _pool_grad(grad: Tensor, code: Tensor, length: int) -> Tensor:
    """Gradient (B, T', C) of `_pool_peak` -> gradient of its input (B, length, C), zero for the
    `length - 3T'` samples max_pool1d leaves out."""
    b, t, c = grad.shape
    full = _unmax3(grad, code).to(grad.dtype).view(b, POOL * t, c)
    return torch.cat([full, full.new_zeros(b, length - POOL * t, c)], 1)


def _fold(x: Tensor, block: int, width: int) -> tuple[Tensor, Tensor]:
    """Padded crop (nt*block + K - 1,) -> symmetric and antisymmetric window halves (nt, width/2)."""
    windows = x.unfold(-1, width, block)
    left, right = windows[:, :width // 2], windows[:, width // 2:].flip(-1)
    return left + right, left - right


def _unfold_grad(grad_s: Tensor, grad_a: Tensor) -> Tensor:
    """Gradients of the window halves (width/2, nt) -> gradient of the windows (width, nt)."""
    return torch.cat([grad_s + grad_a, (grad_s - grad_a).flip(0)], 0)


# Worth compiling (several times faster than eager); _fold and _unfold_grad are not.
_KERNELS = {"sinc_pool": _sinc_pool, "sinc_unpool": _sinc_unpool, "pool_peak": _pool_peak, "pool_grad": _pool_grad}
_compiled: dict[str, object] = {}


_use_compile = os.environ.get("RAWNET_FAST_COMPILE", "1") != "0"


def set_compile(enabled: bool) -> bool:
    """Compile the element-wise kernels (default; RAWNET_FAST_COMPILE=0 turns it off) or run them
    as eager ops (same results; no compile time, slower). Returns the previous setting."""
    global _use_compile
    previous, _use_compile = _use_compile, bool(enabled)
    return previous


def compile_enabled() -> bool:
    return _use_compile


@functools.cache
def _cache_per_isa() -> None:
    """Give each vector ISA its own inductor cache folder (`<cache>/isa-avx2`, `isa-avx512-...`).

    Inductor's on-disk cache (torch 2.13) does not key on the ISA it generates code for, which
    follows ATEN_CPU_CAPABILITY and the CPU: a kernel generated for AVX2 (8-lane loops) and
    served under AVX-512 is built with 16-lane vectors and writes past its buffers (heap
    corruption, NaN embeddings); seen on an Intel Xeon switching ATEN_CPU_CAPABILITY, and a
    cache folder shared by machines of different CPUs would do the same. Sets
    TORCHINDUCTOR_CACHE_DIR for this process (and the processes it starts)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    base = cache_dir()  # TORCHINDUCTOR_CACHE_DIR, else the default; inductor writes it into the environment
    if os.path.basename(base).startswith("isa-"):  # inherited from a parent process of another ISA
        base = os.path.dirname(base)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "isa-" + str(pick_vec_isa()).replace(" ", "-"))


def _kernel(name: str):
    """An element-wise kernel, compiled by torch.compile into one loop (several times faster
    than the eager ops) unless turned off (`set_compile`); eager if compiling fails."""
    if not _use_compile:
        return _KERNELS[name]
    if name not in _compiled:
        compiled = torch.compile(_KERNELS[name])

        def run(*args, _fn=compiled, _name=name):
            try:
                _cache_per_isa()  # before the first call compiles
                return _fn(*args)
            except Exception as err:  # noqa: BLE001  (no C++ compiler, unsupported platform, ...)
                first = str(err).splitlines()[0] if str(err) else ""
                warnings.warn(f"torch.compile of the fast sinc kernel {_name!r} failed "
                              f"({type(err).__name__}: {first}); using eager ops")
                _compiled[_name] = _KERNELS[_name]
                return _KERNELS[_name](*args)
        _compiled[name] = run
    return _compiled[name]


def _padded(x: Tensor, block: int, kernel: int) -> tuple[Tensor, int]:
    """(B, T) -> (B, nt*block + K - 1) zero-padded so that nt windows cover every output."""
    nt = -(-(x.shape[-1] - kernel + 1) // block)
    return F.pad(x, (0, nt * block + kernel - 1 - x.shape[-1])), nt


class _SincAbsPool(torch.autograd.Function):
    """max_pool1d(|conv1d(x, taps)|, 3) for symmetric taps, with the gradients written out."""

    @staticmethod
    def forward(ctx, x: Tensor, taps: Tensor, b_s: Tensor, b_a: Tensor, block: int, with_grad: bool) -> Tensor:
        (b, _), (c, kernel), dtype = x.shape, taps.shape, b_s.dtype
        width = block + kernel - 1
        padded, nt = _padded(x.to(dtype), block, kernel)
        n_pool = (x.shape[-1] - kernel + 1) // POOL
        # (B, C, n_pool) with channels innermost in memory, filled through its (B, n_pool, C) view
        out = torch.empty_strided((b, c, n_pool), (n_pool * c, 1, c), dtype=dtype, device=x.device)
        out_t = out.transpose(1, 2)
        code = torch.empty(b, nt * (block // POOL), c, dtype=torch.int8, device=x.device) if with_grad else None
        shape = (nt, block // 2 // POOL, POOL, c)
        for i in range(b):  # a crop at a time: the full-rate output never exists for the batch
            s, a = _fold(padded[i], block, width)           # (nt, width/2) each
            _kernel("sinc_pool")((s @ b_s.t()).view(shape), (a @ b_a.t()).view(shape), out_t[i],
                                 code[i] if with_grad else None)
        ctx.save_for_backward(x, b_s, b_a, code)
        ctx.block, ctx.kernel = block, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, b_s, b_a, code = ctx.saved_tensors
        block, kernel, dtype = ctx.block, ctx.kernel, b_s.dtype
        width = block + kernel - 1
        (b, c, n_pool), rows = grad_out.shape, code.shape[1]
        padded, nt = _padded(x.to(dtype), block, kernel)
        grad = F.pad(grad_out.to(dtype).transpose(1, 2), (0, 0, 0, rows - n_pool))  # (B, rows, C)
        acc = torch.promote_types(dtype, torch.float32)  # accumulate bf16 products in float32
        grad_bs = torch.zeros(b_s.shape, dtype=acc, device=x.device)
        grad_ba = torch.zeros(b_a.shape, dtype=acc, device=x.device)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(b, padded.shape[-1], dtype=acc, device=x.device)
        for i in range(b):
            s, a = _fold(padded[i], block, width)
            grad_s_out, grad_a_out = _kernel("sinc_unpool")(grad[i].view(nt, block // POOL, c),
                                                       code[i].view(nt, block // POOL, c))
            grad_s_out, grad_a_out = grad_s_out.view(nt, -1), grad_a_out.view(nt, -1)
            grad_bs += (grad_s_out.t() @ s).to(acc)
            grad_ba += (grad_a_out.t() @ a).to(acc)
            if grad_x is not None:
                # window gradients as (width, nt), the layout F.fold wants, then overlap-add
                grad_windows = _unfold_grad(b_s.t() @ grad_s_out.t(), b_a.t() @ grad_a_out.t()).to(acc)
                grad_x[i] = F.fold(grad_windows.unsqueeze(0), (1, grad_x.shape[1]), (1, width),
                                   stride=(1, block)).view(-1)
        # back through the folding to B_top, then each tap sums over its shifted copies
        half = (grad_bs + grad_ba) / 2, (grad_bs - grad_ba) / 2
        grad_top = torch.cat([half[0], half[1].flip(-1)], -1).view(-1)
        grad_taps = grad_top[_top_index(block, kernel, c, x.device)].view(block // 2, c, kernel).sum(0)
        # The bottom half used each tap's mirror image; for symmetric taps only the symmetric
        # part of the gradient is defined (and the exact conv's has the same symmetric part).
        grad_taps = (grad_taps + grad_taps.flip(-1)) / 2
        if grad_x is not None:
            grad_x = grad_x[:, :x.shape[-1]].to(x.dtype)
        return grad_x, grad_taps, None, None, None, None


def sinc_abs_pool(x: Tensor, taps: Tensor, folded: tuple[Tensor, Tensor] | None = None,
                  block: int = BLOCK) -> Tensor:
    """max_pool1d(|conv1d(x, taps)|, 3): x (B, T), symmetric taps (C, K) -> (B, C, (T-K+1)//3).

    The result is channels-innermost in memory (a transposed view of (B, time, C)). `folded`
    is `folded_taps(taps, block)` in the compute dtype, when the caller has it cached.
    """
    if block % (2 * POOL):
        raise ValueError(f"block={block} must be a multiple of {2 * POOL}, e.g. 6 or 12")
    if taps.shape[-1] % 2 == 0 or not torch.equal(taps, taps.flip(-1)):
        raise ValueError("sinc_abs_pool needs symmetric filters of odd length (taps[:, k] == taps[:, K-1-k]), "
                         "as SincConv.filters() makes them")
    if folded is None:
        with torch.no_grad():
            folded = tuple(m.to(_compute_dtype(x)) for m in folded_taps(taps.detach(), block))
    with_grad = torch.is_grad_enabled() and (x.requires_grad or taps.requires_grad)
    return _SincAbsPool.apply(x, taps, *folded, block, with_grad)


def _taps(conv: nn.Module) -> Tensor:
    """(C, K) float32 taps (`SincConv.filters` builds them in float32 even under autocast)."""
    return conv.filters().view(conv.out_channels, -1)


def fast_sinc_pool(conv: nn.Module, x: Tensor, block: int = BLOCK) -> Tensor:
    """The fast path for a `SincConv`: waveform (B, T) -> |sinc filters(x)| max-pooled by 3.

    Filters are built once per call; with gradients off they are cached per module until
    `low_hz_` or `band_hz_` change (optimiser step, load_state_dict, .to()).
    """
    if torch.is_grad_enabled():
        return sinc_abs_pool(x, _taps(conv), None, block)
    dtype = _compute_dtype(x)
    key = tuple((p._version, p.data_ptr(), p.device) for p in (conv.low_hz_, conv.band_hz_)) + (dtype, block)
    hit = _cache.get(conv)
    if hit is None or hit[0] != key:
        taps = _taps(conv)
        hit = (key, taps, tuple(m.to(dtype) for m in folded_taps(taps, block)))
        _cache[conv] = hit
    return sinc_abs_pool(x, hit[1], hit[2], block)


# --- the channels-last body --------------------------------------------------------------------

def _bn(m: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """What `m(x)` computes (incl. running statistics), for 4-D input that BatchNorm1d refuses."""
    if m.training and m.track_running_stats:
        m.num_batches_tracked.add_(1)
    momentum = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
    batch_stats = m.training or m.running_mean is None
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, batch_stats, momentum, m.eps)


def _conv(m: nn.Conv1d, x: Tensor) -> Tensor:
    """`m(x)` for (B, C, 1, T) channels-last x; a 1x1 convolution as a matrix product over channels
    (its weight gradient then keeps the weight's strides, which DDP's buckets expect)."""
    if m.kernel_size == (1,) and m.stride == (1,) and m.padding == (0,):
        return F.linear(x.permute(0, 2, 3, 1), m.weight.squeeze(-1), m.bias).permute(0, 3, 1, 2)
    return F.conv2d(x, m.weight.unsqueeze(2), m.bias, stride=(1, m.stride[0]), padding=(0, m.padding[0]))


class _MaxPool3(torch.autograd.Function):
    """max_pool2d(x, (1, 3)) for (B, C, 1, T) channels-last x, keeping int8 argmax codes for the
    backward pass instead of max_pool2d's int64 indices (and its slow channels-last kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, with_grad: bool) -> Tensor:
        b, c, _, t = x.shape
        windows = x.permute(0, 2, 3, 1)[:, 0, :POOL * (t // POOL)].view(b, t // POOL, POOL, c)  # no copy
        if with_grad:
            peak, code = _kernel("pool_peak")(windows)
            ctx.save_for_backward(code)
            ctx.length = t
        else:
            peak = windows.amax(2)
        return peak.permute(0, 2, 1).unsqueeze(2)  # (B, C, 1, T/3), channels-last

    @staticmethod
    def backward(ctx, grad: Tensor):
        (code,) = ctx.saved_tensors
        grad = _kernel("pool_grad")(grad.permute(0, 2, 3, 1)[:, 0], code, ctx.length)  # (B, T, C)
        return grad.permute(0, 2, 1).unsqueeze(2), None


def _max_pool3(x: Tensor) -> Tensor:
    return _MaxPool3.apply(x, torch.is_grad_enabled() and x.requires_grad)


def _time_mean(x: Tensor) -> Tensor:
    """(B, C, 1, T) channels-last -> mean over time (B, C), as a product with ones: several times
    faster than `mean` on bf16 channels-last tensors, forward and backward."""
    b, c, _, t = x.shape
    return (x.new_ones(1, t) @ x.permute(0, 2, 3, 1).reshape(b, t, c)).view(b, c) / t


def _act(m: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """LeakyReLU(BN(x)), the activation in place (BN's backward needs its input, not its output)."""
    return F.leaky_relu(_bn(m, x), LEAKY_SLOPE, inplace=True)


def _block(blk: nn.Module, x: Tensor) -> Tensor:
    """`ResidualBlock.forward` on (B, C, 1, T) channels-last input, with fewer fresh tensors."""
    out = _conv(blk.conv1, x if blk.first else _act(blk.bn1, x))
    out = _conv(blk.conv2, _act(blk.bn2, out))
    identity = _conv(blk.conv_downsample, x) if hasattr(blk, "conv_downsample") else x
    # The residual sum in x's dtype: float32 under autocast, as on the exact path (in bf16 it
    # costs embedding cosine). A conv's backward does not need its output, so add in place.
    out = out.to(x.dtype).add_(identity)
    out = _max_pool3(out) if blk.pool else out
    s = torch.sigmoid(blk.frm.fc(_time_mean(out))).to(out.dtype)[:, :, None, None]  # FMS gate
    return torch.addcmul(s, out, s)  # out * s + s


def _hooked(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def fast_frame_features(model: nn.Module, x: Tensor) -> Tensor:
    """`RawNet2.frame_features` after the layer norm: waveform (B, T) -> (B, C, frames).
    The sinc front end runs in float32 under autocast too, as on the exact path (README: AMP)."""
    with torch.autocast(x.device.type, enabled=False):
        x = fast_sinc_pool(model.first_conv, x)                    # (B, C, T'), channels innermost
    if _hooked(model):  # call the modules so hooks see what they expect
        x = F.leaky_relu(model.first_bn(x), LEAKY_SLOPE)
        for i in range(model.n_blocks):
            x = getattr(model, f"block{i}")(x)
        return F.leaky_relu(model.bn_before_gru(x), LEAKY_SLOPE)
    x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (B, C, 1, T'), no copy
    x = _act(model.first_bn, x)
    for block in model.blocks():
        x = _block(block, x)
    return _act(model.bn_before_gru, x).squeeze(2)
