"""Shape rules of the layers that slide a window: Pooling, SPP, Im2col, LRN, Crop."""
from __future__ import annotations

import math

from ..params.layer import conv_output, conv_window, pool_window, pooled_sizes, spp_level_window
from .base import rule, same_shape


@rule("Im2col")
def _im2col(v):
    shape = tuple(v.bottom_shapes[0])
    axis = v.canonical_axis(v.param.convolution_param.axis, len(shape))
    spatial = len(shape) - axis - 1
    if spatial < 1:
        raise v.error(f"needs a spatial axis after channel axis {axis}, bottom shape {shape}")
    kernel, stride, pad, dilation = conv_window(v, spatial)
    out = conv_output(v, shape[axis + 1:], kernel, stride, pad, dilation)
    return [shape[:axis] + (shape[axis] * math.prod(kernel),) + out], []


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
