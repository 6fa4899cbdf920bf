"""InnerProduct (fully connected from an axis on) and Embed (one-hot lookup)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from . import fillers
from .onnx_graph import INT64, OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class InnerProduct(CaffeLayer):
    """top = flatten(x, axis) @ W^T + b; with `transpose` Caffe stores W as (K, N)."""

    def __init__(self, axis: int, transpose: bool, weight, bias):
        super().__init__()
        self.axis = axis
        self.transpose = transpose
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.blob_names = ("weight",) if bias is None else ("weight", "bias")

    def forward(self, x):
        weight = self.weight.t() if self.transpose else self.weight
        return F.linear(x.flatten(self.axis), weight, self.bias)


@register("InnerProduct")
def build_inner_product(ctx: LayerContext):
    ctx.expect_bottoms(1)
    ip = ctx.param.inner_product_param
    shape = ctx.bottom_shapes[0]
    axis = ctx.canonical_axis(ip.axis, len(shape))
    inputs = math.prod(shape[axis:])
    outputs = ip.num_output
    if outputs <= 0:
        raise ctx.error("num_output must be positive")
    weight_shape = (inputs, outputs) if ip.transpose else (outputs, inputs)
    weight = fillers.fill(ip.weight_filler, weight_shape, ctx.name)
    bias = fillers.fill(ip.bias_filler, (outputs,), ctx.name) if ip.bias_term else None
    module = InnerProduct(axis, ip.transpose, weight, bias)
    return ctx.wire(module, top_shapes=[tuple(shape[:axis]) + (outputs,)])


@register_onnx("InnerProduct")
def inner_product_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    name = ctx.name
    shape = ctx.bottom_shapes[0]
    axis = module.axis
    x = inputs[0]
    bias = [] if module.bias is None else [g.initializer(module.bias, name + "/bias")]
    if axis <= 1:
        # Gemm on the (M, K) view; with axis 0 M is 1 and the top a vector.
        if len(shape) != 2 or axis == 0:
            (x,) = g.node("Flatten", [x], hint=name + "/flat", axis=axis)
        weight = g.initializer(module.weight, name + "/weight")
        gemm_out = outputs if axis == 1 else None
        (y,) = g.node("Gemm", [x, weight, *bias], gemm_out, hint=name + "/row", transB=0 if module.transpose else 1)
        if axis == 0:
            g.node("Reshape", [y, g.ints([-1], name + "/as_vector")], outputs)
        return
    # Axes before `axis` stay (the batch copied by Reshape's 0), the rest are flattened.
    if len(shape) != axis + 1:
        (x,) = g.node("Reshape", [x, g.ints([0, *shape[1:axis], -1], name + "/flat_shape")], hint=name + "/flat")
    weight = g.initializer(module.weight if module.transpose else module.weight.detach().t(), name + "/weight")
    if not bias:
        g.node("MatMul", [x, weight], outputs)
        return
    (y,) = g.node("MatMul", [x, weight], hint=name + "/matmul")
    g.node("Add", [y, *bias], outputs)


class Embed(CaffeLayer):
    """top[..., :] = W[int(x[...])] + b. Indices are truncated to integers as Caffe's
    static_cast does; they get no gradient."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.blob_names = ("weight",) if bias is None else ("weight", "bias")

    def forward(self, x):
        top = F.embedding(x.long(), self.weight)
        return top if self.bias is None else top + self.bias


@register("Embed")
def build_embed(ctx: LayerContext):
    ctx.expect_bottoms(1)
    ep = ctx.param.embed_param
    if ep.num_output <= 0 or ep.input_dim <= 0:
        raise ctx.error(f"num_output ({ep.num_output}) and input_dim ({ep.input_dim}) must be positive")
    weight = fillers.fill(ep.weight_filler, (ep.input_dim, ep.num_output), ctx.name)
    bias = fillers.fill(ep.bias_filler, (ep.num_output,), ctx.name) if ep.bias_term else None
    module = Embed(weight, bias)
    return ctx.wire(module, top_shapes=[tuple(ctx.bottom_shapes[0]) + (ep.num_output,)])


@register_onnx("Embed")
def embed_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    name = ctx.name
    (index,) = g.node("Cast", [inputs[0]], hint=name + "/index", to=INT64)
    weight = g.initializer(module.weight, name + "/weight")
    if module.bias is None:
        g.node("Gather", [weight, index], outputs, axis=0)
        return
    (rows,) = g.node("Gather", [weight, index], hint=name + "/rows", axis=0)
    g.node("Add", [rows, g.initializer(module.bias, name + "/bias")], outputs)


TRANSPOSED_SOURCE = '''
class TransposedLinear(nn.Module):
    """Caffe's InnerProduct with transpose: true, whose weight is stored (inputs, outputs)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.t(), self.bias)
'''


@register_source("InnerProduct")
def inner_product_to_source(src, ctx, module: InnerProduct, inputs, outputs):
    blobs = {"weight": module.weight} if module.bias is None else {"weight": module.weight, "bias": module.bias}
    bias = "" if module.bias is not None else ", bias=False"
    if module.transpose:
        src.helper(TRANSPOSED_SOURCE)
        layer = src.attribute(ctx, f"TransposedLinear({', '.join(map(str, module.weight.shape))}{bias})", blobs)
    else:
        outputs_count, inputs_count = module.weight.shape
        layer = src.attribute(ctx, f"nn.Linear({inputs_count}, {outputs_count}{bias})", blobs)
    src.assign(outputs, f"{layer}({inputs[0]}.flatten({module.axis}))")


EMBED_SOURCE = '''
class Embed(nn.Module):
    """Caffe's Embed: the weight's rows picked by the bottom's values truncated to integers (+ bias)."""

    def __init__(self, input_dim, num_output, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(input_dim, num_output))
        self.bias = nn.Parameter(torch.empty(num_output)) if bias else None

    def forward(self, x):
        top = F.embedding(x.long(), self.weight)
        return top if self.bias is None else top + self.bias
'''


@register_source("Embed")
def embed_to_source(src, ctx, module: Embed, inputs, outputs):
    src.helper(EMBED_SOURCE)
    blobs = {name: getattr(module, name) for name in module.blob_names}
    bias = "" if module.bias is not None else ", bias=False"
    layer = src.attribute(ctx, f"Embed({', '.join(map(str, module.weight.shape))}{bias})", blobs)
    src.assign(outputs, f"{layer}({inputs[0]})")
