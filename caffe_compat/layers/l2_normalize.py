"""The SSD fork's Normalize (src/caffe/layers/normalize_layer.cpp): each image's values
divided by their L2 norm, over all its values (across_spatial) or over the channels at
each position, then multiplied by a learned scale, one (channel_shared) or one per
channel. eps is added to the sum of squares, inside the square root.

The backward is the fork's own, not autograd's: it differentiates as if the scale were
shared, so with one scale per channel whose values differ it is not the exact
derivative (the bottom's gradient omits the other channels' scales from the norm's
term). The scale's gradient is sum(top * top_diff) / scale, as the fork computes it."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..params.ssd import normalize_blob_shape
from . import fillers
from .normalization import onnx_reduce
from .onnx_graph import FLOAT, OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source

DOUBLE = 11  # TensorProto.DataType


def _images(x: torch.Tensor) -> torch.Tensor:
    """(num, channels, positions): Caffe's legacy 4-D view of a bottom of rank 2 to 4."""
    return x.reshape(x.shape[0], x.shape[1], -1)


class _NormalizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, across_spatial: bool, eps: float):
        data = _images(x)
        if across_spatial:
            norm = (data.square().sum(dim=(1, 2), keepdim=True) + eps).sqrt()
            top = data * (1.0 / norm.double()).float()
        else:
            norm = (data.square().sum(dim=1, keepdim=True) + eps).sqrt()
            top = data / norm
        top = top * (scale.reshape(1, -1, 1) if scale.dim() else scale)
        ctx.across_spatial = across_spatial
        ctx.save_for_backward(data, scale, norm, top)
        return top.reshape(x.shape)

    @staticmethod
    def backward(ctx, top_diff):
        data, scale, norm, top = ctx.saved_tensors
        diff = _images(top_diff)
        shared = scale.dim() == 0
        grad_x = grad_scale = None
        if ctx.needs_input_grad[1]:
            if shared:
                grad_scale = (top * diff).sum() / scale
            else:
                grad_scale = ((top * diff).sum(dim=2) / scale).sum(dim=0)
        if ctx.needs_input_grad[0]:
            if ctx.across_spatial:
                dot = (data * diff).sum(dim=(1, 2), keepdim=True)
                grad = (diff - data * (dot / norm / norm)) * (1.0 / norm.double()).float()
            else:
                dot = (data * diff).sum(dim=1, keepdim=True)
                grad = (diff - data * dot / norm.square()) / norm
            grad_x = (grad * (scale if shared else scale.reshape(1, -1, 1))).reshape(top_diff.shape)
        return grad_x, grad_scale, None, None


class Normalize(CaffeLayer):
    blob_names = ("scale",)

    def __init__(self, scale: torch.Tensor, across_spatial: bool, eps: float):
        super().__init__()
        self.scale = nn.Parameter(scale)
        self.across_spatial = across_spatial
        self.eps = eps

    def forward(self, x):
        return _NormalizeFunction.apply(x, self.scale, self.across_spatial, self.eps)


@register("Normalize")
def build_normalize(ctx: LayerContext):
    blob_shape = normalize_blob_shape(ctx)
    p = ctx.param.norm_param
    filler = p.scale_filler
    if not p.HasField("scale_filler"):  # the fork's default: a constant 1
        filler = type(p.scale_filler)(type="constant", value=1.0)
    scale = fillers.fill(filler, blob_shape, ctx.name)
    return ctx.wire(Normalize(scale, p.across_spatial, float(np.float32(p.eps))),
                    top_shapes=[tuple(ctx.bottom_shapes[0])])


