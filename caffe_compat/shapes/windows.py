"""Shape rules of the layers that slide a window: Pooling, SPP, Im2col, LRN, Crop (and the
convolution geometry Convolution shares, see learned.py)."""
from __future__ import annotations

import math
from typing import List, Tuple

from ..layer_params import hw_or_repeated, per_axis
from .base import LayerView, rule, same_shape

CEIL = 0  # PoolingParameter.RoundMode


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


def pooled_size(size: int, kernel: int, stride: int, pad: int, clip: bool, ceil: bool = True) -> int:
    """Caffe's pooled size, rounded up (or down), then a last window starting in the padding dropped."""
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if ceil else span // stride) + 1
    if clip and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def _pooled(v: LayerView, size, kernel, stride, pad, ceil: bool = True) -> Tuple[int, ...]:
    if min(kernel + stride) <= 0:
        raise v.error(f"kernel {kernel} and stride {stride} must be positive")
    pooled = tuple(pooled_size(n, k, s, p, pad != (0, 0), ceil) for n, k, s, p in zip(size, kernel, stride, pad))
    if min(pooled) < 1:
        raise v.error(f"kernel {kernel} with pad {pad} does not fit the {size[0]}x{size[1]} input")
    return pooled


@rule("Pooling")
def _pooling(v):
    shape = v.expect_rank(4)
    pp = v.param.pooling_param
    if pp.global_pooling:
        kernel = tuple(shape[2:])
    elif pp.HasField("kernel_size"):
        kernel = (pp.kernel_size,) * 2
    else:
        kernel = (pp.kernel_h, pp.kernel_w)
    pad = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") else (pp.pad,) * 2
    stride = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride,) * 2
    pooled = _pooled(v, shape[2:], kernel, stride, pad, pp.round_mode == CEIL)
    return [tuple(shape[:2]) + pooled] * len(v.tops), []


@rule("SPP")
def _spp(v):
    shape = v.expect_rank(4)
    height = v.param.spp_param.pyramid_height
    if height < 1:
        raise v.error(f"spp_param.pyramid_height must be at least 1, got {height}")
    levels = []
    for level in range(height):  # SPPLayer::GetPoolingParam: 2^l x 2^l bins
        bins = 2 ** level
        kernel = tuple(-(-n // bins) for n in shape[2:])
        pad = tuple((k * bins - n + 1) // 2 for k, n in zip(kernel, shape[2:]))
        levels.append(_pooled(v, shape[2:], kernel, kernel, pad))
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
