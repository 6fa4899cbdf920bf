"""A layer and its parameters read as Caffe reads them, without torch: one piece for the
layer builders (layers/) and the shape rules `inspect` uses (shapes/). The functions take
`error`, a function from a message to the exception to raise (the layer's own `error`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..errors import CaffeCompatError

Shape = Tuple[int, ...]

Error = Callable[[str], Exception]


@dataclass
class LayerFacts:
    """What a builder or a shape rule sees of one Caffe layer, and the checks both make."""

    name: str
    type: str
    param: object  # the layer's LayerParameter message (either dialect)
    bottoms: List[str]
    tops: List[str]
    bottom_shapes: List[Shape]

    def error(self, message: str) -> CaffeCompatError:
        return CaffeCompatError(f"layer '{self.name}' ({self.type}): {message}")

    def canonical_axis(self, axis: int, rank: int, what: str = "axis") -> int:
        """Caffe's CanonicalAxisIndex: -rank <= axis < rank, negative counting from the end."""
        if not -rank <= axis < rank:
            raise self.error(f"{what} {axis} is out of range for bottom '{self.bottoms[0]}' of rank {rank}")
        return axis % rank

    def expect_bottoms(self, *counts: int) -> None:
        if len(self.bottoms) not in counts:
            want = " or ".join(str(c) for c in counts)
            raise self.error(f"expects {want} bottom(s), got {len(self.bottoms)}")


def concat_axis(layer: LayerFacts, param, legacy_field: str, rank: int) -> int:
    """The axis of Concat/Slice: `axis`, or the legacy non-negative `concat_dim`/`slice_dim`."""
    if param.HasField("axis") and param.HasField(legacy_field):
        raise layer.error(f"give either axis or {legacy_field}, not both")
    if param.HasField(legacy_field):
        axis = getattr(param, legacy_field)
        if axis >= rank:
            raise layer.error(f"{legacy_field} {axis} is out of range for a bottom of rank {rank}")
        return axis
    return layer.canonical_axis(param.axis, rank)


def concat_top(layer: LayerFacts) -> Tuple[List[int], int]:
    """Caffe's Concat: (the top shape, the concatenation axis)."""
    if not layer.bottoms:
        raise layer.error("expects at least 1 bottom")
    first = tuple(layer.bottom_shapes[0])
    axis = concat_axis(layer, layer.param.concat_param, "concat_dim", len(first))
    top = list(first)
    for name, shape in zip(layer.bottoms[1:], layer.bottom_shapes[1:]):
        shape = tuple(shape)
        if len(shape) != len(first) or shape[:axis] + shape[axis + 1:] != first[:axis] + first[axis + 1:]:
            raise layer.error(f"bottom '{name}' has shape {shape}, which does not match "
                              f"{first} of '{layer.bottoms[0]}' outside the concatenation axis {axis}")
        top[axis] += shape[axis]
    return top, axis


def slice_tops(layer: LayerFacts) -> Tuple[int, List[int], List[Shape]]:
    """Caffe's Slice: (the axis, each top's size along it, the top shapes)."""
    shape = tuple(layer.bottom_shapes[0])
    param = layer.param.slice_param
    axis = concat_axis(layer, param, "slice_dim", len(shape))
    length, parts = shape[axis], len(layer.tops)
    points = list(param.slice_point)
    if points:
        if len(points) != parts - 1:
            raise layer.error(f"{len(points)} slice_point(s) for {parts} tops: give one fewer than the tops")
        if parts > length:
            raise layer.error(f"{parts} tops, but axis {axis} has only {length} entries")
        bounds = [0] + points + [length]
        sizes = [end - start for start, end in zip(bounds, bounds[1:])]
        if any(size <= 0 for size in sizes[:-1]) or sizes[-1] < 0:
            raise layer.error(f"slice_point {points} must increase strictly within 1..{length}")
    else:
        if length % parts:
            raise layer.error(f"{parts} tops do not divide axis {axis} of length {length} evenly")
        sizes = [length // parts] * parts
    return axis, sizes, [shape[:axis] + (size,) + shape[axis + 1:] for size in sizes]


def flatten_top(layer: LayerFacts) -> Tuple[Shape, int]:
    """Caffe's Flatten: (the top shape, its flattened axis) for the layer's bottom."""
    shape = tuple(layer.bottom_shapes[0])
    param = layer.param.flatten_param
    start = layer.canonical_axis(param.axis, len(shape))
    end = layer.canonical_axis(param.end_axis, len(shape), "end_axis")
    if end < start - 1:
        raise layer.error(f"end_axis {param.end_axis} comes before axis {param.axis}")
    # end == start - 1 inserts a unit axis, as Caffe's count(start, end + 1) is then 1
    return shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:], start


