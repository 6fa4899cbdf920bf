"""Clip and Swish: the two neuron layers BVLC Caffe added after 1.0 (clip_param at
LayerParameter field 148, swish_param at 147)."""
from __future__ import annotations

import torch

from .activation import _neuron, _scalar
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, register, register_onnx, register_source


class Clip(CaffeLayer):
    """max(min, min(x, max)), as Caffe writes it with std::min and std::max (so min > max
    gives min everywhere, and NaN gives min). The gradient passes where min <= x <= max,
    both ends included, as in Caffe's backward (torch's minimum/maximum would halve it at
    a tie)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low = low
        self.high = high

    def forward(self, x):
        clipped = x.detach().clamp(max=self.high).clamp(min=self.low)
        clipped = clipped.nan_to_num(nan=self.low, posinf=float("inf"), neginf=float("-inf"))
        inside = (x >= self.low) & (x <= self.high)
        return torch.where(inside, x, clipped)


@register("Clip")
def build_clip(ctx: LayerContext) -> Converted:
    param = ctx.param.clip_param
    if not (param.HasField("min") and param.HasField("max")):
        raise ctx.error("clip_param needs both min and max (required fields)")
    return _neuron(ctx, Clip(param.min, param.max))


@register_onnx("Clip")
def clip_to_onnx(g: OnnxGraph, ctx, module: Clip, inputs, outputs):
    # Not ONNX's Clip, which gives max where min > max.
    (below,) = g.node("Min", [inputs[0], _scalar(g, module.high, ctx.name + "/max")], hint=ctx.name + "/below")
    g.node("Max", [below, _scalar(g, module.low, ctx.name + "/min")], outputs)


class Swish(CaffeLayer):
    """x * sigmoid(beta * x)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return x * torch.sigmoid(x * self.beta if self.beta != 1 else x)


@register("Swish")
def build_swish(ctx: LayerContext) -> Converted:
    return _neuron(ctx, Swish(ctx.param.swish_param.beta))


@register_onnx("Swish")
def swish_to_onnx(g: OnnxGraph, ctx, module: Swish, inputs, outputs):
    x = inputs[0]
    if module.beta != 1:
        (x,) = g.node("Mul", [x, _scalar(g, module.beta, ctx.name + "/beta")], hint=ctx.name + "/scaled")
    (gate,) = g.node("Sigmoid", [x], hint=ctx.name + "/gate")
    g.node("Mul", [inputs[0], gate], outputs)


CLIP_SOURCE = '''
def caffe_clip(x, low, high):
    """Caffe's Clip: max(low, min(x, high)) (NaN gives low), its gradient passing where
    low <= x <= high, both ends included."""
    clipped = x.detach().clamp(max=high).clamp(min=low)
    clipped = clipped.nan_to_num(nan=low, posinf=float("inf"), neginf=float("-inf"))
    return torch.where((x >= low) & (x <= high), x, clipped)
'''


@register_source("Clip")
def clip_to_source(src, ctx, module: Clip, inputs, outputs):
    src.helper(CLIP_SOURCE)
    src.assign(outputs, f"caffe_clip({inputs[0]}, {module.low!r}, {module.high!r})")


@register_source("Swish")
def swish_to_source(src, ctx, module: Swish, inputs, outputs):
    x = inputs[0]
    src.assign(outputs, f"{x} * torch.sigmoid({x if module.beta == 1 else f'{x} * {module.beta!r}'})")
