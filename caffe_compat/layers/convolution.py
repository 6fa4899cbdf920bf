"""Convolution and Deconvolution (1-, 2- and 3-D spatial).

Both apply the same weights to each of their bottoms (one top per bottom), as Caffe
does. Caffe's weight blob layouts are PyTorch's: (out, in/group, *kernel) for
Convolution, (in, out/group, *kernel) for Deconvolution.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params.layer import conv_output, conv_window
from . import fillers
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, no_source_form, register, register_onnx, register_source

CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TRANSPOSED_CONVOLUTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvGeometry:
    """The checked ConvolutionParameter of one layer, and its output's spatial size."""

    def __init__(self, ctx: LayerContext, transposed: bool):
        cp = ctx.param.convolution_param
        shape = ctx.bottom_shapes[0]
        rank = len(shape)
        # Caffe's channel axis: the axes before it are all batch (num = their product)
        self.axis = ctx.canonical_axis(cp.axis, rank)
        spatial = rank - self.axis - 1
        if spatial not in CONVOLUTIONS:
            raise ctx.error(f"supports 1 to 3 spatial axes after channel axis {self.axis}, the bottom has "
                            f"shape {shape}")
        for i, other in enumerate(ctx.bottom_shapes[1:], start=1):
            if tuple(other) != tuple(shape):
                raise ctx.error(f"all bottoms must have the same shape: '{ctx.bottoms[i]}' is {other}, "
                                f"'{ctx.bottoms[0]}' is {shape}")
        self.kernel, self.stride, self.pad, self.dilation = conv_window(ctx, spatial)
        self.channels = shape[self.axis]
        self.num_output = cp.num_output
        self.group = cp.group
        if self.num_output <= 0:
            raise ctx.error("num_output must be positive")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise ctx.error(f"group {self.group} must divide both the {self.channels} input channels "
                            f"and num_output {self.num_output}")
        self.bias_term = cp.bias_term
        self.spatial_in = tuple(shape[self.axis + 1:])
        self.spatial_out = conv_output(ctx, self.spatial_in, self.kernel, self.stride, self.pad, self.dilation,
                                       transposed)


class Convolution(CaffeLayer):
    """Convolution, or with `transposed` Deconvolution."""

    def __init__(self, geometry: ConvGeometry, weight, bias, transposed: bool):
        super().__init__()
        self.geometry = geometry
        self.transposed = transposed
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.blob_names = ("weight",) if bias is None else ("weight", "bias")
        self.convolve = (TRANSPOSED_CONVOLUTIONS if transposed else CONVOLUTIONS)[len(geometry.kernel)]

    def avoids_slow_path(self, shape) -> bool:
        """Whether the inference path calls oneDNN for a float32 CPU bottom of this shape,
        where torch would run `_slow_conv2d_forward`: one image of at most 20480 values,
        one group, a kernel of at most 3x3 (torch's rule for choosing oneDNN, in
        aten/native/Convolution.cpp). A 1x1 unstrided convolution on one thread stays
        where torch keeps it on purpose, its own kernel being the faster there."""
        g = self.geometry
        if self.transposed or len(g.kernel) != 2 or len(shape) != 4 or shape[0] != 1 or g.group != 1:
            return False
        if all(k > 3 for k in g.kernel) or shape[1] * shape[2] * shape[3] > 20480:
            return False
        pointwise = all(v == 1 for v in (*g.kernel, *g.stride, *g.dilation))
        return (not (pointwise and torch.get_num_threads() == 1) and self.weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available())

    def _convolve(self, x):
        g = self.geometry
        return self.convolve(x, self.weight, self.bias, stride=g.stride, padding=g.pad, dilation=g.dilation,
                             groups=g.group)

    def _convolve_on_axis(self, x):
        """Channel axis other than 1: the axes before it folded into one batch axis."""
        axis = self.geometry.axis
        if axis == 0:
            return self._convolve(x.unsqueeze(0)).squeeze(0)
        lead = x.shape[:axis]
        return self._convolve(x.flatten(0, axis - 1)).unflatten(0, lead)

    def forward(self, *bottoms):
        apply = self._convolve if self.geometry.axis == 1 else self._convolve_on_axis
        tops = tuple(apply(x) for x in bottoms)
        return tops[0] if len(tops) == 1 else tops


