"""Pooling: Caffe's MAX and AVE pooling with its own output-size and divisor rules.

Caffe rounds the output size up, then drops a last window that would start in the
padding (only when some pad is non-zero), clips MAX windows to the input, and divides
AVE sums by the window's extent within the padded input (padding counted, overhang
beyond it not). PyTorch's ceil_mode pooling uses the same window and divisor rules but
a slightly different size rule and limits pad to half the kernel; where the sizes agree
(the usual case) the layer uses it directly, else it pads explicitly and pools in floor
mode. The choice is made once, at build time, from the bottom shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params.layer import pool_window, pooled_sizes, spp_level_window
from .lrn import memory_format_of
from .onnx_graph import FLOAT, OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source

FLT_MAX = float(np.finfo(np.float32).max)
torch.fx.wrap("memory_format_of")  # traced graphs ask the layout at run time, as the module does
MAX, AVE, STOCHASTIC = 0, 1, 2  # PoolingParameter.PoolMethod


def torch_pooled_size(size: int, kernel: int, stride: int, pad: int) -> Optional[int]:
    """What torch's ceil_mode pooling produces along one axis, None where it refuses."""
    if 2 * pad > kernel:
        return None
    pooled = (size + 2 * pad - kernel + stride - 1) // stride + 1
    if (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled if pooled >= 1 else None


def caffe_window_extents(size: int, kernel: int, stride: int, pad: int, pooled: int) -> np.ndarray:
    """Per output position, the extent Caffe's AVE divides by along one axis."""
    starts = np.arange(pooled) * stride - pad
    return np.minimum(starts + kernel, size + pad) - starts


@dataclass(frozen=True)
class PoolGeometry:
    """Caffe's 2-D pooling geometry for one bottom shape, per axis (h, w)."""

    size: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    pad: Tuple[int, int]
    pooled: Tuple[int, int]

    @property
    def end_pad(self) -> Tuple[int, int]:
        """Padding after the input (negative: input rows no window reaches) that makes
        floor-mode pooling yield exactly Caffe's windows."""
        return tuple((o - 1) * s + k - n - p for n, k, s, p, o in
                     zip(self.size, self.kernel, self.stride, self.pad, self.pooled))

    @property
    def torch_native(self) -> bool:
        return all(torch_pooled_size(n, k, s, p) == o for n, k, s, p, o in
                   zip(self.size, self.kernel, self.stride, self.pad, self.pooled))

    def divisor(self) -> np.ndarray:
        """Caffe's AVE divisor per output position, (pooled_h, pooled_w)."""
        rows, cols = (caffe_window_extents(n, k, s, p, o) for n, k, s, p, o in
                      zip(self.size, self.kernel, self.stride, self.pad, self.pooled))
        return np.outer(rows, cols).astype(np.float32)

    def torch_explicit_pad(self) -> Tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom)."""
        (top, left), (bottom, right) = self.pad, self.end_pad
        return (left, right, top, bottom)


def pool_geometry(ctx: LayerContext) -> PoolGeometry:
    """Read and check the PoolingParameter as Caffe's LayerSetUp and Reshape do."""
    kernel, stride, pad, ceil = pool_window(ctx)
    return make_geometry(ctx, tuple(ctx.bottom_shapes[0][2:]), kernel, stride, pad, ceil)


def make_geometry(ctx: LayerContext, size, kernel, stride, pad, ceil: bool = True) -> PoolGeometry:
    """The geometry of checked (h, w) settings on an input of `size`."""
    pooled = pooled_sizes(ctx, size, kernel, stride, pad, ceil)
    return PoolGeometry(tuple(size), tuple(kernel), tuple(stride), tuple(pad), pooled)


