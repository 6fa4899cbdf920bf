"""Crop: cut the first bottom to the second bottom's shape from `axis` on.

The second bottom only supplies the shape: it gets no gradient. Sizes are fixed at
build time except along the batch axis (cropped only when axis is 0), which follows
the reference's batch size at run time.
"""
from __future__ import annotations

from typing import Tuple

from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class Crop(CaffeLayer):
    def __init__(self, start_axis: int, offsets: Tuple[int, ...], sizes: Tuple[int, ...]):
        super().__init__()
        self.start_axis = start_axis
        self.offsets = offsets  # per axis from start_axis on
        self.sizes = sizes  # the reference's sizes there
        # Static slices for the non-batch axes; the batch axis is narrowed in forward.
        window = [slice(None)] * (start_axis + len(offsets))
        for axis, offset, size in zip(range(start_axis, len(window)), offsets, sizes):
            if axis > 0:
                window[axis] = slice(offset, offset + size)
        self.window = tuple(window)

    def forward(self, x, reference):
        if self.start_axis == 0:
            x = x.narrow(0, self.offsets[0], reference.shape[0])
        return x[self.window]


@register("Crop")
def build_crop(ctx: LayerContext):
    ctx.expect_bottoms(2)
    data, reference = ctx.bottom_shapes
    cp = ctx.param.crop_param
    rank = len(data)
    start = ctx.canonical_axis(cp.axis, rank)
    if len(reference) < rank:
        raise ctx.error(f"the reference bottom has rank {len(reference)}, below the data's {rank}")
    cropped = rank - start
    if len(cp.offset) > 1 and len(cp.offset) != cropped:
        raise ctx.error(f"give one offset or one per cropped axis ({cropped}), got {len(cp.offset)}")
    offsets = tuple(cp.offset) if len(cp.offset) > 1 else (cp.offset[0] if cp.offset else 0,) * cropped
    sizes = tuple(reference[start:])
    for axis, offset, size in zip(range(start, rank), offsets, sizes):
        if data[axis] - offset < size:
            raise ctx.error(f"the crop for axis {axis} is out of bounds: size {size} at offset {offset} "
                            f"of {data[axis]}")
    module = Crop(start, offsets, sizes)
    return ctx.wire(module, top_shapes=[tuple(data[:start]) + sizes])


@register_onnx("Crop")
def crop_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    name = ctx.name
    axes = list(range(module.start_axis, module.start_axis + len(module.offsets)))
    starts = list(module.offsets)
    ends = [o + s for o, s in zip(module.offsets, module.sizes)]
    if module.start_axis > 0:
        g.node("Slice", [inputs[0], g.ints(starts, name + "/starts"), g.ints(ends, name + "/ends"),
                         g.ints(axes, name + "/axes")], outputs)
        return
    # The batch axis ends at offset + the reference's run-time batch size.
    (shape,) = g.node("Shape", [inputs[1]], hint=name + "/reference_shape")
    (batch,) = g.node("Slice", [shape, g.ints([0], name + "/zero"), g.ints([1], name + "/one")],
                      hint=name + "/reference_batch")
    (batch_end,) = g.node("Add", [batch, g.ints([starts[0]], name + "/batch_offset")], hint=name + "/batch_end")
    (ends_tensor,) = g.node("Concat", [batch_end, g.ints(ends[1:], name + "/ends")], hint=name + "/ends", axis=0)
    g.node("Slice", [inputs[0], g.ints(starts, name + "/starts"), ends_tensor, g.ints(axes, name + "/axes")],
           outputs)


@register_source("Crop")
def crop_to_source(src, ctx, module: Crop, inputs, outputs):
    x, reference = inputs
    if module.start_axis == 0:  # the batch axis follows the reference's
        x = f"{x}.narrow(0, {module.offsets[0]}, {reference}.shape[0])"
    window = ", ".join(":" if w.start is None else f"{w.start}:{w.stop}" for w in module.window)
    src.assign(outputs, f"{x}[{window}]")
