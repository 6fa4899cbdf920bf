"""Layers with no bottoms that are not readers of a dataset: DummyData (tops drawn by
fillers) and Parameter (a learned blob as a top)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

from ..params.layer import dummy_data_shapes
from . import fillers
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, no_source_form, register, register_onnx, register_source

Shape = Tuple[int, ...]


def _shape_of(blob_shape) -> Shape:
    return tuple(int(d) for d in blob_shape.dim)


# ---------------------------------------------------------------- DummyData

class DummyData(CaffeLayer):
    """Each top filled by its filler (None: zeros): once for a constant filler, at every
    forward pass for the others, as Caffe refills them. The tops take gradients while
    `tops_take_gradients` (under force_backward Caffe computes diffs for them like for
    any blob; without it, none)."""

    tops_take_gradients = True

    def __init__(self, name: str, shapes: Sequence[Shape], filler_params: Sequence):
        super().__init__()
        self.layer_name = name
        self.shapes = [tuple(s) for s in shapes]
        self.filler_params = list(filler_params)
        self.constant = [f is None or f.type == "constant" for f in self.filler_params]
        for index, (shape, filler, constant) in enumerate(zip(self.shapes, self.filler_params, self.constant)):
            value = torch.zeros(shape) if filler is None else fillers.fill(filler, shape, name)
            if not constant:  # drawn anew at every pass; this draw only checked the filler
                value = torch.empty(0)
            self.register_buffer(f"constant{index}", value, persistent=False)

    def forward(self):
        tops = []
        for index, (shape, filler, constant) in enumerate(zip(self.shapes, self.filler_params, self.constant)):
            held = getattr(self, f"constant{index}")
            value = held.clone() if constant else fillers.fill(filler, shape, self.layer_name).to(held)
            tops.append(value.requires_grad_(self.tops_take_gradients and torch.is_grad_enabled()))
        return tops[0] if len(tops) == 1 else tuple(tops)


@register("DummyData")
def build_dummy_data(ctx: LayerContext) -> Converted:
    if ctx.bottoms:
        raise ctx.error("takes no bottoms")
    count = len(ctx.tops)
    if not count:
        raise ctx.error("expects at least 1 top")
    param = ctx.param.dummy_data_param
    given = list(param.data_filler)
    if len(given) not in (0, 1, count):
        raise ctx.error(f"needs 0, 1 or {count} (one per top) data_filler, got {len(given)}")
    if not given:
        given = [None]  # Caffe's default, constant 0
    filler_params = given * count if len(given) == 1 else given
    shapes = dummy_data_shapes(ctx)
    return ctx.wire(DummyData(ctx.name, shapes, filler_params), top_shapes=shapes)


def _random_node(g: OnnxGraph, filler, shape: Shape, output: str) -> bool:
    """ONNX's own random generators for the fillers that are one uniform or normal draw;
    False for the others."""
    if filler.type == "uniform":
        g.node("RandomUniform", [], [output], shape=list(shape), low=filler.min, high=filler.max)
    elif filler.type == "xavier":
        bound = math.sqrt(3.0 / fillers.variance_denominator(filler, shape))
        g.node("RandomUniform", [], [output], shape=list(shape), low=-bound, high=bound)
    elif filler.type == "gaussian" and filler.sparse < 0:
        g.node("RandomNormal", [], [output], shape=list(shape), mean=filler.mean, scale=filler.std)
    elif filler.type == "msra":
        std = math.sqrt(2.0 / fillers.variance_denominator(filler, shape))
        g.node("RandomNormal", [], [output], shape=list(shape), mean=0.0, scale=std)
    else:
        return False
    return True


@register_onnx("DummyData")
def dummy_data_to_onnx(g: OnnxGraph, ctx, module: DummyData, inputs, outputs):
    for index, (output, shape, filler) in enumerate(zip(outputs, module.shapes, module.filler_params)):
        if module.constant[index] or filler.type == "bilinear":
            held = getattr(module, f"constant{index}")
            value = (held if module.constant[index] else fillers.fill(filler, shape, ctx.name)).numpy()
            g.node("Constant", [], [output], value=g.tensor(value, g.fresh(output + "/value")))
        elif not _random_node(g, filler, shape, output):
            raise ctx.error(f"the '{filler.type}' filler of top '{output}' has no ONNX equivalent")


# ---------------------------------------------------------------- Parameter

class Parameter(CaffeLayer):
    """Its one blob as its top; the top's diff is the blob's gradient."""

    blob_names = ("blob",)

    def __init__(self, shape: Shape):
        super().__init__()
        # Caffe allocates the blob zeroed; weights usually come from a caffemodel
        self.blob = nn.Parameter(torch.zeros(shape))

    def forward(self):
        return self.blob.view_as(self.blob)


@register("Parameter")
def build_parameter(ctx: LayerContext) -> Converted:
    if ctx.bottoms:
        raise ctx.error("takes no bottoms")
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    shape = _shape_of(ctx.param.parameter_param.shape)
    if any(d < 0 for d in shape):
        raise ctx.error(f"shape {shape} has a negative dimension")
    return ctx.wire(Parameter(shape), top_shapes=[shape])


@register_onnx("Parameter")
def parameter_to_onnx(g: OnnxGraph, ctx, module: Parameter, inputs, outputs):
    g.node("Identity", [g.initializer(module.blob, ctx.name + "/blob")], outputs)



# ---------------------------------------------------------------- standalone source

PARAMETER_SOURCE = '''
class Parameter(nn.Module):
    \"\"\"Caffe's Parameter layer: its one learned blob as its top.\"\"\"

    def __init__(self, shape):
        super().__init__()
        self.blob = nn.Parameter(torch.zeros(shape))

    def forward(self):
        return self.blob.view_as(self.blob)
'''

CONSTANTS_SOURCE = '''
class Constants(nn.Module):
    \"\"\"A DummyData layer whose fillers are constant: its tops, saved with the weights.\"\"\"

    def __init__(self, *shapes):
        super().__init__()
        for index, shape in enumerate(shapes):
            self.register_buffer(f"top{index}", torch.zeros(shape))

    def forward(self):
        tops = tuple(buffer.clone() for buffer in self.buffers())
        return tops[0] if len(tops) == 1 else tops
'''


@register_source("Parameter")
def parameter_to_source(src, ctx, module: Parameter, inputs, outputs):
    src.helper(PARAMETER_SOURCE)
    layer = src.attribute(ctx, f"Parameter({tuple(module.blob.shape)})", {"blob": module.blob})
    src.assign(outputs, f"{layer}()")


@register_source("DummyData")
def dummy_data_to_source(src, ctx, module: DummyData, inputs, outputs):
    if not all(module.constant):
        raise no_source_form(ctx, "a top drawn anew by its random filler at every pass")
    src.helper(CONSTANTS_SOURCE)
    tops = {f"top{index}": getattr(module, f"constant{index}") for index in range(len(module.shapes))}
    layer = src.attribute(ctx, f"Constants({', '.join(str(shape) for shape in module.shapes)})", tops)
    src.assign(outputs, f"{layer}()")
