"""Eltwise: the element-wise PROD, SUM or MAX of several equally shaped bottoms."""
from __future__ import annotations

from typing import Sequence

import torch

from .activation import _emit_chain, _scalar
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, no_source_form, register, register_onnx, register_source


class _QuotientGradient(torch.autograd.Function):
    """The product `top` of `bottoms`, each bottom's gradient taken as top / bottom."""

    @staticmethod
    def forward(ctx, top, *bottoms):
        ctx.save_for_backward(top, *bottoms)
        return top.clone()

    @staticmethod
    def backward(ctx, grad):
        top, *bottoms = ctx.saved_tensors
        return (None, *(grad * top / b for b in bottoms))


class Eltwise(CaffeLayer):
    """PROD, SUM (with one coefficient per bottom) or MAX of equally shaped bottoms.
    PROD's gradient for a bottom is the product of the others, or with
    stable_prod_grad false Caffe's top / bottom (NaN where that bottom is 0)."""

    def __init__(self, operation: str, coeffs: Sequence[float], stable_prod_grad: bool = True):
        super().__init__()
        self.operation = operation
        self.coeffs = tuple(coeffs)
        self.stable_prod_grad = stable_prod_grad

    def forward(self, *bottoms):
        if self.operation == "PROD":
            top = bottoms[0] * bottoms[1]
            for bottom in bottoms[2:]:
                top = top * bottom
            return top if self.stable_prod_grad else _QuotientGradient.apply(top, *bottoms)
        if self.operation == "SUM":
            terms = [b if c == 1 else b * c for b, c in zip(bottoms, self.coeffs)]
            top = terms[0]
            for term in terms[1:]:
                top = top + term
            return top
        # Caffe's MAX: bottom 1 wins a tie with bottom 0, later bottoms must be strictly
        # greater; the gradient goes to the winner only, which torch.where reproduces.
        top = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
        for bottom in bottoms[2:]:
            top = torch.where(bottom > top, bottom, top)
        return top


_ELTWISE_OPS = {0: "PROD", 1: "SUM", 2: "MAX"}


@register("Eltwise")
def build_eltwise(ctx: LayerContext) -> Converted:
    count = len(ctx.bottoms)
    if count < 2:
        raise ctx.error(f"expects at least 2 bottoms, got {count}")
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    for name, shape in zip(ctx.bottoms[1:], ctx.bottom_shapes[1:]):
        if tuple(shape) != tuple(ctx.bottom_shapes[0]):
            raise ctx.error(f"bottom '{name}' has shape {tuple(shape)}, but '{ctx.bottoms[0]}' has "
                            f"{tuple(ctx.bottom_shapes[0])}; all bottoms must have the same shape")
    param = ctx.param.eltwise_param
    operation = _ELTWISE_OPS[param.operation]
    coeffs = list(param.coeff)
    if coeffs and len(coeffs) != count:
        raise ctx.error(f"takes one coefficient per bottom: {len(coeffs)} coefficients for {count} bottoms")
    if coeffs and operation == "PROD":
        raise ctx.error("coefficients are only for SUM")
    # Caffe ignores coefficients given to MAX.
    module = Eltwise(operation, coeffs or [1.0] * count, param.stable_prod_grad)
    return ctx.wire(module, top_shapes=[ctx.bottom_shapes[0]])


@register_onnx("Eltwise")
def eltwise_to_onnx(g: OnnxGraph, ctx, module: Eltwise, inputs, outputs):
    if module.operation == "MAX":
        g.node("Max", inputs, outputs)
    elif module.operation == "PROD":
        _emit_chain(g, inputs[0], [("Mul", [b], {}) for b in inputs[1:]], outputs[0])
    else:
        terms = [name if c == 1 else g.node("Mul", [name, _scalar(g, c, f"{ctx.name}/coeff{i}")])[0]
                 for i, (name, c) in enumerate(zip(inputs, module.coeffs))]
        g.node("Sum", terms, outputs)


@register_source("Eltwise")
def eltwise_to_source(src, ctx, module: Eltwise, inputs, outputs):
    if module.operation == "PROD":
        if not module.stable_prod_grad:
            raise no_source_form(ctx, "stable_prod_grad: false, whose gradient is Caffe's quotient")
        src.assign(outputs, " * ".join(inputs))
    elif module.operation == "SUM":
        src.assign(outputs, " + ".join(b if c == 1 else f"{b} * {c!r}" for b, c in zip(inputs, module.coeffs)))
    else:
        # Caffe's MAX: bottom 1 wins a tie with bottom 0, later bottoms must be strictly greater.
        top = f"torch.where({inputs[0]} > {inputs[1]}, {inputs[0]}, {inputs[1]})"
        if outputs[0] in inputs[2:]:
            raise no_source_form(ctx, "MAX in place of a later bottom")
        src.assign(outputs, top)
        for bottom in inputs[2:]:
            src.assign(outputs, f"torch.where({bottom} > {outputs[0]}, {bottom}, {outputs[0]})")
