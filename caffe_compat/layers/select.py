"""Layers that pick items of the batch: Filter (those a selector marks) and BatchReindex
(those an index lists). Neither passes a gradient to its selector or index bottom."""
from __future__ import annotations

import torch

from .onnx_graph import INT64, OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, register, register_onnx, register_source


class Filter(CaffeLayer):
    """Each data bottom's items whose selector entry is non-zero, in order. The top's
    batch size depends on the selector; the net's declared shape is Caffe's first
    reshape, the full batch."""

    def forward(self, *bottoms):
        *data, selector = bottoms
        keep = torch.nonzero(selector.detach().reshape(-1) != 0).reshape(-1)
        tops = tuple(x.index_select(0, keep) for x in data)
        return tops[0] if len(tops) == 1 else tops


@register("Filter")
def build_filter(ctx: LayerContext) -> Converted:
    if len(ctx.bottoms) < 2:
        raise ctx.error(f"expects at least 2 bottoms (data..., selector), got {len(ctx.bottoms)}")
    if len(ctx.tops) != len(ctx.bottoms) - 1:
        raise ctx.error(f"needs one top per data bottom ({len(ctx.bottoms) - 1}), got {len(ctx.tops)}")
    selector = tuple(ctx.bottom_shapes[-1])
    if not selector or any(d != 1 for d in selector[1:]):
        raise ctx.error(f"selector '{ctx.bottoms[-1]}' must have shape (N, 1, ...), got {selector}")
    for name, shape in zip(ctx.bottoms[:-1], ctx.bottom_shapes[:-1]):
        if not shape or shape[0] != selector[0]:
            raise ctx.error(f"bottom '{name}' {tuple(shape)} must have the selector's first dimension "
                            f"{selector[0]}")
    return ctx.wire(Filter(), top_shapes=ctx.bottom_shapes[:-1])


@register_onnx("Filter")
def filter_to_onnx(g: OnnxGraph, ctx, module: Filter, inputs, outputs):
    *data, selector = inputs
    (flat,) = g.node("Reshape", [selector, g.ints([-1], ctx.name + "/flat_shape")], hint=ctx.name + "/selector")
    (zero,) = g.node("Equal", [flat, g.floats(0.0, ctx.name + "/zero")], hint=ctx.name + "/is_zero")
    (keep,) = g.node("Not", [zero], hint=ctx.name + "/keep")
    (where,) = g.node("NonZero", [keep], hint=ctx.name + "/where")
    (index,) = g.node("Reshape", [where, g.ints([-1], ctx.name + "/index_shape")], hint=ctx.name + "/index")
    for x, top in zip(data, outputs):
        g.node("Gather", [x, index], [top], axis=0)


class BatchReindex(CaffeLayer):
    """top[i] = data[int(index[i])]; the data's gradient sums over repeated indices."""

    def forward(self, data, index):
        return data.index_select(0, index.detach().long())


@register("BatchReindex")
def build_batch_reindex(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(2)
    data, index = (tuple(s) for s in ctx.bottom_shapes)
    if len(index) != 1:
        raise ctx.error(f"index bottom '{ctx.bottoms[1]}' must be 1-D, got shape {index}")
    if not data:
        raise ctx.error(f"data bottom '{ctx.bottoms[0]}' must have a batch axis")
    return ctx.wire(BatchReindex(), top_shapes=[index[:1] + data[1:]])


@register_onnx("BatchReindex")
def batch_reindex_to_onnx(g: OnnxGraph, ctx, module: BatchReindex, inputs, outputs):
    (index,) = g.node("Cast", [inputs[1]], hint=ctx.name + "/index", to=INT64)
    g.node("Gather", [inputs[0], index], outputs, axis=0)


# ---------------------------------------------------------------- standalone source

FILTER_SOURCE = '''
def filter_batch(*bottoms):
    """Caffe's Filter: each data bottom's items whose selector (the last bottom) entry is non-zero."""
    *data, selector = bottoms
    keep = torch.nonzero(selector.detach().reshape(-1) != 0).reshape(-1)
    tops = tuple(x.index_select(0, keep) for x in data)
    return tops[0] if len(tops) == 1 else tops
'''


@register_source("Filter")
def filter_to_source(src, ctx, module: Filter, inputs, outputs):
    src.helper(FILTER_SOURCE)
    src.assign(outputs, f"filter_batch({', '.join(inputs)})")


@register_source("BatchReindex")
def batch_reindex_to_source(src, ctx, module: BatchReindex, inputs, outputs):
    src.assign(outputs, f"{inputs[0]}.index_select(0, {inputs[1]}.detach().long())")
