"""Layers that move data without arithmetic: Concat, Slice, Split, Flatten, Reshape,
Tile, Silence, and ArgMax (which picks positions)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..params.layer import concat_top, flatten_top, reshape_top, slice_tops
from .onnx_graph import FLOAT, OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, register, register_onnx, register_source

Shape = Tuple[int, ...]


def _expect_tops(ctx: LayerContext, minimum: int, maximum: Optional[int] = None) -> None:
    count = len(ctx.tops)
    if count < minimum or (maximum is not None and count > maximum):
        want = str(minimum) if maximum == minimum else f"at least {minimum}"
        raise ctx.error(f"expects {want} top(s), got {count}")


def _refuse_in_place(ctx: LayerContext) -> None:
    if set(ctx.tops) & set(ctx.bottoms):
        raise ctx.error("does not allow in-place computation (a top named like a bottom)")


def _alias(x: torch.Tensor) -> torch.Tensor:
    """`x` under a new tensor (Caffe shares the data), so each top keeps its own gradient."""
    return x.view_as(x)


# ---------------------------------------------------------------- Concat, Slice, Split

class Concat(CaffeLayer):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return _alias(bottoms[0])
        return torch.cat(bottoms, dim=self.axis)


@register("Concat")
def build_concat(ctx: LayerContext) -> Converted:
    _expect_tops(ctx, 1, 1)
    top, axis = concat_top(ctx)
    return ctx.wire(Concat(axis), top_shapes=[top])


@register_onnx("Concat")
def concat_to_onnx(g: OnnxGraph, ctx, module: Concat, inputs, outputs):
    g.node("Concat", inputs, outputs, axis=module.axis)


class Slice(CaffeLayer):
    def __init__(self, axis: int, sizes: Sequence[int]):
        super().__init__()
        self.axis = axis
        self.sizes = list(sizes)
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def forward(self, x):
        if len(self.sizes) == 1:
            return _alias(x)
        # one narrow per top, not torch.split: fx cannot unpack the tuple split returns
        return tuple(x.narrow(self.axis, start, size) for start, size in zip(self.starts, self.sizes))


@register("Slice")
def build_slice(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(1)
    _expect_tops(ctx, 1)
    axis, sizes, tops = slice_tops(ctx)
    return ctx.wire(Slice(axis, sizes), top_shapes=tops)


@register_onnx("Slice")
def slice_to_onnx(g: OnnxGraph, ctx, module: Slice, inputs, outputs):
    if len(module.sizes) == 1:
        g.node("Identity", inputs, outputs)
    else:
        g.node("Split", [inputs[0], g.ints(module.sizes, ctx.name + "/sizes")], outputs, axis=module.axis)


class Split(CaffeLayer):
    """The bottom under each top; the bottom's gradient is the sum of the tops'."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def forward(self, x):
        if self.count == 1:
            return _alias(x)
        return tuple(_alias(x) for _ in range(self.count))


