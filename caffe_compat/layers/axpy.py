"""Axpy (hujie-frank/SENet axpy_layer.cpp): bottoms (a, x, y), top = a * x + y with one
scale per sample and channel (a is (N, C, 1, 1) or (N, C)), as SE blocks use it."""
from __future__ import annotations

from ..params.forks import axpy_top
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class Axpy(CaffeLayer):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, scale, x, y):
        scale = scale.reshape(tuple(scale.shape[:2]) + (1,) * (self.rank - 2))
        return scale * x + y


@register("Axpy")
def build_axpy(ctx: LayerContext):
    top = axpy_top(ctx)
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    return ctx.wire(Axpy(len(top)), top_shapes=[top])


@register_onnx("Axpy")
def axpy_to_onnx(g: OnnxGraph, ctx, module: Axpy, inputs, outputs):
    scale, x, y = inputs
    channels = ctx.bottom_shapes[1][1]
    (scale,) = g.node("Reshape", [scale, g.ints([-1, channels] + [1] * (module.rank - 2), ctx.name + "/scale_shape")],
                      hint=ctx.name + "/scale")
    (scaled,) = g.node("Mul", [scale, x], hint=ctx.name + "/scaled")
    g.node("Add", [scaled, y], outputs)


@register_source("Axpy")
def axpy_to_source(src, ctx, module: Axpy, inputs, outputs):
    scale, x, y = inputs
    src.assign(outputs, f"{scale}.reshape({scale}.shape[:2] + {(1,) * (module.rank - 2)}) * {x} + {y}")
