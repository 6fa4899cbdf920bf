"""Interp (hszhao/PSPNet interp_layer.cpp and util/interp.cpp, of the DeepLab-v2
lineage): bilinear resizing with the corners aligned, of the input cropped by
-pad_beg / -pad_end rows and columns.

Source row of output row h: r = h * ((H_in - 1) / (H_out - 1)) in float (0 for one
output row), read from rows floor(r) and floor(r) + 1 (the last row twice) with weights
1 - (r - floor(r)) and r - floor(r); columns alike. The fork computes each output as
h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), which this computes in the same order,
as a blend of two row gathers, each a blend of two column gathers; the same sizes are a
plain crop, as the fork copies them. The backward pass is autograd's adjoint of those
gathers, the fork's caffe_cpu_interp2_backward."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ..params.forks import InterpSettings, interp_settings, interp_top
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


def source_taps(size_in: int, size_out: int, crop: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis: (first source index, second source index, weight of the first,
    weight of the second), indices into the uncropped input, weights in float32."""
    f32 = np.float32
    ratio = f32(size_in - 1) / f32(size_out - 1) if size_out > 1 else f32(0)
    position = f32(ratio) * np.arange(size_out, dtype=f32)
    first = position.astype(np.int64)  # truncation, as the fork's int conversion
    second = first + (first < size_in - 1)
    far = (position - first.astype(f32)).astype(f32)
    near = (f32(1) - far).astype(f32)
    return first + crop, second + crop, near, far


class Interp(CaffeLayer):
    def __init__(self, s: InterpSettings):
        super().__init__()
        self.settings = s
        self.copy = (s.height_in, s.width_in) == (s.height_out, s.width_out)
        rows, cols = source_taps(s.height_in, s.height_out, s.crop), source_taps(s.width_in, s.width_out, s.crop)
        for prefix, taps in (("row", rows), ("col", cols)):
            for name, values in zip(("first", "second", "near", "far"), taps):
                self.register_buffer(f"{prefix}_{name}", torch.from_numpy(values), persistent=False)

    def forward(self, x):
        s = self.settings
        if self.copy:
            return x[:, :, s.crop:s.crop + s.height_in, s.crop:s.crop + s.width_in]
        near_w, far_w = self.col_near.to(x.dtype), self.col_far.to(x.dtype)

        def blend_columns(rows):
            return near_w * rows.index_select(3, self.col_first) + far_w * rows.index_select(3, self.col_second)

        top = blend_columns(x.index_select(2, self.row_first))
        bottom = blend_columns(x.index_select(2, self.row_second))
        return self.row_near.to(x.dtype)[:, None] * top + self.row_far.to(x.dtype)[:, None] * bottom


@register("Interp")
def build_interp(ctx: LayerContext):
    settings = interp_settings(ctx)
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    return ctx.wire(Interp(settings), top_shapes=[interp_top(ctx, settings)])


@register_onnx("Interp")
def interp_to_onnx(g: OnnxGraph, ctx, module: Interp, inputs, outputs):
    # Gathers and blends as the module computes them, not Resize: ONNX's align_corners
    # maps x * (in - 1) / (out - 1) in the runtime's own order, where the fork rounds
    # the ratio to float first, and the fork's weights are float32 as stored here.
    s, name = module.settings, ctx.name
    if module.copy:
        g.node("Slice", [inputs[0], g.ints([s.crop, s.crop], name + "/starts"),
                         g.ints([s.crop + s.height_in, s.crop + s.width_in], name + "/ends"),
                         g.ints([2, 3], name + "/axes")], outputs)
        return

    def gather(x, indices, axis, hint):
        return g.node("Gather", [x, g.initializer(indices, f"{name}/{hint}_index")], hint=f"{name}/{hint}",
                      axis=axis)[0]

    def blend(a, b, near, far, shape, hint, output=None):
        (left,) = g.node("Mul", [a, g.floats(near.detach().numpy().reshape(shape), f"{name}/{hint}_near")],
                         hint=f"{name}/{hint}_a")
        (right,) = g.node("Mul", [b, g.floats(far.detach().numpy().reshape(shape), f"{name}/{hint}_far")],
                          hint=f"{name}/{hint}_b")
        return g.node("Add", [left, right], None if output is None else [output], hint=f"{name}/{hint}")[0]

    blended = []
    for which, rows in (("top", module.row_first), ("bottom", module.row_second)):
        picked = gather(inputs[0], rows.numpy(), 2, f"{which}_rows")
        blended.append(blend(gather(picked, module.col_first.numpy(), 3, f"{which}_left"),
                             gather(picked, module.col_second.numpy(), 3, f"{which}_right"),
                             module.col_near, module.col_far, (-1,), which))
    blend(*blended, module.row_near, module.row_far, (-1, 1), "rows", outputs[0])


# ---------------------------------------------------------------- standalone source

INTERP_SOURCE = """
def interp_taps(size_in, size_out, crop):
    \"\"\"Along one axis, PSPNet's Interp taps: output i reads source position r = i * ratio,
    ratio = (size_in - 1) / (size_out - 1) in float32 (0 for one output), from floor(r) and the
    next index (the last one twice) with weights 1 - (r - floor(r)) and r - floor(r).\"\"\"
    f32 = torch.float32
    ratio = (torch.tensor(size_in - 1, dtype=f32) / torch.tensor(size_out - 1, dtype=f32)
             if size_out > 1 else torch.tensor(0, dtype=f32))
    position = ratio * torch.arange(size_out, dtype=f32)
    first = position.long()  # truncation, as the fork's int conversion
    second = first + (first < size_in - 1).long()
    far = position - first.to(f32)
    return first + crop, second + crop, 1 - far, far


class Interp(nn.Module):
    \"\"\"PSPNet's Interp: bilinear resizing with the corners aligned, of the input cropped to
    size_in from row and column `crop`, computed as the fork does: h0 * (w0 * a + w1 * b) + h1 *
    (w0 * c + w1 * d); equal sizes are a plain crop.\"\"\"

    def __init__(self, size_in, size_out, crop):
        super().__init__()
        self.size_in, self.crop = size_in, crop
        self.copy = size_in == size_out
        for prefix, taps in (("row", interp_taps(size_in[0], size_out[0], crop)),
                             ("col", interp_taps(size_in[1], size_out[1], crop))):
            for name, values in zip(("first", "second", "near", "far"), taps):
                self.register_buffer(f"{prefix}_{name}", values, persistent=False)

    def forward(self, x):
        if self.copy:
            return x[:, :, self.crop:self.crop + self.size_in[0], self.crop:self.crop + self.size_in[1]]
        near, far = self.col_near.to(x.dtype), self.col_far.to(x.dtype)

        def blend_columns(rows):
            return near * rows.index_select(3, self.col_first) + far * rows.index_select(3, self.col_second)

        top = blend_columns(x.index_select(2, self.row_first))
        bottom = blend_columns(x.index_select(2, self.row_second))
        return self.row_near.to(x.dtype)[:, None] * top + self.row_far.to(x.dtype)[:, None] * bottom
"""


@register_source("Interp")
def interp_to_source(src, ctx, module: Interp, inputs, outputs):
    s = module.settings
    src.helper(INTERP_SOURCE)
    layer = src.attribute(ctx, f"Interp({(s.height_in, s.width_in)}, {(s.height_out, s.width_out)}, {s.crop})", {})
    src.assign(outputs, f"{layer}({inputs[0]})")
