"""The forks' BN layers: one type name, two layers, told apart by the dialect the net
is read in (params/forks.py, bn_settings).

The 4-blob BN (hszhao/PSPNet bn_layer.cpp; yjxiong/caffe's TSN fork computes the same
with flat (1, C) blobs): blobs slope, bias, mean, variance, each (1, C, 1, 1);
y = slope * (x - mean) * (var + eps)^-1/2 + bias. The batch's statistics (the variance
biased, over N, H and W) in a TRAIN net unless frozen, which also fold into the stored
ones as momentum * stored + (1 - momentum) * batch; else the stored ones. Not frozen, its
backward is the batch-statistics formula around whichever statistics the forward used
(so a TEST net's gradient is not autograd's); frozen, only the bottom's diff,
slope / std times the top's.

SegNet's 2-blob BN (alexgkendall/caffe-segnet bn_layer.cpp): blobs scale and shift,
each (1, C, 1, 1). bn_mode LEARN (the default) normalises with the batch's statistics
in every phase (variance E[x^2] - E[x]^2, eps 1e-9), writing them to the optional
second and third tops; INFERENCE is scale * x + shift (SegNet folds its statistics into
the two blobs)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..params.forks import BNSettings, bn_blob_shapes, bn_settings, fork_param
from . import fillers
from .normalization import onnx_reduce, onnx_scalar
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source

AXES = (0, 2, 3)  # the fork's statistics: over the batch and the spatial axes


def _per_channel(values):
    return values.reshape(1, -1, 1, 1)


class _BatchFormula(torch.autograd.Function):
    """(x - mean) * inv_std * slope + bias with the 4-blob BN's Backward_cpu (not
    frozen): slope's diff sum(dy * x_norm), bias's sum(dy), the bottom's
    inv_std * (dy * slope - (sum(dy * slope) + x_norm * sum(dy * slope * x_norm)) / (N H W))."""

    @staticmethod
    def forward(ctx, x, slope, bias, mean, inv_std):
        x_norm = (x - mean) * inv_std
        ctx.save_for_backward(x_norm, slope, inv_std)
        return x_norm * slope + bias

    @staticmethod
    def backward(ctx, grad):
        x_norm, slope, inv_std = ctx.saved_tensors
        count = grad.numel() // grad.shape[1]
        scaled = grad * slope
        spread = scaled.sum(AXES, keepdim=True) + x_norm * (scaled * x_norm).sum(AXES, keepdim=True)
        grad_x = (scaled - spread / count) * inv_std
        return grad_x, (grad * x_norm).sum(AXES, keepdim=True), grad.sum(AXES, keepdim=True), None, None


class BN(CaffeLayer):
    """The 4-blob BN. Frozen, slope and bias are buffers: the fork sets their lr_mult
    and decay_mult to 0 and computes no diff for them."""

    blob_names = ("slope", "bias", "mean", "variance")

    def __init__(self, s: BNSettings, slope, bias):
        super().__init__()
        self.settings = s
        if s.frozen:
            self.register_buffer("slope", slope)
            self.register_buffer("bias", bias)
        else:
            self.slope, self.bias = nn.Parameter(slope), nn.Parameter(bias)
        self.register_buffer("mean", torch.zeros_like(slope))
        self.register_buffer("variance", torch.full_like(slope, 1.0 if s.frozen else 0.0))

    def uses_stored_statistics(self) -> bool:
        return self.settings.frozen or not self.training

    def inverse_std(self, variance):
        return (variance + self.settings.eps).pow(-0.5)

    def per_channel_affine(self, rank: int):
        """(a, c) with forward(x) == x * a + c per channel, for the inference path's
        folding; None when it normalises with the batch's statistics."""
        if rank != 4 or not self.uses_stored_statistics():
            return None
        slope, bias, mean, variance = (b.reshape(-1) for b in self.caffe_blobs())
        a = self.inverse_std(variance) * slope
        return a, bias - mean * a

    def forward(self, x):
        s = self.settings
        slope, bias, stored_mean, stored_variance = (_per_channel(b) for b in self.caffe_blobs())
        if s.frozen:
            return (x - stored_mean) * self.inverse_std(stored_variance) * slope + bias
        if self.training:
            with torch.no_grad():
                mean = x.mean((2, 3), keepdim=True).mean(0, keepdim=True)
                variance = ((x - mean) ** 2).mean((2, 3), keepdim=True).mean(0, keepdim=True)
                stored_mean.mul_(s.momentum).add_((1 - s.momentum) * mean)
                stored_variance.mul_(s.momentum).add_((1 - s.momentum) * variance)
        else:
            mean, variance = stored_mean, stored_variance
        return _BatchFormula.apply(x, slope, bias, mean, self.inverse_std(variance))


