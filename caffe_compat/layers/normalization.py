"""BatchNorm, Scale, Bias and MVN: normalisations and broadcast affine maps."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import fillers
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


def onnx_reduce(g: OnnxGraph, op: str, x: str, axes: Sequence[int], keepdims: int,
                output: Optional[str] = None, hint: str = "reduce") -> str:
    """One ONNX reduction: ReduceSum takes `axes` as an input from opset 13, the other
    reductions only from opset 18 (an attribute before)."""
    outputs = None if output is None else [output]
    if op == "ReduceSum" or g.opset >= 18:
        return g.node(op, [x, g.ints(list(axes), f"{hint}/axes")], outputs, hint=hint, keepdims=keepdims)[0]
    return g.node(op, [x], outputs, hint=hint, axes=list(axes), keepdims=keepdims)[0]


def onnx_scalar(g: OnnxGraph, value: float, hint: str) -> str:
    """A 0-d float32 constant (a Constant node: it must not broadcast a 0-d result to 1-D)."""
    return g.node("Constant", [], hint=hint, value=g.tensor(np.array(value, np.float32)))[0]


def _unsqueeze_trailing(g: OnnxGraph, x: str, rank: int, count: int, hint: str) -> str:
    """`x` (of rank `rank`) with `count` unit axes appended, batch axis untouched."""
    if count == 0:
        return x
    axes = list(range(rank, rank + count))
    return g.node("Unsqueeze", [x, g.ints(axes, f"{hint}/axes")], hint=hint)[0]


# ---------------------------------------------------------------- BatchNorm

class BatchNorm(CaffeLayer):
    """Caffe's BatchNorm: (x - mean) / sqrt(var + eps) per channel (axis 1), without
    affine terms. Caffe's three blobs are statistics, not parameters: the running sums
    of mean and variance and their common scale factor (the stored statistics are the
    sums divided by it, a factor of 0 meaning 0)."""

    blob_names = ("mean", "variance", "scale_factor")

    def __init__(self, channels: int, rank: int, eps: float, moving_average_fraction: float,
                 use_global_stats: Optional[bool]):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.moving_average_fraction = moving_average_fraction
        # None: follow the phase (TEST uses the stored statistics), as Caffe does when unset.
        self.use_global_stats = use_global_stats
        self.stat_shape = (channels,) + (1,) * (rank - 2)
        self.batch_axes = (0,) + tuple(range(2, rank))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("variance", torch.zeros(channels))
        self.register_buffer("scale_factor", torch.zeros(1))

    def uses_global_stats(self) -> bool:
        return (not self.training) if self.use_global_stats is None else self.use_global_stats

    def global_statistics(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored (mean, sqrt(var + eps)), per channel, computed as Caffe does."""
        factor = self.scale_factor
        inverse = torch.where(factor == 0, torch.zeros_like(factor), 1 / factor)
        return self.mean * inverse, torch.sqrt(self.variance * inverse + self.eps)

    def per_channel_affine(self, rank: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(a, c) with forward(x) == x * a + c per channel of axis 1 (up to rounding),
        for the inference path's folding; None when it normalises with the batch's statistics."""
        if not self.uses_global_stats():
            return None
        mean, std = self.global_statistics()
        return 1 / std, -mean / std

    def forward(self, x):
        if self.uses_global_stats():
            mean, std = self.global_statistics()
            return (x - mean.reshape(self.stat_shape)) / std.reshape(self.stat_shape)
        mean = x.mean(self.batch_axes)
        centered = x - mean.reshape(self.stat_shape)
        variance = (centered * centered).mean(self.batch_axes)  # biased, as Caffe normalises
        self._update_statistics(mean, variance, x.numel() // self.channels)
        return centered / torch.sqrt(variance + self.eps).reshape(self.stat_shape)

    def _update_statistics(self, mean, variance, per_channel) -> None:
        # Caffe's moving sums; the stored variance is unbiased (times m / (m - 1)). With one
        # value per channel Caffe's correction is 1 and the variance exactly 0, where the
        # tensor division gives 0/0: the where() keeps the 0 without a Python branch.
        fraction = self.moving_average_fraction
        with torch.no_grad():
            unbiased = variance * per_channel / (per_channel - 1)
            unbiased = torch.where(variance == 0, variance, unbiased)
            self.scale_factor.mul_(fraction).add_(1)
            self.mean.mul_(fraction).add_(mean)
            self.variance.mul_(fraction).add_(unbiased)


@register("BatchNorm")
def build_batch_norm(ctx: LayerContext):
    ctx.expect_bottoms(1)
    shape = ctx.bottom_shapes[0]
    if len(shape) < 2:
        # Caffe reads the channel count from axis 1 and fails on a 1-D bottom.
        raise ctx.error(f"needs a bottom with a channel axis (rank >= 2), got shape {shape}")
    p = ctx.param.batch_norm_param
    for i, spec in enumerate(ctx.param.param):
        if spec.lr_mult != 0:
            raise ctx.error(f"param {i} has lr_mult {spec.lr_mult}: BatchNorm's statistics cannot "
                            f"be learned (Caffe requires lr_mult 0)")
    use_global = p.use_global_stats if p.HasField("use_global_stats") else None
    return ctx.wire(BatchNorm(shape[1], len(shape), p.eps, p.moving_average_fraction, use_global))


@register_onnx("BatchNorm")
def batch_norm_to_onnx(g: OnnxGraph, ctx, module: BatchNorm, inputs, outputs):
    x = inputs[0]
    if module.uses_global_stats():
        # Sub then Div with Caffe's folded mean and sqrt(var + eps), not
        # BatchNormalization, whose runtimes fold it into a multiply-add.
        mean, std = module.global_statistics()
        mean_name = g.initializer(mean.reshape(module.stat_shape), ctx.name + "/mean")
        std_name = g.initializer(std.reshape(module.stat_shape), ctx.name + "/std")
        centered = g.node("Sub", [x, mean_name], hint=ctx.name + "/centered")[0]
        g.node("Div", [centered, std_name], outputs)
        return
    axes = list(module.batch_axes)
    mean = onnx_reduce(g, "ReduceMean", x, axes, 1, hint=ctx.name + "/mean")
    centered = g.node("Sub", [x, mean], hint=ctx.name + "/centered")[0]
    squared = g.node("Mul", [centered, centered], hint=ctx.name + "/squared")[0]
    variance = onnx_reduce(g, "ReduceMean", squared, axes, 1, hint=ctx.name + "/variance")
    eps = onnx_scalar(g, module.eps, ctx.name + "/eps")
    shifted = g.node("Add", [variance, eps], hint=ctx.name + "/shifted")[0]
    std = g.node("Sqrt", [shifted], hint=ctx.name + "/std")[0]
    g.node("Div", [centered, std], outputs)


# ---------------------------------------------------------------- Scale and Bias

def _operand_layout(ctx: LayerContext, axis: int, num_axes: int) -> Tuple[Tuple[int, ...], int]:
    """Caffe's Scale/Bias broadcasting: the operand (second bottom, else a learned blob
    covering `num_axes` axes of bottom 0 from `axis`) lines up with bottom 0 from `axis`.
    Returns the operand's shape and how many trailing unit axes broadcast it."""
    shape = ctx.bottom_shapes[0]
    rank = len(shape)
    if len(ctx.bottoms) == 2:
        operand = tuple(ctx.bottom_shapes[1])
        if not operand:  # a scalar: Caffe ignores axis
            return operand, rank
        start = ctx.canonical_axis(axis, rank)
        if shape[start:start + len(operand)] != operand:
            raise ctx.error(f"bottom '{ctx.bottoms[1]}' of shape {operand} does not match the axes "
                            f"of '{ctx.bottoms[0]}' {shape} from axis {start}")
        return operand, rank - start - len(operand)
    start = ctx.canonical_axis(axis, rank)
    if num_axes < -1:
        raise ctx.error(f"num_axes must be non-negative or -1, got {num_axes}")
    if num_axes >= 0 and rank < start + num_axes:
        raise ctx.error(f"num_axes {num_axes} from axis {start} extends past bottom shape {shape}")
    blob_shape = tuple(shape[start:] if num_axes == -1 else shape[start:start + num_axes])
    return blob_shape, rank - start - len(blob_shape)