@register_onnx("Normalize")
def normalize_to_onnx(g: OnnxGraph, ctx, module: Normalize, inputs, outputs):
    """The forward above, op for op: the sum of squares plus eps under the root, then
    across_spatial multiplies by 1/norm taken in double, per position it divides."""
    x, name = inputs[0], ctx.name
    rank = len(ctx.bottom_shapes[0])
    axes = list(range(1, rank)) if module.across_spatial else [1]
    squares = onnx_reduce(g, "ReduceSumSquare", x, axes, 1, hint=f"{name}/sum_squares")
    (padded,) = g.node("Add", [squares, g.floats(module.eps, f"{name}/eps")], hint=f"{name}/sum_squares_eps")
    (norm,) = g.node("Sqrt", [padded], hint=f"{name}/norm")
    if module.across_spatial:
        (wide,) = g.node("Cast", [norm], hint=f"{name}/norm_double", to=DOUBLE)
        (inverse,) = g.node("Reciprocal", [wide], hint=f"{name}/inverse_double")
        (narrow,) = g.node("Cast", [inverse], hint=f"{name}/inverse", to=FLOAT)
        (unit,) = g.node("Mul", [x, narrow], hint=f"{name}/normalized")
    else:
        (unit,) = g.node("Div", [x, norm], hint=f"{name}/normalized")
    scale = module.scale.detach()
    if scale.dim():  # one per channel, broadcast over the positions
        scale = scale.reshape((-1,) + (1,) * (rank - 2))
    g.node("Mul", [unit, g.initializer(scale, f"{name}/scale")], outputs)


# ---------------------------------------------------------------- standalone source

NORMALIZE_SOURCE = """
class NormalizeFunction(torch.autograd.Function):
    \"\"\"The SSD fork's Normalize on (num, channels, positions) with the fork's own backward, which
    differentiates as if the scale were shared; the scale's gradient is sum(top * dy) / scale.\"\"\"

    @staticmethod
    def forward(ctx, data, scale, across_spatial, eps):
        if across_spatial:  # one norm per image, its inverse taken in double
            norm = (data.square().sum(dim=(1, 2), keepdim=True) + eps).sqrt()
            top = data * (1.0 / norm.double()).float()
        else:  # one norm per position, over the channels
            norm = (data.square().sum(dim=1, keepdim=True) + eps).sqrt()
            top = data / norm
        top = top * (scale.reshape(1, -1, 1) if scale.dim() else scale)
        ctx.across_spatial = across_spatial
        ctx.save_for_backward(data, scale, norm, top)
        return top

    @staticmethod
    def backward(ctx, diff):
        data, scale, norm, top = ctx.saved_tensors
        shared = scale.dim() == 0
        grad_x = grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (top * diff).sum() / scale if shared else ((top * diff).sum(dim=2) / scale).sum(dim=0)
        if ctx.needs_input_grad[0]:
            if ctx.across_spatial:
                dot = (data * diff).sum(dim=(1, 2), keepdim=True)
                grad = (diff - data * (dot / norm / norm)) * (1.0 / norm.double()).float()
            else:
                dot = (data * diff).sum(dim=1, keepdim=True)
                grad = (diff - data * dot / norm.square()) / norm
            grad_x = grad * (scale if shared else scale.reshape(1, -1, 1))
        return grad_x, grad_scale, None, None


class Normalize(nn.Module):
    \"\"\"The SSD fork's Normalize: x divided by its L2 norm (eps added to the sum of squares) over
    each image (across_spatial) or over the channels at each position, times the learned scale,
    one (channel_shared) or one per channel.\"\"\"

    def __init__(self, scale_shape, across_spatial, eps):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(scale_shape))
        self.across_spatial, self.eps = across_spatial, eps

    def forward(self, x):
        data = x.reshape(x.shape[0], x.shape[1], -1)
        return NormalizeFunction.apply(data, self.scale, self.across_spatial, self.eps).reshape(x.shape)
"""


@register_source("Normalize")
def normalize_to_source(src, ctx, module: Normalize, inputs, outputs):
    src.helper(NORMALIZE_SOURCE)
    layer = src.attribute(ctx, f"Normalize({tuple(module.scale.shape)}, {module.across_spatial!r}, {module.eps!r})",
                          {"scale": module.scale})
    src.assign(outputs, f"{layer}({inputs[0]})")