class SegNetBN(CaffeLayer):
    blob_names = ("scale", "shift")

    def __init__(self, s: BNSettings, scale, shift, extra_tops: int):
        super().__init__()
        self.settings = s
        self.extra_tops = extra_tops
        self.scale, self.shift = nn.Parameter(scale), nn.Parameter(shift)

    def per_channel_affine(self, rank: int):
        """(scale, shift) in bn_mode INFERENCE, for the inference path's folding; None otherwise."""
        if rank != 4 or not self.settings.inference or self.extra_tops:
            return None
        return self.scale.reshape(-1), self.shift.reshape(-1)

    def forward(self, x):
        if self.settings.inference:
            return x * self.scale + self.shift
        mean = x.mean((2, 3), keepdim=True).mean(0, keepdim=True)
        squares = (x * x).mean((2, 3), keepdim=True).mean(0, keepdim=True)
        variance = squares - mean * mean
        top = (x - mean) / (variance + self.settings.eps).pow(0.5) * self.scale + self.shift
        if not self.extra_tops:
            return top
        return (top, mean.detach(), variance.detach())[:1 + self.extra_tops]


@register("BN")
def build_bn(ctx: LayerContext):
    s = bn_settings(ctx)
    shape = bn_blob_shapes(ctx, s)[0]
    p = fork_param(ctx, "bn_param")

    def filled(field):  # an absent filler is Caffe's default, the constant 0
        return fillers.fill(getattr(p, field), shape, ctx.name) if p is not None else torch.zeros(shape)

    if s.segnet:
        extra = len(ctx.tops) - 1
        module = SegNetBN(s, filled("scale_filler"), filled("shift_filler"), extra)
        return ctx.wire(module, top_shapes=[ctx.bottom_shapes[0]] + [shape] * extra)
    module = BN(s, filled("slope_filler"), filled("bias_filler"))
    return ctx.wire(module, top_shapes=[ctx.bottom_shapes[0]])


@register_onnx("BN")
def bn_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    name, x = ctx.name, inputs[0]

    def constant(values, hint):
        return g.initializer(values.detach().reshape(1, -1, 1, 1), f"{name}/{hint}")

    def chain(steps, output):
        current = x
        for i, (op, operand) in enumerate(steps):
            last = i == len(steps) - 1
            current = g.node(op, [current, operand], [output] if last else None, hint=f"{name}/{op.lower()}")[0]

    if isinstance(module, BN):
        if not module.uses_stored_statistics():
            raise ctx.error("a BN that is not frozen normalises with the batch's statistics in a TRAIN net, "
                            "which has no ONNX export; export the TEST net")
        chain([("Sub", constant(module.mean, "mean")),
               ("Mul", constant(module.inverse_std(module.variance), "inv_std")),
               ("Mul", constant(module.slope, "slope")), ("Add", constant(module.bias, "bias"))], outputs[0])
        return
    if module.settings.inference:
        chain([("Mul", constant(module.scale, "scale")), ("Add", constant(module.shift, "shift"))], outputs[0])
        return
    mean = onnx_reduce(g, "ReduceMean", onnx_reduce(g, "ReduceMean", x, [2, 3], 1, hint=f"{name}/spatial_mean"),
                       [0], 1, None if len(outputs) < 2 else outputs[1], hint=f"{name}/mean")
    (square,) = g.node("Mul", [x, x], hint=f"{name}/square")
    squares = onnx_reduce(g, "ReduceMean", onnx_reduce(g, "ReduceMean", square, [2, 3], 1,
                                                       hint=f"{name}/spatial_squares"), [0], 1, hint=f"{name}/squares")
    (mean_square,) = g.node("Mul", [mean, mean], hint=f"{name}/mean_square")
    (variance,) = g.node("Sub", [squares, mean_square], None if len(outputs) < 3 else [outputs[2]],
                         hint=f"{name}/variance")
    (shifted,) = g.node("Add", [variance, onnx_scalar(g, module.settings.eps, f"{name}/eps")], hint=f"{name}/shifted")
    (std,) = g.node("Sqrt", [shifted], hint=f"{name}/std")
    (centered,) = g.node("Sub", [x, mean], hint=f"{name}/centered")
    (normed,) = g.node("Div", [centered, std], hint=f"{name}/normed")
    (scaled,) = g.node("Mul", [normed, constant(module.scale, "scale")], hint=f"{name}/scaled")
    g.node("Add", [scaled, constant(module.shift, "shift")], [outputs[0]])