@register("Split")
def build_split(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(1)
    _expect_tops(ctx, 1)
    _refuse_in_place(ctx)
    return ctx.wire(Split(len(ctx.tops)), top_shapes=[ctx.bottom_shapes[0]] * len(ctx.tops))


@register_onnx("Split")
def split_to_onnx(g: OnnxGraph, ctx, module: Split, inputs, outputs):
    for output in outputs:
        g.node("Identity", inputs, [output])


# ---------------------------------------------------------------- Flatten, Reshape

class Reshape(CaffeLayer):
    """A view with a new shape. `shape` is the top shape with -1 at its one axis that
    depends on the batch size (none when the batch size is folded into fixed dims), so
    the module follows the batch size it is run with; `batch_axis` is the top axis
    holding the bottom's axis 0 unchanged, if any."""

    def __init__(self, shape: Sequence[int], batch_axis: Optional[int]):
        super().__init__()
        self.shape = tuple(shape)
        self.batch_axis = batch_axis

    def forward(self, x):
        return x.reshape(self.shape)


def _check_one_to_one(ctx: LayerContext) -> None:
    """Flatten's and Reshape's layout: one bottom, one top of another name."""
    ctx.expect_bottoms(1)
    _expect_tops(ctx, 1, 1)
    _refuse_in_place(ctx)


def _dynamic_shape(top: Shape, dynamic_axis: Optional[int]) -> List[int]:
    return [-1 if axis == dynamic_axis else size for axis, size in enumerate(top)]


@register("Flatten")
def build_flatten(ctx: LayerContext) -> Converted:
    _check_one_to_one(ctx)
    top, start = flatten_top(ctx)
    # top axis 0 is either the bottom's axis 0 or the flattened axes holding it
    module = Reshape(_dynamic_shape(top, 0), 0 if start > 0 else None)
    return ctx.wire(module, top_shapes=[top])


@register("Reshape")
def build_reshape(ctx: LayerContext) -> Converted:
    _check_one_to_one(ctx)
    shape = tuple(ctx.bottom_shapes[0])
    rank = len(shape)
    dims = [int(d) for d in ctx.param.reshape_param.shape.dim]
    top, start, end = reshape_top(shape, ctx.param.reshape_param, ctx.error)

    # Where does the bottom's axis 0 (the batch) go?
    if rank == 0:
        batch_axis = None
    elif start > 0:
        batch_axis = 0
    elif end == 0:
        batch_axis = len(dims)  # new axes inserted in front of it
    elif dims[0] == 0:
        batch_axis = 0
    else:
        batch_axis = None
    if batch_axis is not None:
        dynamic_axis = batch_axis
    else:
        dynamic_axis = start + dims.index(-1) if -1 in dims else None
    module = Reshape(_dynamic_shape(tuple(top), dynamic_axis), batch_axis)
    return ctx.wire(module, top_shapes=[top])


@register_onnx("Flatten", "Reshape")
def reshape_to_onnx(g: OnnxGraph, ctx, module: Reshape, inputs, outputs):
    shape = list(module.shape)
    if module.batch_axis == 0:
        shape[0] = 0  # copy the symbolic batch size (allowzero is 0)
    g.node("Reshape", [inputs[0], g.ints(shape, ctx.name + "/shape")], outputs)


# ---------------------------------------------------------------- Tile, Silence

class Tile(CaffeLayer):
    """Repeats the bottom `tiles` times along `axis` (the whole block of axes from
    `axis` on, as Caffe copies it)."""

    def __init__(self, repeats: Sequence[int]):
        super().__init__()
        self.repeats = tuple(repeats)

    def forward(self, x):
        return x.repeat(self.repeats)


@register("Tile")
def build_tile(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(1)
    _expect_tops(ctx, 1, 1)
    shape = tuple(ctx.bottom_shapes[0])
    param = ctx.param.tile_param
    axis = ctx.canonical_axis(param.axis, len(shape))
    if not param.HasField("tiles"):
        raise ctx.error("tile_param.tiles must be given")
    if param.tiles <= 0:
        raise ctx.error(f"tiles must be positive, got {param.tiles}")
    repeats = [1] * len(shape)
    repeats[axis] = param.tiles
    top = tuple(s * r for s, r in zip(shape, repeats))
    return ctx.wire(Tile(repeats), top_shapes=[top])


@register_onnx("Tile")
def tile_to_onnx(g: OnnxGraph, ctx, module: Tile, inputs, outputs):
    g.node("Tile", [inputs[0], g.ints(module.repeats, ctx.name + "/repeats")], outputs)


class Silence(CaffeLayer):
    """Consumes its bottoms and writes nothing."""

    def forward(self, *bottoms):
        return ()


@register("Silence")
def build_silence(ctx: LayerContext) -> Converted:
    if not ctx.bottoms:
        raise ctx.error("expects at least 1 bottom")
    _expect_tops(ctx, 0, 0)
    return ctx.wire(Silence(), top_shapes=[])


@register_onnx("Silence")
def silence_to_onnx(g: OnnxGraph, ctx, module: Silence, inputs, outputs):
    """Nothing to emit: Silence has no outputs."""


# ---------------------------------------------------------------- ArgMax

class ArgMax(CaffeLayer):
    """The indices (as floats), or the values, of the `top_k` largest entries along
    `axis`; with no axis, over each example flattened, giving (N, 1, top_k) indices or
    (N, 2, top_k) indices and values, padded with unit axes to the bottom's rank. Caffe
    sorts (value, index) pairs, so among equal values the larger index comes first. No
    gradient flows (Caffe has none)."""

    def __init__(self, axis: Optional[int], top_k: int, out_max_val: bool, top_shape: Shape):
        super().__init__()
        self.axis = axis
        self.top_k = top_k
        self.out_max_val = out_max_val
        self.top_shape = tuple(top_shape)

    def _largest(self, x: torch.Tensor, dim: int):
        length = x.shape[dim]
        # A stable descending sort of the reversed axis puts the larger index first among ties.
        values, order = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        values = values.narrow(dim, 0, self.top_k)
        indices = (length - 1) - order.narrow(dim, 0, self.top_k)
        return values, indices.to(x.dtype)

    def forward(self, x):
        x = x.detach()
        if self.axis is not None:
            values, indices = self._largest(x, self.axis)
            return values if self.out_max_val else indices
        values, indices = self._largest(x.reshape(x.shape[0], -1), 1)
        top = torch.cat([indices, values], dim=1) if self.out_max_val else indices
        return top.reshape((-1,) + self.top_shape[1:])


@register("ArgMax")
def build_argmax(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(1)
    _expect_tops(ctx, 1, 1)
    shape = tuple(ctx.bottom_shapes[0])
    param = ctx.param.argmax_param
    top_k = param.top_k
    if top_k < 1:
        raise ctx.error(f"top_k must be at least 1, got {top_k}")
    if param.HasField("axis"):
        axis = ctx.canonical_axis(param.axis, len(shape))
        if top_k > shape[axis]:
            raise ctx.error(f"top_k {top_k} exceeds the {shape[axis]} entries of axis {axis}")
        top = shape[:axis] + (top_k,) + shape[axis + 1:]
    else:
        axis = None
        if not shape:
            raise ctx.error("needs a bottom of rank >= 1 when no axis is given")
        per_example = math.prod(shape[1:])
        if top_k > per_example:
            raise ctx.error(f"top_k {top_k} exceeds the {per_example} entries of each example")
        top = [1] * max(3, len(shape))
        top[0], top[1], top[2] = shape[0], 2 if param.out_max_val else 1, top_k
        top = tuple(top)
    return ctx.wire(ArgMax(axis, top_k, param.out_max_val, top), top_shapes=[top])


@register_onnx("ArgMax")
def argmax_to_onnx(g: OnnxGraph, ctx, module: ArgMax, inputs, outputs):
    x, axis = inputs[0], module.axis
    if axis is None:
        x = g.node("Reshape", [x, g.ints([0, -1], ctx.name + "/per_example")], hint=ctx.name + "/flat")[0]
        axis = 1
        length = math.prod(ctx.bottom_shapes[0][1:])
    else:
        length = ctx.bottom_shapes[0][axis]
    # Reverse the axis so that TopK, which puts the lower index first among ties, puts
    # Caffe's larger index first.
    reversed_x = g.node("Slice", [x, g.ints([-1], ctx.name + "/starts"),
                                  g.ints([np.iinfo(np.int64).min], ctx.name + "/ends"),
                                  g.ints([axis], ctx.name + "/axes"), g.ints([-1], ctx.name + "/steps")],
                        hint=ctx.name + "/reversed")[0]
    k = g.ints([module.top_k], ctx.name + "/k")
    if module.axis is not None and module.out_max_val:
        g.node("TopK", [reversed_x, k], [outputs[0], g.fresh(ctx.name + "/unused_indices")], axis=axis)
        return
    values, order = g.node("TopK", [reversed_x, k],
                           [g.fresh(ctx.name + "/values"), g.fresh(ctx.name + "/order")], axis=axis)
    indices = g.node("Sub", [g.ints(np.array(length - 1), ctx.name + "/last"), order],
                     hint=ctx.name + "/indices")[0]
    if module.axis is not None:
        g.node("Cast", [indices], outputs, to=FLOAT)
        return
    indices = g.node("Cast", [indices], hint=ctx.name + "/float_indices", to=FLOAT)[0]
    if module.out_max_val:
        indices = g.node("Concat", [indices, values], hint=ctx.name + "/indices_values", axis=1)[0]
    top_shape = [0] + list(module.top_shape[1:])
    g.node("Reshape", [indices, g.ints(top_shape, ctx.name + "/top_shape")], outputs)


# ---------------------------------------------------------------- standalone source
# The tops are the bottom's own values under new names, as Caffe shares the data.

@register_source("Concat")
def concat_to_source(src, ctx, module: Concat, inputs, outputs):
    src.assign(outputs, inputs[0] if len(inputs) == 1 else f"torch.cat([{', '.join(inputs)}], {module.axis})")


@register_source("Slice")
def slice_to_source(src, ctx, module: Slice, inputs, outputs):
    x = inputs[0]
    if len(module.sizes) == 1:
        src.assign(outputs, x)
        return
    src.assign(outputs, ", ".join(f"{x}.narrow({module.axis}, {start}, {size})"
                                  for start, size in zip(module.starts, module.sizes)))


@register_source("Split")
def split_to_source(src, ctx, module: Split, inputs, outputs):
    src.assign(outputs, ", ".join(inputs * len(outputs)))


@register_source("Flatten", "Reshape")
def reshape_to_source(src, ctx, module: Reshape, inputs, outputs):
    src.assign(outputs, f"{inputs[0]}.reshape({module.shape})")


@register_source("Tile")
def tile_to_source(src, ctx, module: Tile, inputs, outputs):
    src.assign(outputs, f"{inputs[0]}.repeat({module.repeats})")


@register_source("Silence")
def silence_to_source(src, ctx, module: Silence, inputs, outputs):
    """Nothing to compute: Silence only consumes its bottoms."""


ARGMAX_SOURCE = '''
def argmax(x, axis, top_k, out_max_val, top_shape):
    """Caffe's ArgMax: the indices (as floats), or the values, of the top_k largest entries along
    `axis`; with axis None over each example flattened, (N, 1, top_k) indices or (N, 2, top_k)
    indices and values, unit axes appended up to top_shape's rank. Among equal values the larger
    index comes first, as Caffe sorts (value, index) pairs. No gradient."""
    x = x.detach()
    dim = 1 if axis is None else axis
    flat = x.reshape(x.shape[0], -1) if axis is None else x
    values, order = torch.sort(flat.flip(dim), dim=dim, descending=True, stable=True)
    values = values.narrow(dim, 0, top_k)
    indices = ((flat.shape[dim] - 1) - order.narrow(dim, 0, top_k)).to(x.dtype)
    if axis is not None:
        return values if out_max_val else indices
    top = torch.cat([indices, values], dim=1) if out_max_val else indices
    return top.reshape((-1,) + top_shape[1:])
'''


@register_source("ArgMax")
def argmax_to_source(src, ctx, module: ArgMax, inputs, outputs):
    src.helper(ARGMAX_SOURCE)
    src.assign(outputs, f"argmax({inputs[0]}, {module.axis}, {module.top_k}, {module.out_max_val!r}, "
                        f"{module.top_shape})")
