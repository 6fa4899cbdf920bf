"""Softmax along one axis."""
from __future__ import annotations

import torch

from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class Softmax(CaffeLayer):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        # exp(x - max) / sum, as Caffe computes it; its backward is autograd's.
        return torch.softmax(x, self.axis)


def canonical_softmax_axis(ctx: LayerContext) -> int:
    """softmax_param.axis of bottom 0 made non-negative (SoftmaxWithLoss shares it)."""
    return ctx.canonical_axis(ctx.param.softmax_param.axis, len(ctx.bottom_shapes[0]), "softmax axis")


@register("Softmax")
def build_softmax(ctx: LayerContext):
    ctx.expect_bottoms(1)
    return ctx.wire(Softmax(canonical_softmax_axis(ctx)))


@register_onnx("Softmax")
def softmax_to_onnx(g: OnnxGraph, ctx, module: Softmax, inputs, outputs):
    # From opset 13 ONNX's Softmax normalises along the one axis, as Caffe does.
    g.node("Softmax", [inputs[0]], outputs, axis=module.axis)


@register_source("Softmax")
def softmax_to_source(src, ctx, module: Softmax, inputs, outputs):
    src.assign(outputs, f"torch.softmax({inputs[0]}, {module.axis})")
