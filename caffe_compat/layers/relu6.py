"""ReLU6 (eric612/MobileNet-YOLO relu6_layer.cpp): min(max(x, 0) + negative_slope *
min(x, 0), 6), its settings in a ReLUParameter (relu6_param)."""
from __future__ import annotations

import torch

from ..params.forks import relu6_slope
from .activation import _neuron, _scalar
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, register, register_onnx, register_source


class _ReLU6(torch.autograd.Function):
    """The fork's Backward_cpu: the top's diff times (x > 0) + negative_slope * (x <= 0),
    zero where x >= 6 (so the slope at 0, and no gradient at 6 itself)."""

    @staticmethod
    def forward(ctx, x, slope: float):
        ctx.save_for_backward(x)
        ctx.slope = slope
        return torch.clamp_max(x.clamp_min(0) + slope * x.clamp_max(0), 6.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        passing = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, ctx.slope))
        return grad * passing * (x < 6), None


class ReLU6(CaffeLayer):
    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return _ReLU6.apply(x, self.negative_slope)


@register("ReLU6")
def build_relu6(ctx: LayerContext) -> Converted:
    return _neuron(ctx, ReLU6(relu6_slope(ctx)))


@register_onnx("ReLU6")
def relu6_to_onnx(g: OnnxGraph, ctx, module: ReLU6, inputs, outputs):
    six = _scalar(g, 6.0, ctx.name + "/six")
    if module.negative_slope == 0:
        g.node("Clip", [inputs[0], _scalar(g, 0.0, ctx.name + "/zero"), six], outputs)
        return
    # a negative slope leaves the bottom unbounded: LeakyRelu, then the cap at 6
    (leaky,) = g.node("LeakyRelu", inputs, hint=ctx.name + "/leaky", alpha=module.negative_slope)
    g.node("Min", [leaky, six], outputs)


RELU6_SOURCE = '''
class ReLU6(torch.autograd.Function):
    """The MobileNet-YOLO fork's ReLU6: min(max(x, 0) + slope * min(x, 0), 6). Its gradient is
    the top's times 1 where x > 0, else the slope (at 0 too), and 0 from 6 up."""

    @staticmethod
    def forward(ctx, x, slope):
        ctx.save_for_backward(x)
        ctx.slope = slope
        return torch.clamp_max(x.clamp_min(0) + slope * x.clamp_max(0), 6.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        passing = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, ctx.slope))
        return grad * passing * (x < 6), None
'''


@register_source("ReLU6")
def relu6_to_source(src, ctx, module: ReLU6, inputs, outputs):
    src.helper(RELU6_SOURCE)
    src.assign(outputs, f"ReLU6.apply({inputs[0]}, {module.negative_slope!r})")