class MaxPooling(CaffeLayer):
    """Caffe's MAX pooling. Ties go to the first maximum in row-major window order, as
    in Caffe (torch's kernels scan the same way), so gradients route identically. The
    optional second top is Caffe's mask: the argmax's index h * W + w within its
    channel, -1 where no input exceeded -FLT_MAX."""

    def __init__(self, geometry: PoolGeometry, with_mask: bool):
        super().__init__()
        self.geometry = geometry
        self.with_mask = with_mask
        self.native = geometry.torch_native
        self.explicit_pad = None if self.native else geometry.torch_explicit_pad()

    def forward(self, x):
        g = self.geometry
        if not self.with_mask:
            # torch's channels-last max pooling is 3-10x faster on CPU than its NCHW one,
            # conversions included (GoogLeNet's pools); the result is the same. The top
            # keeps the bottom's layout: a channels-last net (training) converts nothing.
            top_format = memory_format_of(x)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.native:
            pooled = F.max_pool2d(x, g.kernel, g.stride, g.pad, ceil_mode=True, return_indices=self.with_mask)
        else:
            # Padding with -FLT_MAX: a window wholly in padding gives -FLT_MAX, as in Caffe.
            padded = F.pad(x, self.explicit_pad, value=-FLT_MAX)
            pooled = F.max_pool2d(padded, g.kernel, g.stride, return_indices=self.with_mask)
        if not self.with_mask:
            return pooled.contiguous(memory_format=top_format)
        top, index = pooled
        if not self.native:
            left, right, upper, _ = self.explicit_pad
            padded_width = g.size[1] + left + right
            index = (index // padded_width - upper) * g.size[1] + index % padded_width - left
        mask = torch.where(top > -FLT_MAX, index, torch.full_like(index, -1))
        return top, mask.to(top.dtype)


class AvePooling(CaffeLayer):
    """Caffe's AVE pooling: window sums over the input divided by the window's extent
    within the padded input."""

    def __init__(self, geometry: PoolGeometry):
        super().__init__()
        self.geometry = geometry
        self.native = geometry.torch_native
        self.explicit_pad = None if self.native else geometry.torch_explicit_pad()
        divisor = geometry.divisor()
        uniform = bool((divisor == geometry.kernel[0] * geometry.kernel[1]).all())
        # With explicit padding every window lies inside the padded input, so floor-mode
        # pooling divides by the full kernel; other divisors need Caffe's map.
        self.register_buffer("divisor", None if self.native or uniform else torch.from_numpy(divisor),
                             persistent=False)

    def forward(self, x):
        g = self.geometry
        if self.native:
            return F.avg_pool2d(x, g.kernel, g.stride, g.pad, ceil_mode=True, count_include_pad=True)
        padded = F.pad(x, self.explicit_pad)
        if self.divisor is None:
            return F.avg_pool2d(padded, g.kernel, g.stride)
        sums = F.avg_pool2d(padded, g.kernel, g.stride, divisor_override=1)
        return sums / self.divisor.to(sums.dtype)


@register("Pooling")
def build_pooling(ctx: LayerContext):
    ctx.expect_bottoms(1)
    ctx.expect_rank(0, 4)
    method = ctx.param.pooling_param.pool
    if method == STOCHASTIC:
        raise ctx.error("STOCHASTIC pooling is not supported")
    if method not in (MAX, AVE):
        raise ctx.error(f"unknown pooling method {method}")
    max_tops = 2 if method == MAX else 1
    if not 1 <= len(ctx.tops) <= max_tops:
        raise ctx.error(f"expects 1 to {max_tops} top(s), got {len(ctx.tops)}")
    geometry = pool_geometry(ctx)
    if method == MAX:
        module = MaxPooling(geometry, with_mask=len(ctx.tops) == 2)
    else:
        module = AvePooling(geometry)
    top_shape = tuple(ctx.bottom_shapes[0][:2]) + geometry.pooled
    return ctx.wire(module, top_shapes=[top_shape] * len(ctx.tops))


class SpatialPyramidPooling(CaffeLayer):
    """Caffe's SPP: one pooling per pyramid level l, in 2^l x 2^l bins (kernel and stride
    ceil(size / 2^l), the padding that spreads the overhang), each flattened per
    example and concatenated; a one-level pyramid gives its pooling's top unflattened."""

    def __init__(self, levels):
        super().__init__()
        self.levels = nn.ModuleList(levels)

    def forward(self, x):
        if len(self.levels) == 1:
            return self.levels[0](x)
        return torch.cat([level(x).flatten(1) for level in self.levels], dim=1)


def spp_level_geometry(ctx: LayerContext, size, level: int) -> PoolGeometry:
    """SPPLayer::GetPoolingParam's pooling for one level."""
    kernel, pad = spp_level_window(size, level)
    return make_geometry(ctx, size, kernel, kernel, pad)


@register("SPP")
def build_spp(ctx: LayerContext):
    ctx.expect_bottoms(1)
    ctx.expect_rank(0, 4)
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    param = ctx.param.spp_param
    if param.pyramid_height < 1:
        raise ctx.error(f"spp_param.pyramid_height must be at least 1, got {param.pyramid_height}")
    if param.pool == STOCHASTIC:
        raise ctx.error("STOCHASTIC pooling is not supported")
    size = tuple(ctx.bottom_shapes[0][2:])
    if min(size) <= 0:
        raise ctx.error(f"needs a non-empty input, got {ctx.bottom_shapes[0]}")
    geometries = [spp_level_geometry(ctx, size, level) for level in range(param.pyramid_height)]
    levels = [MaxPooling(g, with_mask=False) if param.pool == MAX else AvePooling(g) for g in geometries]
    num, channels = ctx.bottom_shapes[0][:2]
    if len(levels) == 1:
        top = (num, channels) + geometries[0].pooled
    else:
        top = (num, sum(channels * g.pooled[0] * g.pooled[1] for g in geometries))
    return ctx.wire(SpatialPyramidPooling(levels), top_shapes=[top])


def onnx_pool_input(g: OnnxGraph, ctx, geometry: PoolGeometry, x: str, pad_value: float):
    """The pooling input and the `pads` attribute that give floor-mode ONNX pooling
    exactly Caffe's windows. ONNX runtimes refuse pads not smaller than the kernel,
    which only a pad-0 layer whose last window starts past the input can need: that
    case gets an explicit Pad node and no pads attribute."""
    (top, left), (bottom, right) = geometry.pad, geometry.end_pad
    if bottom < geometry.kernel[0] and right < geometry.kernel[1]:
        return x, [top, left, max(bottom, 0), max(right, 0)], False
    pads = g.ints([0, 0, top, left, 0, 0, bottom, right], ctx.name + "/pads")
    value = g.floats(pad_value, ctx.name + "/pad_value")
    (padded,) = g.node("Pad", [x, pads, value], hint=ctx.name + "/padded", mode="constant")
    return padded, [0, 0, 0, 0], True


@register_onnx("Pooling")
def pooling_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    geometry = module.geometry
    attributes = dict(kernel_shape=list(geometry.kernel), strides=list(geometry.stride))
    if isinstance(module, MaxPooling):
        x, pads, explicit = onnx_pool_input(g, ctx, geometry, inputs[0], -FLT_MAX)
        if not module.with_mask:
            g.node("MaxPool", [x], outputs, pads=pads, **attributes)
            return
        if explicit:
            raise ctx.error("the mask top of a pooling whose last window starts past the input "
                            "has no ONNX export")
        index = g.fresh(ctx.name + "/argmax")
        g.node("MaxPool", [x], [outputs[0], index], pads=pads, **attributes)
        # ONNX indices count over the whole N x C x H x W input; Caffe's within a channel.
        plane = g.ints(geometry.size[0] * geometry.size[1], ctx.name + "/plane")
        (within,) = g.node("Mod", [index, plane], hint=ctx.name + "/mask_index")
        g.node("Cast", [within], [outputs[1]], to=FLOAT)
        return
    x, pads, _ = onnx_pool_input(g, ctx, geometry, inputs[0], 0.0)
    divisor = geometry.divisor()
    full = geometry.kernel[0] * geometry.kernel[1]
    if (divisor == full).all():
        g.node("AveragePool", [x], outputs, pads=pads, count_include_pad=1, **attributes)
        return
    # Every window lies inside the padded input, so AveragePool divides by the full
    # kernel; rescale to Caffe's divisor (0/0 stays NaN where Caffe's divisor is 0).
    (mean,) = g.node("AveragePool", [x], hint=ctx.name + "/mean", pads=pads, count_include_pad=1, **attributes)
    with np.errstate(divide="ignore"):
        correction = np.float32(full) / divisor
    g.node("Mul", [mean, g.floats(correction, ctx.name + "/divisor_correction")], outputs)


@register_onnx("SPP")
def spp_to_onnx(g: OnnxGraph, ctx, module: SpatialPyramidPooling, inputs, outputs):
    if len(module.levels) == 1:
        pooling_to_onnx(g, ctx, module.levels[0], inputs, outputs)
        return
    flat = []
    for index, level in enumerate(module.levels):
        pooled = g.fresh(f"{ctx.name}/level{index}")
        pooling_to_onnx(g, ctx, level, inputs, [pooled])
        flat += g.node("Flatten", [pooled], hint=f"{ctx.name}/level{index}_flat", axis=1)
    g.node("Concat", flat, outputs, axis=1)


# ---------------------------------------------------------------- standalone source

FLT_MAX_SOURCE = f"FLT_MAX = {FLT_MAX!r}  # float32's largest: Caffe's MAX pooling starts from -FLT_MAX"

MAX_POOL_SOURCE = '''
def caffe_max_pool(x, kernel, stride, pad, end_pad=None):
    """Caffe's MAX pooling: the output size rounded up, a last window starting in the padding
    dropped. Where torch's ceil_mode gives other windows, end_pad (rows, columns padded after
    the input; negative: left out) gives Caffe's, in floor mode."""
    x = x.contiguous(memory_format=torch.channels_last)  # the same values, several times faster on CPU
    if end_pad is None:
        return F.max_pool2d(x, kernel, stride, pad, ceil_mode=True).contiguous()
    x = F.pad(x, (pad[1], end_pad[1], pad[0], end_pad[0]), value=-FLT_MAX)
    return F.max_pool2d(x, kernel, stride).contiguous()
'''

AVE_POOL_SOURCE = '''
def caffe_ave_pool(x, kernel, stride, pad, end_pad):
    """Caffe's AVE pooling where its divisor varies: window sums over the zero-padded input, each
    divided by the window's extent within the padded input (padding counted, overhang not)."""
    sums = F.avg_pool2d(F.pad(x, (pad[1], end_pad[1], pad[0], end_pad[0])), kernel, stride, divisor_override=1)
    extents = []
    for size, k, s, p, pooled in zip(x.shape[2:], kernel, stride, pad, sums.shape[2:]):
        starts = torch.arange(pooled) * s - p
        extents.append((starts + k).clamp(max=size + p) - starts)
    return sums / torch.outer(*extents).to(sums.device, sums.dtype)
'''


MAX_POOL_MASK_SOURCE = '''
def caffe_max_pool_with_mask(x, kernel, stride, pad, end_pad=None):
    """caffe_max_pool and Caffe's mask top: each maximum's index h * W + w within its plane (the
    first in row-major order among equal values), -1 where no input exceeded -FLT_MAX."""
    if end_pad is None:
        top, index = F.max_pool2d(x, kernel, stride, pad, ceil_mode=True, return_indices=True)
    else:
        padded = F.pad(x, (pad[1], end_pad[1], pad[0], end_pad[0]), value=-FLT_MAX)
        top, index = F.max_pool2d(padded, kernel, stride, return_indices=True)
        padded_width = x.shape[3] + pad[1] + end_pad[1]
        index = (index // padded_width - pad[0]) * x.shape[3] + index % padded_width - pad[1]
    mask = torch.where(top > -FLT_MAX, index, torch.full_like(index, -1))
    return top, mask.to(top.dtype)
'''


def _pooled(src, module, x: str) -> str:
    """The expression of a MaxPooling or AvePooling module's top (without a mask) over `x`."""
    g = module.geometry
    window = f"{g.kernel}, {g.stride}"
    end_pad = None if module.native else g.end_pad
    if isinstance(module, MaxPooling):
        src.helper(FLT_MAX_SOURCE)
        src.helper(MAX_POOL_SOURCE)
        return f"caffe_max_pool({x}, {window}, {g.pad}" + (f", {end_pad})" if end_pad else ")")
    if module.native:
        return f"F.avg_pool2d({x}, {window}, {g.pad}, ceil_mode=True, count_include_pad=True)"
    if module.divisor is None:  # every window inside the explicitly padded input: the kernel's area
        left, right, top, bottom = g.torch_explicit_pad()
        return f"F.avg_pool2d(F.pad({x}, ({left}, {right}, {top}, {bottom})), {window})"
    src.helper(AVE_POOL_SOURCE)
    return f"caffe_ave_pool({x}, {window}, {g.pad}, {end_pad})"


@register_source("Pooling")
def pooling_to_source(src, ctx, module, inputs, outputs):
    if len(outputs) == 2:  # MAX pooling's mask top, as SegNet's Upsample reads it
        g = module.geometry
        end_pad = None if module.native else g.end_pad
        src.helper(FLT_MAX_SOURCE)
        src.helper(MAX_POOL_MASK_SOURCE)
        src.assign(outputs, f"caffe_max_pool_with_mask({inputs[0]}, {g.kernel}, {g.stride}, {g.pad}"
                            + (f", {end_pad})" if end_pad else ")"))
        return
    src.assign(outputs, _pooled(src, module, inputs[0]))


@register_source("SPP")
def spp_to_source(src, ctx, module: SpatialPyramidPooling, inputs, outputs):
    # Caffe's SPP: each pyramid level's pooling flattened per example, concatenated; one level unflattened
    levels = [_pooled(src, level, inputs[0]) for level in module.levels]
    if len(levels) == 1:
        src.assign(outputs, levels[0])
        return
    src.assign(outputs, f"torch.cat([{', '.join(f'{level}.flatten(1)' for level in levels)}], dim=1)")
