"""Reduction: SUM, ASUM, SUMSQ or MEAN over an axis and all axes after it, times coeff."""
from __future__ import annotations

from .normalization import onnx_reduce, onnx_scalar
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source

_OPERATIONS = {1: "SUM", 2: "ASUM", 3: "SUMSQ", 4: "MEAN"}  # ReductionParameter.ReductionOp
_ONNX_OPS = {"SUM": "ReduceSum", "ASUM": "ReduceL1", "SUMSQ": "ReduceSumSquare", "MEAN": "ReduceMean"}


class Reduction(CaffeLayer):
    """The top keeps the axes before `axis`; a reduction from axis 0 gives a 0-d top."""

    def __init__(self, operation: str, axes, coeff: float):
        super().__init__()
        self.operation = operation
        self.axes = tuple(axes)
        self.coeff = coeff

    def forward(self, x):
        if self.operation == "ASUM":
            x = x.abs()  # its gradient is sign(x), 0 at 0, as Caffe's
        elif self.operation == "SUMSQ":
            x = x * x
        reduced = x.mean(self.axes) if self.operation == "MEAN" else x.sum(self.axes)
        return reduced if self.coeff == 1 else reduced * self.coeff


@register("Reduction")
def build_reduction(ctx: LayerContext):
    ctx.expect_bottoms(1)
    p = ctx.param.reduction_param
    operation = _OPERATIONS.get(p.operation)
    if operation is None:
        raise ctx.error(f"unknown reduction operation {p.operation}")
    rank = len(ctx.bottom_shapes[0])
    if not -rank <= p.axis < rank:
        raise ctx.error(f"axis {p.axis} is out of range for bottom '{ctx.bottoms[0]}' of rank {rank}")
    return ctx.wire(Reduction(operation, range(p.axis % rank, rank), p.coeff))


@register_onnx("Reduction")
def reduction_to_onnx(g: OnnxGraph, ctx, module: Reduction, inputs, outputs):
    op = _ONNX_OPS[module.operation]
    if module.coeff == 1:
        onnx_reduce(g, op, inputs[0], module.axes, 0, output=outputs[0], hint=ctx.name + "/reduced")
        return
    reduced = onnx_reduce(g, op, inputs[0], module.axes, 0, hint=ctx.name + "/reduced")
    g.node("Mul", [reduced, onnx_scalar(g, module.coeff, ctx.name + "/coeff")], outputs)


@register_source("Reduction")
def reduction_to_source(src, ctx, module: Reduction, inputs, outputs):
    x = {"ASUM": f"{inputs[0]}.abs()", "SUMSQ": f"({inputs[0]} * {inputs[0]})"}.get(module.operation, inputs[0])
    reduced = f"{x}.{'mean' if module.operation == 'MEAN' else 'sum'}({module.axes})"
    src.assign(outputs, reduced if module.coeff == 1 else f"{reduced} * {module.coeff!r}")