def _build(ctx: LayerContext, transposed: bool):
    if len(ctx.bottoms) < 1 or len(ctx.bottoms) != len(ctx.tops):
        raise ctx.error(f"needs one top per bottom (at least one), got {len(ctx.bottoms)} bottom(s) "
                        f"and {len(ctx.tops)} top(s)")
    g = ConvGeometry(ctx, transposed)
    if transposed:
        weight_shape = (g.channels, g.num_output // g.group) + g.kernel
    else:
        weight_shape = (g.num_output, g.channels // g.group) + g.kernel
    cp = ctx.param.convolution_param
    weight = fillers.fill(cp.weight_filler, weight_shape, ctx.name)
    bias = fillers.fill(cp.bias_filler, (g.num_output,), ctx.name) if g.bias_term else None
    module = Convolution(g, weight, bias, transposed)
    top_shape = (*ctx.bottom_shapes[0][:g.axis], g.num_output, *g.spatial_out)
    return ctx.wire(module, top_shapes=[top_shape] * len(ctx.tops))


@register("Convolution")
def build_convolution(ctx: LayerContext):
    return _build(ctx, transposed=False)


@register("Deconvolution")
def build_deconvolution(ctx: LayerContext):
    return _build(ctx, transposed=True)


@register_onnx("Convolution", "Deconvolution")
def convolution_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    geometry = module.geometry
    weights = [g.initializer(module.weight, ctx.name + "/weight")]
    if module.bias is not None:
        weights.append(g.initializer(module.bias, ctx.name + "/bias"))
    op = "ConvTranspose" if module.transposed else "Conv"
    lead = ctx.bottom_shapes[0][:geometry.axis]
    for index, (x, top) in enumerate(zip(inputs, outputs)):
        conv_out = top
        if geometry.axis != 1:  # the axes before the channel axis folded into one batch axis
            batch = [-1] if lead else [1]
            x = g.node("Reshape", [x, g.ints(batch + [geometry.channels, *geometry.spatial_in],
                                             f"{ctx.name}/batch_shape{index}")], hint=f"{ctx.name}/batched{index}")[0]
            conv_out = g.fresh(f"{ctx.name}/conv{index}")
        # Explicit symmetric pads: ConvTranspose then yields Caffe's output size,
        # stride * (in - 1) + extent - 2 * pad.
        g.node(op, [x, *weights], [conv_out], kernel_shape=list(geometry.kernel), strides=list(geometry.stride),
               pads=list(geometry.pad) * 2, dilations=list(geometry.dilation), group=geometry.group)
        if geometry.axis != 1:
            shape = ([-1, *lead[1:]] if lead else []) + [geometry.num_output, *geometry.spatial_out]
            g.node("Reshape", [conv_out, g.ints(shape, f"{ctx.name}/top_shape{index}")], [top])


# ---------------------------------------------------------------- Im2col

class Im2col(CaffeLayer):
    """Caffe's im2col per example: for channel axis `axis`, each spatial window of the
    zero-padded input laid out along the channel axis as (channel, kernel offsets) in
    row-major order, windows along the spatial axes. No weights."""

    def __init__(self, axis: int, kernel, stride, pad, dilation):
        super().__init__()
        self.axis = axis
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.pad = tuple(pad)
        self.dilation = tuple(dilation)

    def forward(self, x):
        lead = x.shape[:self.axis]
        spatial = len(self.kernel)
        x = x.reshape((-1,) + tuple(x.shape[self.axis:]))  # (num, C, *spatial)
        pads = [p for pad in reversed(self.pad) for p in (pad, pad)]
        x = F.pad(x, pads)
        for i, (k, s, d) in enumerate(zip(self.kernel, self.stride, self.dilation)):
            # windows of extent d (k - 1) + 1 along axis 2 + i, then every d-th tap
            x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
        # (num, C, *out, *kernel) -> (num, C, *kernel, *out)
        order = [0, 1] + list(range(2 + spatial, 2 + 2 * spatial)) + list(range(2, 2 + spatial))
        x = x.permute(order)
        out = x.shape[2 + spatial:]
        return x.reshape(tuple(lead) + (-1,) + tuple(out))


@register("Im2col")
def build_im2col(ctx: LayerContext):
    ctx.expect_bottoms(1)
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    cp = ctx.param.convolution_param
    shape = tuple(ctx.bottom_shapes[0])
    axis = ctx.canonical_axis(cp.axis, len(shape))
    spatial = len(shape) - axis - 1
    if spatial < 1:
        raise ctx.error(f"needs at least one spatial axis after channel axis {axis}, bottom shape {shape}")
    kernel, stride, pad, dilation = conv_window(ctx, spatial)
    out = conv_output(ctx, shape[axis + 1:], kernel, stride, pad, dilation)
    top = shape[:axis] + (shape[axis] * math.prod(kernel),) + out
    return ctx.wire(Im2col(axis, kernel, stride, pad, dilation), top_shapes=[top])


@register_onnx("Im2col")
def im2col_to_onnx(g: OnnxGraph, ctx, module: Im2col, inputs, outputs):
    if module.axis != 1:
        raise ctx.error(f"channel axis {module.axis} has no ONNX export (only axis 1)")
    # A grouped convolution with one-hot filters, one group per channel: output channel
    # c * K + j copies kernel tap j of channel c, Caffe's column order.
    channels = ctx.bottom_shapes[0][1]
    taps = math.prod(module.kernel)
    one_hot = np.eye(taps, dtype=np.float32).reshape((taps, 1) + module.kernel)
    weight = np.tile(one_hot, (channels,) + (1,) * (1 + len(module.kernel)))
    g.node("Conv", [inputs[0], g.initializer(weight, ctx.name + "/taps")], outputs,
           kernel_shape=list(module.kernel), strides=list(module.stride), pads=list(module.pad) * 2,
           dilations=list(module.dilation), group=channels)


def _size(values) -> str:
    """A kernel, stride... as torch's modules take it: one number when all axes agree."""
    return str(values[0]) if len(set(values)) == 1 else str(tuple(values))


@register_source("Convolution", "Deconvolution")
def convolution_to_source(src, ctx, module: Convolution, inputs, outputs):
    g = module.geometry
    if g.axis != 1:
        raise no_source_form(ctx, f"channel axis {g.axis}")
    spatial = len(g.kernel)
    kind = f"ConvTranspose{spatial}d" if module.transposed else f"Conv{spatial}d"
    blobs = {"weight": module.weight} if module.bias is None else {"weight": module.weight, "bias": module.bias}
    settings = [f"{g.channels}", f"{g.num_output}", _size(g.kernel)]
    for name, value, default in (("stride", g.stride, 1), ("padding", g.pad, 0), ("dilation", g.dilation, 1)):
        if any(v != default for v in value):
            settings.append(f"{name}={_size(value)}")
    settings += [f"groups={g.group}"] * (g.group != 1) + ["bias=False"] * (module.bias is None)
    layer = src.attribute(ctx, f"nn.{kind}({', '.join(settings)})", blobs)
    for x, top in zip(inputs, outputs):
        src.assign([top], f"{layer}({x})")


IM2COL_SOURCE = '''
def im2col(x, axis, kernel, stride, pad, dilation):
    \"\"\"Caffe's Im2col per example: each spatial window of the zero-padded input (channel axis
    `axis`) laid out along the channel axis as (channel, kernel offsets) in row-major order.\"\"\"
    lead, spatial = x.shape[:axis], len(kernel)
    x = F.pad(x.reshape((-1,) + tuple(x.shape[axis:])), [p for size in reversed(pad) for p in (size, size)])
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # windows of extent d (k - 1) + 1, every d-th tap
    x = x.permute([0, 1] + list(range(2 + spatial, 2 + 2 * spatial)) + list(range(2, 2 + spatial)))
    return x.reshape(tuple(lead) + (-1,) + tuple(x.shape[2 + spatial:]))
'''


@register_source("Im2col")
def im2col_to_source(src, ctx, module: Im2col, inputs, outputs):
    src.helper(IM2COL_SOURCE)
    src.assign(outputs, f"im2col({inputs[0]}, {module.axis}, {module.kernel}, {module.stride}, {module.pad}, "
                        f"{module.dilation})")
