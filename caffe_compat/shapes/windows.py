"""Shape rules of the layers that slide a window: Pooling, SPP, Im2col, LRN, Crop (and the
convolution geometry Convolution shares, see learned.py)."""
from __future__ import annotations

import math
from typing import List

from ..layer_params import hw_or_repeated, per_axis, pool_window, pooled_sizes, spp_level_window
from .base import LayerView, rule, same_shape


def conv_window(v: LayerView, spatial: int):
    """ConvolutionParameter's (kernel, stride, pad, dilation), `prefix_h`/`_w` or repeated."""
    cp = v.param.convolution_param
    window = (hw_or_repeated(v.error, cp, "kernel_size", "kernel", None, spatial),
              hw_or_repeated(v.error, cp, "stride", "stride", 1, spatial),
              hw_or_repeated(v.error, cp, "pad", "pad", 0, spatial),
              per_axis(v.error, "dilation", cp.dilation, 1, spatial))
    if min(window[0] + window[1] + window[3]) <= 0:
        raise v.error("kernel, stride and dilation must be positive")
    return window


def conv_output(v: LayerView, sizes, kernel, stride, pad, dilation) -> List[int]:
    """Convolution's output size per spatial axis (Im2col's too)."""
    out = []
    for n, k, s, p, d in zip(sizes, kernel, stride, pad, dilation):
        extent = d * (k - 1) + 1
        if n + 2 * p < extent:
            raise v.error(f"kernel {kernel} (dilation {dilation}, pad {pad}) does not fit the input {tuple(sizes)}")
        out.append((n + 2 * p - extent) // s + 1)
    return out


@rule("Im2col")
def _im2col(v):
    shape = tuple(v.bottom_shapes[0])
    axis = v.canonical_axis(v.param.convolution_param.axis, len(shape))
    spatial = len(shape) - axis - 1
    if spatial < 1:
        raise v.error(f"needs a spatial axis after channel axis {axis}, bottom shape {shape}")
    kernel, stride, pad, dilation = conv_window(v, spatial)
    out = conv_output(v, shape[axis + 1:], kernel, stride, pad, dilation)
    return [shape[:axis] + (shape[axis] * math.prod(kernel),) + tuple(out)], []


@rule("Pooling")
def _pooling(v):
    shape = v.expect_rank(4)
    kernel, stride, pad, ceil = pool_window(v)
    return [tuple(shape[:2]) + pooled_sizes(v, shape[2:], kernel, stride, pad, ceil)] * len(v.tops), []


@rule("SPP")
def _spp(v):
    shape = v.expect_rank(4)
    height = v.param.spp_param.pyramid_height
    if height < 1:
        raise v.error(f"spp_param.pyramid_height must be at least 1, got {height}")
    levels = []
    for level in range(height):
        kernel, pad = spp_level_window(shape[2:], level)
        levels.append(pooled_sizes(v, shape[2:], kernel, kernel, pad))
    if height == 1:
        return [tuple(shape[:2]) + levels[0]], []
    return [(shape[0], sum(shape[1] * h * w for h, w in levels))], []


@rule("LRN")
def _lrn(v):
    v.expect_rank(4)
    return same_shape(v)


@rule("Crop")
def _crop(v):
    v.expect_bottoms(2)
    data, reference = v.bottom_shapes
    start = v.canonical_axis(v.param.crop_param.axis, len(data))
    return [tuple(data[:start]) + tuple(reference[start:])], []