def reshape_top(shape: Tuple[int, ...], param, error: Error) -> Tuple[List[int], int, int]:
    """Caffe's Reshape (reshape_layer.cpp): (the top shape, the first and one-past-last
    bottom axes it replaces) for a bottom of `shape` under ReshapeParameter `param`."""
    rank = len(shape)
    dims = [int(d) for d in param.shape.dim]
    if dims.count(-1) > 1:
        raise error(f"shape {dims} has more than one -1")
    if any(d < -1 for d in dims):
        raise error(f"shape {dims} has a negative dimension other than -1")
    start = param.axis if param.axis >= 0 else rank + param.axis + 1
    if not 0 <= start <= rank:
        raise error(f"axis {param.axis} is out of range for a bottom of rank {rank}")
    if param.num_axes < -1:
        raise error(f"num_axes must be >= 0, or -1 for all, got {param.num_axes}")
    end = rank if param.num_axes == -1 else start + param.num_axes
    if end > rank:
        raise error(f"axis + num_axes = {end} is out of range for a bottom of rank {rank}")
    new = []
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= rank:
                raise error(f"shape {dims} copies (0) axis {start + i}, which the bottom {shape} lacks")
            new.append(shape[start + i])
        else:
            new.append(d)
    top = list(shape[:start]) + new + list(shape[end:])
    if -1 in dims:
        inferred = start + dims.index(-1)
        known = math.prod(d for i, d in enumerate(top) if i != inferred)
        if known == 0 or math.prod(shape) % known:
            raise error(f"bottom of shape {shape} cannot be reshaped to {dims} (count not divisible)")
        top[inferred] = math.prod(shape) // known
    elif math.prod(top) != math.prod(shape):
        raise error(f"bottom of shape {shape} ({math.prod(shape)} values) cannot be reshaped to "
                    f"{tuple(top)} ({math.prod(top)} values)")
    return top, start, end


def _per_axis(error: Error, name: str, values, default: Optional[int], spatial: int) -> Tuple[int, ...]:
    """A repeated field given once (for all axes), once per spatial axis, or not at all."""
    values = list(values)
    if not values:
        if default is None:
            raise error(f"{name} is required")
        return (default,) * spatial
    if len(values) == 1:
        return (values[0],) * spatial
    if len(values) != spatial:
        raise error(f"{name} must be given once or once per spatial axis ({spatial}), got {len(values)} values")
    return tuple(values)


def _hw_or_repeated(error: Error, param, repeated: str, prefix: str, default: Optional[int],
                   spatial: int) -> Tuple[int, ...]:
    """`prefix_h`/`prefix_w` (2-D only, exclusive with the repeated form) or the repeated form."""
    h, w = f"{prefix}_h", f"{prefix}_w"
    if param.HasField(h) or param.HasField(w):
        if spatial != 2:
            raise error(f"{h} & {w} can only be used for 2-D convolution")
        if len(getattr(param, repeated)):
            raise error(f"give either {repeated} or {h}/{w}, not both")
        return (getattr(param, h), getattr(param, w))
    return _per_axis(error, repeated, getattr(param, repeated), default, spatial)


def dummy_data_shapes(layer: LayerFacts) -> List[Shape]:
    """DummyData's top shapes: `shape` or the legacy num/channels/height/width, each
    given once (for every top) or once per top."""
    param = layer.param.dummy_data_param
    count = len(layer.tops)
    legacy = ("num", "channels", "height", "width")
    if any(len(getattr(param, f)) for f in legacy):
        if len(param.shape):
            raise layer.error("give either shape or the legacy num/channels/height/width, not both")
        values = {f: list(getattr(param, f)) for f in legacy}
        for name, given in values.items():
            if len(given) not in (1, count):
                raise layer.error(f"dummy_data_param.{name} must be given once or once per top ({count}), "
                                  f"got {len(given)}")
        shapes = [tuple(values[f][0 if len(values[f]) == 1 else i] for f in legacy) for i in range(count)]
    else:
        if len(param.shape) not in (1, count):
            raise layer.error(f"dummy_data_param.shape must be given once or once per top ({count}), "
                              f"got {len(param.shape)}")
        shapes = [tuple(int(d) for d in param.shape[0 if len(param.shape) == 1 else i].dim) for i in range(count)]
    for shape in shapes:
        if any(d < 0 for d in shape):
            raise layer.error(f"shape {shape} has a negative dimension")
    return shapes


POOL_CEIL, POOL_FLOOR = 0, 1  # PoolingParameter.RoundMode


