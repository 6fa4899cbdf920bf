"""Caffe's neuron layers: one bottom, a top of its shape."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fillers
from .onnx_graph import FLOAT, OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, register, register_onnx, register_source

Step = Tuple[str, List[str], dict]


def _neuron(ctx: LayerContext, module: nn.Module) -> Converted:
    """Wire a one-bottom, one-top layer whose top has the bottom's shape."""
    ctx.expect_bottoms(1)
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    return ctx.wire(module, top_shapes=[ctx.bottom_shapes[0]])


def _float32(value: float) -> float:
    """`value` rounded to float32, as Caffe holds its layer constants in Dtype."""
    return float(np.float32(value))


def _scalar(g: OnnxGraph, value: float, hint: str) -> str:
    # 0-d, so that broadcasting never changes the rank of a blob
    return g.initializer(np.array(value, dtype=np.float32), hint)


def _emit_chain(g: OnnxGraph, x: str, steps: Sequence[Step], output: str) -> None:
    """Apply `steps` (op type, extra inputs, attributes) to `x` in order, the last one
    writing `output`; no steps is the identity."""
    if not steps:
        g.node("Identity", [x], [output])
        return
    current = x
    for index, (op_type, extra, attributes) in enumerate(steps):
        outputs = [output] if index == len(steps) - 1 else None
        current = g.node(op_type, [current, *extra], outputs, **attributes)[0]


def _affine_steps(g: OnnxGraph, scale: float, shift: float, hint: str) -> List[Step]:
    """Steps computing scale * x + shift, skipping the trivial ones as Caffe does."""
    steps: List[Step] = []
    if scale != 1:
        steps.append(("Mul", [_scalar(g, scale, hint + "/scale")], {}))
    if shift != 0:
        steps.append(("Add", [_scalar(g, shift, hint + "/shift")], {}))
    return steps


# ---------------------------------------------------------------- ReLU, PReLU, ELU

class ReLU(CaffeLayer):
    """max(x, 0) + negative_slope * min(x, 0); the gradient at 0 is negative_slope."""

    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        if self.negative_slope == 0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)


@register("ReLU")
def build_relu(ctx: LayerContext) -> Converted:
    return _neuron(ctx, ReLU(ctx.param.relu_param.negative_slope))


@register_onnx("ReLU")
def relu_to_onnx(g: OnnxGraph, ctx, module: ReLU, inputs, outputs):
    if module.negative_slope == 0:
        g.node("Relu", inputs, outputs)
    else:
        g.node("LeakyRelu", inputs, outputs, alpha=module.negative_slope)


class PReLU(CaffeLayer):
    """ReLU with a learned negative slope per channel (axis 1), or one shared slope."""

    blob_names = ("slope",)

    def __init__(self, slope: torch.Tensor, rank: int):
        super().__init__()
        self.slope = nn.Parameter(slope)
        # Caffe's blob is (channels,) or 0-d when shared; this shape broadcasts it over axis 1.
        self.slope_shape = tuple(slope.shape) + (1,) * (rank - 2) if slope.dim() else ()

    def forward(self, x):
        slope = self.slope.reshape(self.slope_shape)
        return torch.where(x > 0, x, x * slope)


