"""Upsample: one type name, two layers, told apart by their bottoms.

With two bottoms, SegNet's unpooling (alexgkendall/caffe-segnet upsample_layer.cpp):
bottom 1 is a max Pooling's mask (its second top: each maximum's index within its
plane); each value is written at its index in a zero top of upsample_h x upsample_w
(else the bottom's size times scale, less pad_out), a later value overwriting an
earlier one at the same index. Its backward gives each bottom value the top's diff at
its index (every one of them, overwritten or not); the mask gets none. An index outside
the top is the fork's fatal error, here one line naming the layer.

With one bottom, the YOLOv3 forks' nearest-neighbour upsampling by an integer scale
(eric612/MobileNet-YOLO upsample_layer.cpp): top[h][w] = bottom[h / scale][w / scale];
its backward sums each scale x scale block."""
from __future__ import annotations

import inspect

import torch

from ..errors import CaffeCompatError
from ..params.forks import UpsampleSettings, upsample_settings, upsample_top
from .onnx_graph import INT64, OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class _Unpool(torch.autograd.Function):
    """SegNet's unpooling on (num, channels, positions): each value written at its mask index in a
    zero plane of `plane` positions, a later value overwriting an earlier one; the backward gives
    each value the top's gradient at its index, overwritten or not."""

    @staticmethod
    def forward(ctx, x, index, plane: int):
        ctx.save_for_backward(index)
        # the last writer of each target: the largest source position aimed at it
        positions = torch.arange(index.shape[-1], device=x.device).expand_as(index)
        writer = torch.full(index.shape[:-1] + (plane,), -1, dtype=torch.long, device=x.device)
        writer.scatter_reduce_(-1, index, positions, reduce="amax")
        written = torch.gather(x, -1, writer.clamp(min=0))
        return torch.where(writer >= 0, written, torch.zeros_like(written))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.gather(grad, -1, index), None, None


class Unpool(CaffeLayer):
    def __init__(self, s: UpsampleSettings, layer_name: str):
        super().__init__()
        self.settings = s
        self.layer_name = layer_name

    def forward(self, x, mask):
        s = self.settings
        plane = s.height_out * s.width_out
        num, channels = x.shape[:2]
        index = mask.detach().reshape(num, channels, -1).long()  # the fork's static_cast<int>
        # the check reads the values, which an exported program cannot branch on: there an index
        # outside the top fails in the scatter instead
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
        if x.device.type != "meta" and index.numel() and not exporting:
            low, high = torch.aminmax(index)
            if low < 0 or high >= plane:
                bad = int(high) if high >= plane else int(low)
                raise CaffeCompatError(
                    f"layer '{self.layer_name}' (Upsample): mask index {bad} is outside the "
                    f"{s.height_out}x{s.width_out} top; the pooling that made the mask had an input of another size")
        top = _Unpool.apply(x.reshape(num, channels, -1), index, plane)
        return top.reshape(num, channels, s.height_out, s.width_out)


class NearestUpsample(CaffeLayer):
    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)


@register("Upsample")
def build_upsample(ctx: LayerContext):
    s = upsample_settings(ctx)
    module = NearestUpsample(s.scale) if len(ctx.bottoms) == 1 else Unpool(s, ctx.name)
    return ctx.wire(module, top_shapes=[upsample_top(ctx, s)])


@register_onnx("Upsample")
def upsample_to_onnx(g: OnnxGraph, ctx, module, inputs, outputs):
    name = ctx.name
    if isinstance(module, NearestUpsample):
        # nearest with asymmetric coordinates and floor: source index = target // scale exactly
        scales = g.floats([1, 1, module.scale, module.scale], name + "/scales")
        g.node("Resize", [inputs[0], "", scales], outputs, mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return
    # MaxUnpool reads indices into the whole tensor, the mask indexes each plane: add
    # each plane's offset, (n * C + c) * H_out * W_out, the batch size taken at run time.
    # ONNX Runtime writes the values in order, so a later one overwrites as in the fork.
    s = module.settings
    channels, height, width = ctx.bottom_shapes[0][1:]
    plane = s.height_out * s.width_out
    (shape,) = g.node("Shape", [inputs[0]], hint=name + "/shape")
    (batch,) = g.node("Slice", [shape, g.ints([0], name + "/zero"), g.ints([1], name + "/one")], hint=name + "/batch")
    (count,) = g.node("Squeeze", [batch, g.ints([0], name + "/squeeze_axes")], hint=name + "/count")
    (samples,) = g.node("Range", [g.initializer(torch.tensor(0), name + "/start"), count,
                                  g.initializer(torch.tensor(1), name + "/step")], hint=name + "/samples")
    (sample_offsets,) = g.node("Mul", [g.node("Reshape", [samples, g.ints([-1, 1, 1, 1], name + "/column")],
                                              hint=name + "/samples4d")[0],
                                       g.initializer(torch.tensor(channels * plane), name + "/sample_stride")],
                               hint=name + "/sample_offsets")
    channel_offsets = g.initializer((torch.arange(channels) * plane).reshape(1, -1, 1, 1), name + "/channel_offsets")
    (index,) = g.node("Cast", [inputs[1]], hint=name + "/index", to=INT64)
    (index,) = g.node("Add", [index, sample_offsets], hint=name + "/sample_index")
    (index,) = g.node("Add", [index, channel_offsets], hint=name + "/flat_index")
    (top_shape,) = g.node("Concat", [batch, g.ints([channels, s.height_out, s.width_out], name + "/top_tail")],
                          hint=name + "/top_shape", axis=0)
    if s.height_out < height or s.width_out < width:
        raise ctx.error(f"a {s.height_out}x{s.width_out} top smaller than the {height}x{width} bottom has no "
                        f"ONNX export (MaxUnpool's top is at least its bottom's size)")
    # kernel and strides 1: MaxUnpool's least top is then the bottom's size; output_shape sets it
    (unpooled,) = g.node("MaxUnpool", [inputs[0], index, top_shape], hint=name + "/unpooled", kernel_shape=[1, 1],
                         strides=[1, 1])
    # a Reshape to the known sizes, so that shape inference gives the top's rank and sizes
    g.node("Reshape", [unpooled, g.ints([-1, channels, s.height_out, s.width_out], name + "/top_dims")], outputs)


# ---------------------------------------------------------------- standalone source

# the function above, verbatim: one copy of the arithmetic
UNPOOL_SOURCE = "\n" + inspect.getsource(_Unpool).replace("class _Unpool(", "class Unpool(", 1) + '''

def unpool(x, mask, size_out):
    \"\"\"SegNet's Upsample: x's values at the places a max pooling's mask names, in a zero top of
    size_out (height, width).\"\"\"
    num, channels = x.shape[:2]
    plane = size_out[0] * size_out[1]
    index = mask.detach().reshape(num, channels, -1).long()  # the fork's static_cast<int>
    if index.numel() and (index.min() < 0 or index.max() >= plane):
        raise ValueError(f"Upsample: a mask index is outside the {size_out} top")
    return Unpool.apply(x.reshape(num, channels, -1), index, plane).reshape(num, channels, *size_out)
'''


@register_source("Upsample")
def upsample_to_source(src, ctx, module, inputs, outputs):
    if isinstance(module, NearestUpsample):
        scale = module.scale
        src.assign(outputs, f"{inputs[0]}.repeat_interleave({scale}, dim=2).repeat_interleave({scale}, dim=3)")
        return
    src.helper(UNPOOL_SOURCE)
    s = module.settings
    src.assign(outputs, f"unpool({', '.join(inputs)}, {(s.height_out, s.width_out)})")