def pool_window(layer: LayerFacts) -> Tuple[Shape, Shape, Shape, bool]:
    """PoolingParameter's (kernel, stride, pad, round up), checked as Caffe's LayerSetUp does."""
    pp = layer.param.pooling_param
    height, width = layer.bottom_shapes[0][2:]
    if pp.global_pooling:
        if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise layer.error("with global_pooling the kernel size cannot be specified")
        kernel = (height, width)
    elif pp.HasField("kernel_size") == (pp.HasField("kernel_h") and pp.HasField("kernel_w")):
        raise layer.error("give kernel_size, or both kernel_h and kernel_w (not both forms)")
    elif pp.HasField("kernel_size"):
        kernel = (pp.kernel_size, pp.kernel_size)
    else:
        kernel = (pp.kernel_h, pp.kernel_w)
    if pp.HasField("pad_h") != pp.HasField("pad_w") or (pp.HasField("pad") and pp.HasField("pad_h")):
        raise layer.error("give pad, or both pad_h and pad_w")
    if pp.HasField("stride_h") != pp.HasField("stride_w") or (pp.HasField("stride") and pp.HasField("stride_h")):
        raise layer.error("give stride, or both stride_h and stride_w")
    pad = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") else (pp.pad, pp.pad)
    stride = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride, pp.stride)
    if min(kernel) <= 0:
        raise layer.error(f"kernel size {kernel} must be positive")
    if min(stride) <= 0:
        raise layer.error(f"stride {stride} must be positive")
    if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise layer.error("with global_pooling only pad 0 and stride 1 are allowed")
    return kernel, stride, pad, _pool_ceil(layer, pp)


def _pool_ceil(layer: LayerFacts, pp) -> bool:
    """Whether the output size rounds up. Forks' PoolingParameter 13 is ceil_mode (a bool,
    BVLC PR 3057), BVLC's is round_mode (an enum, CEIL = 0): each is read where the net
    names it, and a layer naming both is refused rather than one silently winning."""
    if "ceil_mode" in pp.DESCRIPTOR.fields_by_name and pp.HasField("ceil_mode"):
        if pp.HasField("round_mode"):
            raise layer.error("gives both ceil_mode and round_mode; keep one")
        return pp.ceil_mode
    if pp.round_mode not in (POOL_CEIL, POOL_FLOOR):
        raise layer.error(f"unknown round_mode {pp.round_mode}")
    return pp.round_mode == POOL_CEIL


def pooled_size(size: int, kernel: int, stride: int, pad: int, clip: bool, ceil: bool = True) -> int:
    """Caffe's output size along one axis, rounded up (round_mode CEIL) or down (FLOOR);
    `clip` is Caffe's `pad_h || pad_w`."""
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if ceil else span // stride) + 1
    if clip and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def pooled_sizes(layer: LayerFacts, size, kernel, stride, pad, ceil: bool = True) -> Shape:
    """The (h, w) output of checked pooling settings on an input of `size`."""
    if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise layer.error(f"pad {pad} must be smaller than the kernel {kernel}")
    clip = tuple(pad) != (0, 0)
    pooled = tuple(pooled_size(n, k, s, p, clip, ceil) for n, k, s, p in zip(size, kernel, stride, pad))
    if min(pooled) < 1:
        raise layer.error(f"kernel {kernel} with pad {pad} does not fit the {size[0]}x{size[1]} input")
    return pooled


def spp_level_window(size, level: int) -> Tuple[Shape, Shape]:
    """SPPLayer::GetPoolingParam's (kernel = stride, pad) for one pyramid level: 2^l x 2^l bins."""
    bins = 2 ** level
    kernel = tuple(-(-n // bins) for n in size)
    return kernel, tuple((k * bins - n + 1) // 2 for k, n in zip(kernel, size))


def conv_window(layer: LayerFacts, spatial: int) -> Tuple[Shape, Shape, Shape, Shape]:
    """ConvolutionParameter's (kernel, stride, pad, dilation), `prefix_h`/`_w` or repeated."""
    cp = layer.param.convolution_param
    window = (_hw_or_repeated(layer.error, cp, "kernel_size", "kernel", None, spatial),
              _hw_or_repeated(layer.error, cp, "stride", "stride", 1, spatial),
              _hw_or_repeated(layer.error, cp, "pad", "pad", 0, spatial),
              _per_axis(layer.error, "dilation", cp.dilation, 1, spatial))
    for name, values in (("kernel", window[0]), ("stride", window[1]), ("dilation", window[3])):
        if min(values) <= 0:
            raise layer.error(f"{name} {values} must be positive")
    return window


def conv_output(layer: LayerFacts, sizes, kernel, stride, pad, dilation, transposed: bool = False) -> Shape:
    """The output's spatial sizes of a convolution (`transposed`: deconvolution; Im2col's too)."""
    extents = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    zipped = zip(sizes, stride, extents, pad)
    if transposed:
        out = tuple(s * (n - 1) + e - 2 * p for n, s, e, p in zipped)
    else:
        out = tuple((n + 2 * p - e) // s + 1 if n + 2 * p >= e else 0 for n, s, e, p in zipped)
    if min(out) <= 0:
        raise layer.error(f"kernel {kernel} (dilation {dilation}, pad {pad}, stride {stride}) "
                          f"does not fit the {tuple(sizes)} input: it gives an empty output")
    return out