@register("PReLU")
def build_prelu(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(1)
    rank = len(ctx.bottom_shapes[0])
    if rank < 2:
        raise ctx.error(f"needs a bottom of rank >= 2, got shape {ctx.bottom_shapes[0]}")
    param = ctx.param.prelu_param
    shape = () if param.channel_shared else (ctx.bottom_shapes[0][1],)
    if param.HasField("filler"):
        slope = fillers.fill(param.filler, shape, ctx.name)
    else:
        slope = torch.full(shape, 0.25)
    return _neuron(ctx, PReLU(slope, rank))


@register_onnx("PReLU")
def prelu_to_onnx(g: OnnxGraph, ctx, module: PReLU, inputs, outputs):
    slope = module.slope.detach().reshape(module.slope_shape or (1,))
    g.node("PRelu", [inputs[0], g.initializer(slope, ctx.name + "/slope")], outputs)


class ELU(CaffeLayer):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return F.elu(x, self.alpha)


@register("ELU")
def build_elu(ctx: LayerContext) -> Converted:
    return _neuron(ctx, ELU(ctx.param.elu_param.alpha))


@register_onnx("ELU")
def elu_to_onnx(g: OnnxGraph, ctx, module: ELU, inputs, outputs):
    g.node("Elu", inputs, outputs, alpha=module.alpha)


# ---------------------------------------------------------------- fixed functions

class Sigmoid(CaffeLayer):
    def forward(self, x):
        return torch.sigmoid(x)


class TanH(CaffeLayer):
    def forward(self, x):
        return torch.tanh(x)


class AbsVal(CaffeLayer):
    """|x|, with gradient sign(x) (0 at 0)."""

    def forward(self, x):
        return torch.abs(x)


class BNLL(CaffeLayer):
    """log(1 + exp(x)), computed without overflow as Caffe does."""

    def forward(self, x):
        return F.softplus(x)


_FIXED = {"Sigmoid": (Sigmoid, "Sigmoid"), "TanH": (TanH, "Tanh"), "AbsVal": (AbsVal, "Abs"),
          "BNLL": (BNLL, "Softplus")}


@register(*_FIXED)
def build_fixed(ctx: LayerContext) -> Converted:
    return _neuron(ctx, _FIXED[ctx.type][0]())


@register_onnx(*_FIXED)
def fixed_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    g.node(_FIXED[ctx.type][1], inputs, outputs)


# ---------------------------------------------------------------- Power, Exp, Log

def constant_like(x: torch.Tensor, value: float) -> torch.Tensor:
    """A tensor of x's shape filled with `value` that still depends on x, with a zero
    gradient (Caffe's, for a top that does not depend on its bottom), so that a backward
    pass through it runs. Non-finite entries of x do not leak into the value."""
    return torch.nan_to_num(x * 0.0, nan=0.0, posinf=0.0, neginf=0.0) + value


class Power(CaffeLayer):
    """(shift + scale * x) ^ power. When power or scale is 0 the top is a constant, and
    its gradient is zero, as in Caffe."""

    def __init__(self, power: float, scale: float, shift: float):
        super().__init__()
        self.power = power
        self.scale = scale
        self.shift = shift
        self.identity = (power, scale, shift) == (1, 1, 0)
        self.constant = None
        if power * scale == 0:
            # numpy's power, as Caffe's, gives NaN where math.pow raises
            with np.errstate(invalid="ignore"):
                self.constant = 1.0 if power == 0 else float(np.power(np.float32(shift), np.float32(power)))

    def forward(self, x):
        if self.constant is not None:
            return constant_like(x, self.constant)
        if self.identity:
            return x.view_as(x)  # a distinct tensor, so that top and bottom keep their own gradients
        base = x
        if self.scale != 1:
            base = base * self.scale
        if self.shift != 0:
            base = base + self.shift
        return base if self.power == 1 else torch.pow(base, self.power)


@register("Power")
def build_power(ctx: LayerContext) -> Converted:
    param = ctx.param.power_param
    return _neuron(ctx, Power(param.power, param.scale, param.shift))


@register_onnx("Power")
def power_to_onnx(g: OnnxGraph, ctx, module: Power, inputs, outputs):
    if module.constant is not None:
        shape = g.node("Shape", inputs, hint=ctx.name + "/shape")[0]
        value = np.array([module.constant], dtype=np.float32)
        g.node("ConstantOfShape", [shape], outputs, value=g.tensor(value))
        return
    steps = _affine_steps(g, module.scale, module.shift, ctx.name)
    if module.power != 1:
        steps.append(("Pow", [_scalar(g, module.power, ctx.name + "/power")], {}))
    _emit_chain(g, inputs[0], steps, outputs[0])


def _log_base(ctx: LayerContext, base: float) -> float:
    """ln(base), with Caffe's -1 meaning e."""
    if base == -1:
        return 1.0
    if base <= 0:
        raise ctx.error(f"base must be strictly positive (or -1 for e), got {base}")
    return _float32(math.log(base))


class Exp(CaffeLayer):
    """base ^ (shift + scale * x), computed as Caffe does: outer_scale * exp(inner_scale * x)
    with inner_scale = ln(base) * scale and outer_scale = base ^ shift."""

    def __init__(self, inner_scale: float, outer_scale: float):
        super().__init__()
        self.inner_scale = inner_scale
        self.outer_scale = outer_scale

    def forward(self, x):
        if self.inner_scale != 1:
            x = x * self.inner_scale
        y = torch.exp(x)
        return y if self.outer_scale == 1 else y * self.outer_scale


@register("Exp")
def build_exp(ctx: LayerContext) -> Converted:
    param = ctx.param.exp_param
    inner_scale = _float32(_log_base(ctx, param.base) * param.scale)
    if param.shift == 0:
        outer_scale = 1.0
    elif param.base == -1:
        outer_scale = _float32(math.exp(param.shift))
    else:
        outer_scale = _float32(math.pow(param.base, param.shift))
    return _neuron(ctx, Exp(inner_scale, outer_scale))


@register_onnx("Exp")
def exp_to_onnx(g: OnnxGraph, ctx, module: Exp, inputs, outputs):
    steps: List[Step] = []
    if module.inner_scale != 1:
        steps.append(("Mul", [_scalar(g, module.inner_scale, ctx.name + "/inner_scale")], {}))
    steps.append(("Exp", [], {}))
    if module.outer_scale != 1:
        steps.append(("Mul", [_scalar(g, module.outer_scale, ctx.name + "/outer_scale")], {}))
    _emit_chain(g, inputs[0], steps, outputs[0])


class Log(CaffeLayer):
    """log_base(shift + scale * x) = ln(shift + scale * x) / ln(base)."""

    def __init__(self, scale: float, shift: float, base_scale: float):
        super().__init__()
        self.scale = scale
        self.shift = shift
        self.base_scale = base_scale

    def forward(self, x):
        if self.scale != 1:
            x = x * self.scale
        if self.shift != 0:
            x = x + self.shift
        y = torch.log(x)
        return y if self.base_scale == 1 else y * self.base_scale


@register("Log")
def build_log(ctx: LayerContext) -> Converted:
    param = ctx.param.log_param
    log_base = _log_base(ctx, param.base)
    if log_base == 0:
        raise ctx.error("base 1 has no logarithm")
    return _neuron(ctx, Log(param.scale, param.shift, _float32(1.0 / log_base)))


@register_onnx("Log")
def log_to_onnx(g: OnnxGraph, ctx, module: Log, inputs, outputs):
    steps = _affine_steps(g, module.scale, module.shift, ctx.name)
    steps.append(("Log", [], {}))
    if module.base_scale != 1:
        steps.append(("Mul", [_scalar(g, module.base_scale, ctx.name + "/base_scale")], {}))
    _emit_chain(g, inputs[0], steps, outputs[0])


# ---------------------------------------------------------------- Threshold, Dropout

class Threshold(CaffeLayer):
    """1 where x > threshold, else 0. Caffe has no gradient for it: none flows."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        return (x > self.threshold).to(x.dtype)


@register("Threshold")
def build_threshold(ctx: LayerContext) -> Converted:
    return _neuron(ctx, Threshold(ctx.param.threshold_param.threshold))


@register_onnx("Threshold")
def threshold_to_onnx(g: OnnxGraph, ctx, module: Threshold, inputs, outputs):
    above = g.node("Greater", [inputs[0], _scalar(g, module.threshold, ctx.name + "/threshold")])[0]
    g.node("Cast", [above], outputs, to=FLOAT)


class Dropout(CaffeLayer):
    """TRAIN: zero each element with probability `ratio` and scale the rest by
    1 / (1 - ratio). TEST: the identity."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        if self.training and self.ratio > 0:
            return F.dropout(x, self.ratio, True)
        # a distinct tensor (F.dropout would return x itself), so that top and bottom
        # keep their own gradients
        return x.view_as(x)


@register("Dropout")
def build_dropout(ctx: LayerContext) -> Converted:
    ratio = ctx.param.dropout_param.dropout_ratio
    if not 0 <= ratio < 1:
        raise ctx.error(f"dropout_ratio must be in [0, 1), got {ratio}")
    return _neuron(ctx, Dropout(ratio))


@register_onnx("Dropout")
def dropout_to_onnx(g: OnnxGraph, ctx, module: Dropout, inputs, outputs):
    g.node("Identity", inputs, outputs)


# ---------------------------------------------------------------- standalone source

_FIXED_SOURCE = {"Sigmoid": "torch.sigmoid", "TanH": "torch.tanh", "AbsVal": "torch.abs", "BNLL": "F.softplus"}
PRELU_SOURCE = '''
class PReLU(nn.Module):
    """Caffe's PReLU: x where x > 0, else x times the slope of its channel (axis 1), or one slope."""

    def __init__(self, slope_shape):
        super().__init__()
        self.slope = nn.Parameter(torch.empty(slope_shape[:1]))
        self.slope_shape = slope_shape

    def forward(self, x):
        return torch.where(x > 0, x, x * self.slope.reshape(self.slope_shape))
'''


def _scaled(x: str, scale: float, shift: float = 0.0) -> str:
    """Caffe's scale-then-shift as the modules compute it, factors of 1 and shifts of 0 left out."""
    if scale != 1:
        x = f"{x} * {scale!r}"
    if shift != 0:
        x = f"{x} + {shift!r}"
    return x


@register_source("ReLU")
def relu_to_source(src, ctx, module: ReLU, inputs, outputs):
    slope = module.negative_slope
    src.assign(outputs, f"F.relu({inputs[0]})" if slope == 0 else f"F.leaky_relu({inputs[0]}, {slope!r})")


@register_source("PReLU")
def prelu_to_source(src, ctx, module: PReLU, inputs, outputs):
    src.helper(PRELU_SOURCE)
    layer = src.attribute(ctx, f"PReLU({module.slope_shape})", {"slope": module.slope})
    src.assign(outputs, f"{layer}({inputs[0]})")


@register_source("ELU")
def elu_to_source(src, ctx, module: ELU, inputs, outputs):
    src.assign(outputs, f"F.elu({inputs[0]}, {module.alpha!r})")


@register_source(*_FIXED_SOURCE)
def fixed_to_source(src, ctx, module, inputs, outputs):
    src.assign(outputs, f"{_FIXED_SOURCE[ctx.type]}({inputs[0]})")


@register_source("Power")
def power_to_source(src, ctx, module: Power, inputs, outputs):
    x = inputs[0]
    if module.constant is not None:  # a constant top whose gradient is zero, as in Caffe
        src.assign(outputs, f"torch.nan_to_num({x} * 0.0, nan=0.0, posinf=0.0, neginf=0.0) + {module.constant!r}")
    elif module.identity:
        src.assign(outputs, f"{x}.view_as({x})")
    else:
        base = _scaled(x, module.scale, module.shift)
        src.assign(outputs, base if module.power == 1 else f"torch.pow({base}, {module.power!r})")


@register_source("Exp")
def exp_to_source(src, ctx, module: Exp, inputs, outputs):
    y = f"torch.exp({_scaled(inputs[0], module.inner_scale)})"
    src.assign(outputs, y if module.outer_scale == 1 else f"{y} * {module.outer_scale!r}")


@register_source("Log")
def log_to_source(src, ctx, module: Log, inputs, outputs):
    y = f"torch.log({_scaled(inputs[0], module.scale, module.shift)})"
    src.assign(outputs, y if module.base_scale == 1 else f"{y} * {module.base_scale!r}")


@register_source("Threshold")
def threshold_to_source(src, ctx, module: Threshold, inputs, outputs):
    src.assign(outputs, f"({inputs[0]} > {module.threshold!r}).to({inputs[0]}.dtype)")


@register_source("Dropout")
def dropout_to_source(src, ctx, module: Dropout, inputs, outputs):
    # Caffe's TEST phase (eval mode) passes the blob through; TRAIN scales the kept values by 1 / (1 - ratio).
    src.assign(outputs, f"F.dropout({inputs[0]}, {module.ratio!r}, self.training)")
