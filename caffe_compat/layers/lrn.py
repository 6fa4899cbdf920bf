"""LRN: local response normalisation across or within channels, as Caffe computes it.

ACROSS_CHANNELS: top = x * (k + alpha / n * sum of x^2 over n channels centred on
each)^-beta, zero beyond the channel range.
WITHIN_CHANNEL: Caffe composes it from layers (square, AVE pooling with kernel n,
stride 1 and pad (n - 1) / 2, then power with shift 1): top = x * (1 + alpha * mean of
x^2 over the n x n window)^-beta. k is not used. With that pad and stride every window
lies inside the padded input, so Caffe's divisor is n^2 everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx

ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1  # LRNParameter.NormRegion


class AcrossChannelLRN(CaffeLayer):
    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        wide = _at_least_float32(x)
        # Channel windows as a (size x 1) average over an (N, 1, C, H*W) view.
        squares = (wide * wide).flatten(2).unsqueeze(1)
        mean = F.avg_pool2d(squares, (self.size, 1), stride=1, padding=((self.size - 1) // 2, 0),
                            count_include_pad=True)
        scale = mean.reshape(x.shape) * self.alpha + self.k
        return (wide * scale.pow(-self.beta)).to(x.dtype)


def _at_least_float32(x):
    """Sums of squares overflow float16 under autocast: the normaliser is computed in float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class WithinChannelLRN(CaffeLayer):
    def __init__(self, size: int, alpha: float, beta: float):
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x):
        wide = _at_least_float32(x)
        mean = F.avg_pool2d(wide * wide, self.size, stride=1, padding=(self.size - 1) // 2, count_include_pad=True)
        return (wide * (mean * self.alpha + 1).pow(-self.beta)).to(x.dtype)


@register("LRN")
def build_lrn(ctx: LayerContext):
    ctx.expect_bottoms(1)
    ctx.expect_rank(0, 4)
    lp = ctx.param.lrn_param
    if lp.local_size % 2 != 1:
        raise ctx.error(f"local_size must be odd, got {lp.local_size}")
    if lp.norm_region == ACROSS_CHANNELS:
        module = AcrossChannelLRN(lp.local_size, lp.alpha, lp.beta, lp.k)
    elif lp.norm_region == WITHIN_CHANNEL:
        module = WithinChannelLRN(lp.local_size, lp.alpha, lp.beta)
    else:
        raise ctx.error(f"unknown norm_region {lp.norm_region}")
    return ctx.wire(module, top_shapes=[ctx.bottom_shapes[0]])


@register_onnx("LRN")
def lrn_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    x = inputs[0]
    if isinstance(module, AcrossChannelLRN):
        # ONNX LRN sums over [c - (n-1)/2, c + (n-1)/2] for odd n, divides by n: Caffe's formula.
        g.node("LRN", [x], outputs, size=module.size, alpha=module.alpha, beta=module.beta, bias=module.k)
        return
    name = ctx.name
    pad = (module.size - 1) // 2
    (squares,) = g.node("Mul", [x, x], hint=name + "/squares")
    (mean,) = g.node("AveragePool", [squares], hint=name + "/mean", kernel_shape=[module.size] * 2,
                     strides=[1, 1], pads=[pad] * 4, count_include_pad=1)
    (scaled,) = g.node("Mul", [mean, g.floats(module.alpha, name + "/alpha")], hint=name + "/scaled")
    (shifted,) = g.node("Add", [scaled, g.floats(1.0, name + "/one")], hint=name + "/shifted")
    (factor,) = g.node("Pow", [shifted, g.floats(-module.beta, name + "/neg_beta")], hint=name + "/factor")
    g.node("Mul", [x, factor], outputs)
