"""LRN: local response normalisation across or within channels, as Caffe computes it.

ACROSS_CHANNELS: top = x * (k + alpha / n * sum of x^2 over n channels centred on
each)^-beta, zero beyond the channel range.
WITHIN_CHANNEL: Caffe composes it from layers (square, AVE pooling with kernel n,
stride 1 and pad (n - 1) / 2, then power with shift 1): top = x * (1 + alpha * mean of
x^2 over the n x n window)^-beta. k is not used. With that pad and stride every window
lies inside the padded input, so Caffe's divisor is n^2 everywhere.

On CPU, ACROSS_CHANNELS runs as one C kernel each way (lrn_kernel.c, built on first use:
see native.py); elsewhere, and where it cannot be built, both regions run as one
autograd Function of PyTorch operations with the same formulas.
"""
from __future__ import annotations

import ctypes
import functools
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native

from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source

ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1  # LRNParameter.NormRegion


def channel_window_sum(t: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over the `size` channels centred on each, zero beyond the channel range, added
    lowest channel first as the C kernel adds them. Offsets past the channel count only
    ever add zeros, which change no sum, so they are left out: at most 2 x channels - 1
    passes over memory, whatever the size."""
    channels = t.shape[1]
    pad = min((size - 1) // 2, channels - 1)
    if pad <= 0:
        return t.clone()
    padded = F.pad(t, (0, 0, 0, 0, pad, pad))
    out = padded[:, :channels] + padded[:, 1:channels + 1]
    for offset in range(2, 2 * pad + 1):
        out.add_(padded[:, offset:offset + channels])
    return out


def spatial_window_mean(t: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over the size x size window centred on each pixel, zero padded (Caffe's
    divisor counts the padding: it is size^2 everywhere)."""
    return F.avg_pool2d(t, size, stride=1, padding=(size - 1) // 2, count_include_pad=True)


def negative_power_(scale: torch.Tensor, beta: float):
    """scale^-beta, and 1 / scale, in the C kernel's steps, over `scale`'s memory (it is
    overwritten: fewer new tensors, which cost page faults at a batch's sizes). Caffe's nets
    use beta 0.75, which has an exact form from square roots, several times faster than pow."""
    if beta == 0.75:
        root = scale.sqrt()
        fourth_root = root.sqrt()
        five_quarters = scale.mul_(fourth_root).reciprocal_()  # scale^-5/4
        return root.mul_(five_quarters), five_quarters.mul_(fourth_root)
    return scale.pow(-beta), scale.reciprocal_()


class _LRNFunction(torch.autograd.Function):
    """Caffe's LRN: top = x * s^-beta with s = k + alpha / terms * window(x^2), and Caffe's
    backward: dx = dy * s^-beta - 2 alpha beta / terms * x * window(dy * top / s). The
    window (a sum over `terms` channels, or a mean) is symmetric, so it is its own
    transpose. One function instead of the autograd chain of square, pool, pow and mul:
    fewer passes and saved tensors. Its steps are the C kernel's, in its order; the two
    still differ in the last bit where torch's float32 square root does."""

    @staticmethod
    def forward(ctx, x, window, size, alpha, beta, k, terms):
        scale = window(x * x, size).mul_(alpha / terms).add_(k)
        factor, inverse = negative_power_(scale, beta)
        ctx.save_for_backward(x, factor, inverse)
        ctx.window = (window, size, 2.0 * alpha * beta / terms)
        return x * factor

    @staticmethod
    def backward(ctx, dy):
        x, factor, inverse = ctx.saved_tensors
        window, size, coefficient = ctx.window
        dx = dy * factor
        ratio = (dx * x).mul_(inverse)
        return torch.addcmul(dx, x, window(ratio, size), value=-coefficient), None, None, None, None, None, None


KERNEL_SOURCE = Path(__file__).with_name("lrn_kernel.c")
KERNEL_SEGMENT = 4096  # most pixels per work item: its ring of rows stays in the L2 cache
KERNEL_ELEMENTS_PER_THREAD = 65536  # smaller tensors are not worth waking a thread for
# The kernel's scratch holds local_size + 1 rows per thread, and its window sums add
# local_size rows: wider windows (published nets use 5) run in the PyTorch form, whose
# memory and passes stop growing at the channel count.
KERNEL_MAX_SIZE = 255
_SIGNATURES = {"forward": 2, "backward": 3}  # pointer arguments before the sizes


@functools.cache
def _kernel():
    """The C kernel's library with its argument types set, or None (see native.py)."""
    lib = native.library(KERNEL_SOURCE)
    if lib is None:
        return None
    for direction, pointers in _SIGNATURES.items():
        for suffix in ("f32", "f64"):
            function = getattr(lib, f"lrn_{direction}_{suffix}")
            function.argtypes = ([ctypes.c_void_p] * pointers + [ctypes.c_int64] * 6
                                 + [ctypes.c_double] * 3 + [ctypes.c_int64])
            function.restype = ctypes.c_int
    return lib


def _run_kernel(direction: str, tensors, channels_last: bool, size, alpha, beta, k):
    x = tensors[0]
    if x.numel() == 0:
        return
    function = getattr(_kernel(), f"lrn_{direction}_{'f32' if x.dtype == torch.float32 else 'f64'}")
    n, c, h, w = x.shape
    threads = max(1, min(torch.get_num_threads(), x.numel() // KERNEL_ELEMENTS_PER_THREAD))
    # Enough items for every thread, even at batch 1; no item wider than KERNEL_SEGMENT.
    segments = max(1, min(h * w, max(-(-h * w // KERNEL_SEGMENT), -(-threads // max(n, 1)))))
    if function(*[t.data_ptr() for t in tensors], n, c, h * w, channels_last, segments, size, alpha, beta, k,
                threads):
        raise MemoryError(f"LRN: the C kernel could not allocate its scratch ({c} channels)")


def memory_format_of(t: torch.Tensor):
    """channels_last where the tensor is laid out so (and not also plainly contiguous), else NCHW."""
    nhwc = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


class _NativeAcrossLRNFunction(torch.autograd.Function):
    """ACROSS_CHANNELS LRN by the C kernel, NCHW or channels_last: one pass over memory
    each way, and only x saved (the backward recomputes the normaliser)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        memory_format = memory_format_of(x)
        x = x.contiguous(memory_format=memory_format)
        top = torch.empty_like(x)
        _run_kernel("forward", (x, top), memory_format == torch.channels_last, size, alpha, beta, k)
        ctx.save_for_backward(x)
        ctx.params = (memory_format, size, alpha, beta, k)
        return top

    @staticmethod
    @once_differentiable
    def backward(ctx, top_diff):
        (x,) = ctx.saved_tensors
        memory_format, size, alpha, beta, k = ctx.params
        top_diff = top_diff.contiguous(memory_format=memory_format)
        bottom_diff = torch.empty_like(x)
        _run_kernel("backward", (x, top_diff, bottom_diff), memory_format == torch.channels_last,
                    size, alpha, beta, k)
        return bottom_diff, None, None, None, None


def _kernel_applies(x: torch.Tensor, size: int) -> bool:
    # Under torch.compile the PyTorch form is traced instead: inductor fuses it itself. So it
    # is under torch.export, whose program must not call this package's kernel (torch
    # versions that export without setting is_compiling have is_exporting).
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and size <= KERNEL_MAX_SIZE
            and not torch.compiler.is_compiling() and not exporting() and _kernel() is not None)


def _lrn(x, across_channels: bool, size: int, alpha: float, beta: float, k: float):
    # Sums of squares overflow float16 under autocast: the normaliser is computed in float32.
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    if across_channels and _kernel_applies(wide, size):
        return _NativeAcrossLRNFunction.apply(wide, size, alpha, beta, k).to(x.dtype)
    if across_channels:
        return _LRNFunction.apply(wide, channel_window_sum, size, alpha, beta, k, size).to(x.dtype)
    return _LRNFunction.apply(wide, spatial_window_mean, size, alpha, beta, k, 1).to(x.dtype)


torch.fx.wrap("_lrn")  # one leaf in traced graphs: the function's loop reads concrete shapes


class AcrossChannelLRN(CaffeLayer):
    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        return _lrn(x, True, self.size, self.alpha, self.beta, self.k)


class WithinChannelLRN(CaffeLayer):
    def __init__(self, size: int, alpha: float, beta: float):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x):
        return _lrn(x, False, self.size, self.alpha, self.beta, 1.0)


@register("LRN")
def build_lrn(ctx: LayerContext):
    ctx.expect_bottoms(1)
    ctx.expect_rank(0, 4)
    lp = ctx.param.lrn_param
    if lp.local_size % 2 != 1:
        raise ctx.error(f"local_size must be odd, got {lp.local_size}")
    if lp.norm_region == ACROSS_CHANNELS:
        module = AcrossChannelLRN(lp.local_size, lp.alpha, lp.beta, lp.k)
    elif lp.norm_region == WITHIN_CHANNEL:
        module = WithinChannelLRN(lp.local_size, lp.alpha, lp.beta)
    else:
        raise ctx.error(f"unknown norm_region {lp.norm_region}")
    return ctx.wire(module, top_shapes=[ctx.bottom_shapes[0]])


@register_onnx("LRN")
def lrn_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    x = inputs[0]
    if isinstance(module, AcrossChannelLRN):
        # ONNX LRN sums over [c - (n-1)/2, c + (n-1)/2] for odd n, divides by n: Caffe's formula.
        g.node("LRN", [x], outputs, size=module.size, alpha=module.alpha, beta=module.beta, bias=module.k)
        return
    name = ctx.name
    pad = (module.size - 1) // 2
    (squares,) = g.node("Mul", [x, x], hint=name + "/squares")
    (mean,) = g.node("AveragePool", [squares], hint=name + "/mean", kernel_shape=[module.size] * 2,
                     strides=[1, 1], pads=[pad] * 4, count_include_pad=1)
    (scaled,) = g.node("Mul", [mean, g.floats(module.alpha, name + "/alpha")], hint=name + "/scaled")
    (shifted,) = g.node("Add", [scaled, g.floats(1.0, name + "/one")], hint=name + "/shifted")
    (factor,) = g.node("Pow", [shifted, g.floats(-module.beta, name + "/neg_beta")], hint=name + "/factor")
    g.node("Mul", [x, factor], outputs)


# ---------------------------------------------------------------- standalone source
# The PyTorch form above, Caffe's backward included (the C kernel is not at hand there),
# written into the file verbatim: one copy of the arithmetic.
LRN_SOURCE = ("\n" + inspect.getsource(negative_power_) + "\n\n"
              + inspect.getsource(_LRNFunction).replace("class _LRNFunction(", "class LRN(", 1))

ACROSS_SOURCE = '''
def lrn_across_channels(x, size, alpha, beta, k):
    """Caffe's LRN across channels: x * (k + alpha / size * sum of x^2 over the size channels
    centred on each, zero beyond the channel range) ^ -beta."""
    return LRN.apply(x, channel_window_sum, size, alpha, beta, k, size)
'''

WITHIN_SOURCE = '''
def lrn_within_channel(x, size, alpha, beta):
    """Caffe's LRN within a channel: x * (1 + alpha * mean of x^2 over the size x size window
    centred on each pixel, the zero padding counted) ^ -beta."""
    return LRN.apply(x, spatial_window_mean, size, alpha, beta, 1.0, 1)
'''


@register_source("LRN")
def lrn_to_source(src, ctx, module, inputs, outputs):
    settings = f"{module.size}, {module.alpha!r}, {module.beta!r}"
    src.helper(LRN_SOURCE)
    if isinstance(module, AcrossChannelLRN):
        src.helper(inspect.getsource(channel_window_sum))
        src.helper(ACROSS_SOURCE)
        src.assign(outputs, f"lrn_across_channels({inputs[0]}, {settings}, {module.k!r})")
    else:
        src.helper(inspect.getsource(spatial_window_mean))
        src.helper(WITHIN_SOURCE)
        src.assign(outputs, f"lrn_within_channel({inputs[0]}, {settings})")
