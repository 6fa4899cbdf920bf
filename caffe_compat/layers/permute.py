"""The SSD fork's Permute (src/caffe/layers/permute_layer.cpp): the bottom's axes in
permute_param.order, the axes it leaves out following in their order. Its backward
scatters the gradient back, which autograd's permute does exactly."""
from __future__ import annotations

from typing import Tuple

from ..params.ssd import permute_order
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class Permute(CaffeLayer):
    def __init__(self, order: Tuple[int, ...]):
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(self.order).contiguous()


@register("Permute")
def build_permute(ctx: LayerContext):
    order = permute_order(ctx)
    shape = ctx.bottom_shapes[0]
    return ctx.wire(Permute(order), top_shapes=[tuple(shape[axis] for axis in order)])


@register_onnx("Permute")
def permute_to_onnx(g: OnnxGraph, ctx, module: Permute, inputs, outputs):
    g.node("Transpose", inputs, outputs, perm=list(module.order))


@register_source("Permute")
def permute_to_source(src, ctx, module: Permute, inputs, outputs):
    src.assign(outputs, f"{inputs[0]}.permute({module.order}).contiguous()")