# ---------------------------------------------------------------- standalone source

# the function above, verbatim, with the constant it reads: one copy of the arithmetic
BN_FORMULA_SOURCE = f"\nAXES = {AXES!r}\n\n\n" + inspect.getsource(_BatchFormula).replace(
    "class _BatchFormula(", "class BNBatchFormula(", 1)

BN_SOURCE = """
class BN(nn.Module):
    \"\"\"PSPNet's BN: slope * (x - mean) * (var + eps)^-1/2 + bias per channel. Frozen: the stored
    statistics, slope and bias fixed. Else the batch's statistics in training (folded into the
    stored ones with `momentum`), the stored ones in eval mode, with the fork's backward.\"\"\"

    def __init__(self, blob_shape, eps, momentum, frozen):
        super().__init__()
        if frozen:
            self.register_buffer("slope", torch.zeros(blob_shape))
            self.register_buffer("bias", torch.zeros(blob_shape))
        else:
            self.slope, self.bias = nn.Parameter(torch.zeros(blob_shape)), nn.Parameter(torch.zeros(blob_shape))
        self.register_buffer("mean", torch.zeros(blob_shape))
        self.register_buffer("variance", torch.zeros(blob_shape))
        self.eps, self.momentum, self.frozen = eps, momentum, frozen

    def forward(self, x):
        slope, bias, stored_mean, stored_variance = (b.reshape(1, -1, 1, 1) for b in
                                                     (self.slope, self.bias, self.mean, self.variance))
        if self.frozen:
            return (x - stored_mean) * (stored_variance + self.eps).pow(-0.5) * slope + bias
        if self.training:
            with torch.no_grad():
                mean = x.mean((2, 3), keepdim=True).mean(0, keepdim=True)
                variance = ((x - mean) ** 2).mean((2, 3), keepdim=True).mean(0, keepdim=True)
                stored_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
                stored_variance.mul_(self.momentum).add_((1 - self.momentum) * variance)
        else:
            mean, variance = stored_mean, stored_variance
        return BNBatchFormula.apply(x, slope, bias, mean, (variance + self.eps).pow(-0.5))
"""

SEGNET_BN_SOURCE = """
class SegNetBN(nn.Module):
    \"\"\"SegNet's BN: scale * x + shift (bn_mode INFERENCE), else x normalised by the batch's
    statistics (variance E[x^2] - E[x]^2) in every phase, then scaled and shifted; `extra_tops`
    of the batch's mean and variance follow the top.\"\"\"

    def __init__(self, blob_shape, eps, inference, extra_tops):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.zeros(blob_shape)), nn.Parameter(torch.zeros(blob_shape))
        self.eps, self.inference, self.extra_tops = eps, inference, extra_tops

    def forward(self, x):
        if self.inference:
            return x * self.scale + self.shift
        mean = x.mean((2, 3), keepdim=True).mean(0, keepdim=True)
        squares = (x * x).mean((2, 3), keepdim=True).mean(0, keepdim=True)
        variance = squares - mean * mean
        top = (x - mean) / (variance + self.eps).pow(0.5) * self.scale + self.shift
        if not self.extra_tops:
            return top
        return (top, mean.detach(), variance.detach())[:1 + self.extra_tops]
"""


@register_source("BN")
def bn_to_source(src, ctx, module, inputs, outputs):
    s = module.settings
    blobs = {name: getattr(module, name) for name in module.blob_names}
    shape = tuple(next(iter(blobs.values())).shape)
    if isinstance(module, BN):
        src.helper(BN_FORMULA_SOURCE)
        src.helper(BN_SOURCE)
        layer = src.attribute(ctx, f"BN({shape}, {s.eps!r}, {s.momentum!r}, frozen={s.frozen!r})", blobs)
    else:
        src.helper(SEGNET_BN_SOURCE)
        layer = src.attribute(ctx, f"SegNetBN({shape}, {s.eps!r}, inference={s.inference!r}, "
                                   f"extra_tops={module.extra_tops})", blobs)
    src.assign(outputs, f"{layer}({inputs[0]})")