def _broadcast(operand: torch.Tensor, trailing: int) -> torch.Tensor:
    return operand[(Ellipsis,) + (None,) * trailing]


class Scale(CaffeLayer):
    """x * scale (+ bias), the scale broadcast along the axes of x it covers: a learned
    blob (`weight`) or the second bottom."""

    def __init__(self, trailing: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
        super().__init__()
        self.trailing = trailing
        self.weight = None if weight is None else nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.blob_names = tuple(name for name, blob in (("weight", weight), ("bias", bias)) if blob is not None)

    def per_channel_affine(self, rank: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(a, c) with forward(x) == x * a + c per channel of axis 1, for the inference
        path's folding; None for a scale read from a bottom or covering other axes."""
        if self.weight is None or self.weight.dim() != 1 or self.trailing != rank - 2:
            return None
        return self.weight, torch.zeros_like(self.weight) if self.bias is None else self.bias

    def forward(self, x, scale=None):
        out = x * _broadcast(self.weight if scale is None else scale, self.trailing)
        if self.bias is not None:
            out = out + _broadcast(self.bias, self.trailing)
        return out


class Bias(CaffeLayer):
    """x + bias, the bias broadcast like Scale's operand: a learned blob or the second bottom."""

    def __init__(self, trailing: int, bias: Optional[torch.Tensor]):
        super().__init__()
        self.trailing = trailing
        self.bias = None if bias is None else nn.Parameter(bias)
        self.blob_names = () if bias is None else ("bias",)

    def per_channel_affine(self, rank: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(1, bias) per channel of axis 1, as Scale's; None for a bias read from a bottom."""
        if self.bias is None or self.bias.dim() != 1 or self.trailing != rank - 2:
            return None
        return torch.ones_like(self.bias), self.bias

    def forward(self, x, bias=None):
        return x + _broadcast(self.bias if bias is None else bias, self.trailing)


@register("Scale")
def build_scale(ctx: LayerContext):
    ctx.expect_bottoms(1, 2)
    p = ctx.param.scale_param
    blob_shape, trailing = _operand_layout(ctx, p.axis, p.num_axes)
    weight = None
    if len(ctx.bottoms) == 1:
        filler = p.filler
        if not p.HasField("filler"):  # Caffe's default: the identity
            filler = type(p.filler)(type="constant", value=1.0)
        weight = fillers.fill(filler, blob_shape, ctx.name)
    # Caffe's bias sub-layer covers the same axes as the scale.
    bias = fillers.fill(p.bias_filler, blob_shape, ctx.name) if p.bias_term else None
    return ctx.wire(Scale(trailing, weight, bias))


@register("Bias")
def build_bias(ctx: LayerContext):
    ctx.expect_bottoms(1, 2)
    p = ctx.param.bias_param
    blob_shape, trailing = _operand_layout(ctx, p.axis, p.num_axes)
    bias = fillers.fill(p.filler, blob_shape, ctx.name) if len(ctx.bottoms) == 1 else None
    return ctx.wire(Bias(trailing, bias))


def _onnx_operand(g: OnnxGraph, ctx, blob: Optional[torch.Tensor], inputs, trailing: int, hint: str) -> str:
    """The broadcastable ONNX operand: the learned blob reshaped as an initializer, or the
    second bottom with unit axes appended (its own leading axes stay symbolic)."""
    if blob is not None:
        return g.initializer(blob.detach().reshape(tuple(blob.shape) + (1,) * trailing), f"{ctx.name}/{hint}")
    return _unsqueeze_trailing(g, inputs[1], len(ctx.bottom_shapes[1]), trailing, f"{ctx.name}/{hint}")


@register_onnx("Scale")
def scale_to_onnx(g: OnnxGraph, ctx, module: Scale, inputs, outputs):
    scale = _onnx_operand(g, ctx, module.weight, inputs, module.trailing, "scale")
    if module.bias is None:
        g.node("Mul", [inputs[0], scale], outputs)
        return
    scaled = g.node("Mul", [inputs[0], scale], hint=ctx.name + "/scaled")[0]
    g.node("Add", [scaled, _onnx_operand(g, ctx, module.bias, inputs, module.trailing, "bias")], outputs)


@register_onnx("Bias")
def bias_to_onnx(g: OnnxGraph, ctx, module: Bias, inputs, outputs):
    g.node("Add", [inputs[0], _onnx_operand(g, ctx, module.bias, inputs, module.trailing, "bias")], outputs)


# ---------------------------------------------------------------- MVN

class MVN(CaffeLayer):
    """Mean (and variance) normalisation per sample and channel, or per sample across
    channels. Caffe works on the legacy 4-D view (num, channels, height, width), so a
    bottom of rank < 4 comes out with trailing unit axes, and divides by std + eps."""

    def __init__(self, rank: int, across_channels: bool, normalize_variance: bool, eps: float):
        super().__init__()
        self.missing_axes = 4 - rank
        self.axes = (1, 2, 3) if across_channels else (2, 3)
        self.normalize_variance = normalize_variance
        self.eps = eps

    def forward(self, x):
        x = x[(Ellipsis,) + (None,) * self.missing_axes]
        centered = x - x.mean(self.axes, keepdim=True)
        if not self.normalize_variance:
            return centered
        variance = (centered * centered).mean(self.axes, keepdim=True)
        shifted_std = torch.sqrt(variance) + self.eps
        # Caffe's backward divides by std + eps but differentiates the std as if it were
        # std + eps (d/dx_j = (x_j - mean) / (m (std + eps))). `carrier` has exactly that
        # gradient and the value 0, so the forward value stays Caffe's.
        carrier = variance * (0.5 / shifted_std).detach()
        return centered / (shifted_std.detach() + (carrier - carrier.detach()))


@register("MVN")
def build_mvn(ctx: LayerContext):
    ctx.expect_bottoms(1)
    shape = ctx.bottom_shapes[0]
    if not 1 <= len(shape) <= 4:
        raise ctx.error(f"works on at most 4 axes (Caffe's num/channels/height/width), got shape {shape}")
    p = ctx.param.mvn_param
    return ctx.wire(MVN(len(shape), p.across_channels, p.normalize_variance, p.eps))


@register_onnx("MVN")
def mvn_to_onnx(g: OnnxGraph, ctx, module: MVN, inputs, outputs):
    rank = 4 - module.missing_axes
    x = _unsqueeze_trailing(g, inputs[0], rank, module.missing_axes, ctx.name + "/4d")
    mean = onnx_reduce(g, "ReduceMean", x, module.axes, 1, hint=ctx.name + "/mean")
    if not module.normalize_variance:
        g.node("Sub", [x, mean], outputs)
        return
    centered = g.node("Sub", [x, mean], hint=ctx.name + "/centered")[0]
    squared = g.node("Mul", [centered, centered], hint=ctx.name + "/squared")[0]
    variance = onnx_reduce(g, "ReduceMean", squared, module.axes, 1, hint=ctx.name + "/variance")
    std = g.node("Sqrt", [variance], hint=ctx.name + "/std")[0]
    eps = onnx_scalar(g, module.eps, ctx.name + "/eps")
    shifted = g.node("Add", [std, eps], hint=ctx.name + "/shifted_std")[0]
    g.node("Div", [centered, shifted], outputs)


# ---------------------------------------------------------------- standalone source

BATCH_NORM_SOURCE = '''
class CaffeBatchNorm(nn.Module):
    """Caffe's BatchNorm: (x - mean) / sqrt(var + eps) per channel (axis 1), no affine terms. Its
    statistics are running sums with a common scale factor (divided by it; a factor of 0 means 0).
    use_global_stats None: the stored statistics in eval mode, the batch's (the sums updated) in
    training, as Caffe's TEST and TRAIN phases."""

    def __init__(self, channels, rank, eps, moving_average_fraction, use_global_stats=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("variance", torch.zeros(channels))
        self.register_buffer("scale_factor", torch.zeros(1))
        self.eps, self.fraction, self.use_global_stats = eps, moving_average_fraction, use_global_stats
        self.stat_shape = (channels,) + (1,) * (rank - 2)
        self.batch_axes = (0,) + tuple(range(2, rank))

    def forward(self, x):
        if (not self.training) if self.use_global_stats is None else self.use_global_stats:
            factor = self.scale_factor
            inverse = torch.where(factor == 0, torch.zeros_like(factor), 1 / factor)
            mean, std = self.mean * inverse, torch.sqrt(self.variance * inverse + self.eps)
            return (x - mean.reshape(self.stat_shape)) / std.reshape(self.stat_shape)
        mean = x.mean(self.batch_axes)
        centered = x - mean.reshape(self.stat_shape)
        variance = (centered * centered).mean(self.batch_axes)  # biased, as Caffe normalises
        with torch.no_grad():  # Caffe's moving sums; the stored variance is unbiased
            count = x.numel() // x.shape[1]
            unbiased = torch.where(variance == 0, variance, variance * count / (count - 1))
            self.scale_factor.mul_(self.fraction).add_(1)
            self.mean.mul_(self.fraction).add_(mean)
            self.variance.mul_(self.fraction).add_(unbiased)
        return centered / torch.sqrt(variance + self.eps).reshape(self.stat_shape)
'''

SCALE_SOURCE = '''
class Scale(nn.Module):
    """Caffe's Scale: x * weight (+ bias); the weight (or the second bottom) covers some axes of x
    and is broadcast over the `trailing` axes after them."""

    def __init__(self, shape, trailing, learned_scale=True, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape)) if learned_scale else None
        self.bias = nn.Parameter(torch.empty(shape)) if bias else None
        self.expand = (...,) + (None,) * trailing

    def forward(self, x, scale=None):
        out = x * (self.weight if scale is None else scale)[self.expand]
        return out if self.bias is None else out + self.bias[self.expand]
'''

BIAS_SOURCE = '''
class Bias(nn.Module):
    """Caffe's Bias: x + bias, the bias covering some axes of x, broadcast over the `trailing` after them."""

    def __init__(self, shape, trailing):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(shape))
        self.expand = (...,) + (None,) * trailing

    def forward(self, x):
        return x + self.bias[self.expand]
'''

MVN_SOURCE = '''
def caffe_mvn(x, axes, missing_axes, normalize_variance, eps):
    """Caffe's MVN on its 4-D view of x (missing_axes unit axes appended): x - mean over `axes`,
    divided by std + eps, whose backward differentiates the std as if it were std + eps."""
    x = x[(...,) + (None,) * missing_axes]
    centered = x - x.mean(axes, keepdim=True)
    if not normalize_variance:
        return centered
    variance = (centered * centered).mean(axes, keepdim=True)
    shifted_std = torch.sqrt(variance) + eps
    carrier = variance * (0.5 / shifted_std).detach()  # value 0, Caffe's gradient
    return centered / (shifted_std.detach() + (carrier - carrier.detach()))
'''


def _expanded(operand: str, trailing: int) -> str:
    """Source of `_broadcast`: the operand with `trailing` unit axes appended."""
    return f"{operand}[...{', None' * trailing}]" if trailing else operand


@register_source("BatchNorm")
def batch_norm_to_source(src, ctx, module: BatchNorm, inputs, outputs):
    src.helper(BATCH_NORM_SOURCE)
    settings = (f"{module.channels}, {len(module.stat_shape) + 1}, {module.eps!r}, "
                f"{module.moving_average_fraction!r}, {module.use_global_stats!r}")
    layer = src.attribute(ctx, f"CaffeBatchNorm({settings})",
                          {name: getattr(module, name) for name in module.blob_names})
    src.assign(outputs, f"{layer}({inputs[0]})")


@register_source("Scale")
def scale_to_source(src, ctx, module: Scale, inputs, outputs):
    operand = module.weight if module.weight is not None else module.bias
    if operand is None:  # the second bottom times x, nothing learned
        src.assign(outputs, f"{inputs[0]} * {_expanded(inputs[1], module.trailing)}")
        return
    src.helper(SCALE_SOURCE)
    layer = src.attribute(ctx, f"Scale({tuple(operand.shape)}, {module.trailing}, "
                               f"learned_scale={module.weight is not None}, bias={module.bias is not None})",
                          {name: getattr(module, name) for name in module.blob_names})
    src.assign(outputs, f"{layer}({', '.join(inputs)})")


@register_source("Bias")
def bias_to_source(src, ctx, module: Bias, inputs, outputs):
    if module.bias is None:  # the second bottom
        src.assign(outputs, f"{inputs[0]} + {_expanded(inputs[1], module.trailing)}")
        return
    src.helper(BIAS_SOURCE)
    layer = src.attribute(ctx, f"Bias({tuple(module.bias.shape)}, {module.trailing})", {"bias": module.bias})
    src.assign(outputs, f"{layer}({inputs[0]})")


@register_source("MVN")
def mvn_to_source(src, ctx, module: MVN, inputs, outputs):
    src.helper(MVN_SOURCE)
    src.assign(outputs, f"caffe_mvn({inputs[0]}, {module.axes}, {module.missing_axes}, "
                        f"{module.normalize_variance!r}, {module.eps!r})")
