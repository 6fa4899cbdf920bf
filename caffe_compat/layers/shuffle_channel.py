"""ShuffleChannel (farmingyard/ShuffleNet shuffle_channel_layer.cpp): with g groups of
C/g channels, output channel j*g + i is input channel i*(C/g) + j. The top is
(num, channels, height, width), unit axes added to a smaller bottom."""
from __future__ import annotations

from ..params.forks import shuffle_group, shuffle_top
from .onnx_graph import OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source


class ShuffleChannel(CaffeLayer):
    def __init__(self, group: int, top_shape):
        super().__init__()
        self.group = group
        self.top_tail = tuple(top_shape[1:])  # the batch axis stays free

    def forward(self, x):
        num, channels = x.shape[:2]
        x = x.reshape(num, self.group, channels // self.group, -1).transpose(1, 2)
        return x.reshape((num,) + self.top_tail)


@register("ShuffleChannel")
def build_shuffle_channel(ctx: LayerContext):
    group = shuffle_group(ctx)
    if len(ctx.tops) != 1:
        raise ctx.error(f"expects 1 top, got {len(ctx.tops)}")
    top = shuffle_top(ctx)
    return ctx.wire(ShuffleChannel(group, top), top_shapes=[top])


@register_onnx("ShuffleChannel")
def shuffle_channel_to_onnx(g: OnnxGraph, ctx, module: ShuffleChannel, inputs, outputs):
    channels = module.top_tail[0]
    (grouped,) = g.node("Reshape", [inputs[0], g.ints([0, module.group, channels // module.group, -1],
                                                      ctx.name + "/groups")], hint=ctx.name + "/grouped")
    (swapped,) = g.node("Transpose", [grouped], hint=ctx.name + "/swapped", perm=[0, 2, 1, 3])
    g.node("Reshape", [swapped, g.ints([0, *module.top_tail], ctx.name + "/top_shape")], outputs)


SHUFFLE_SOURCE = '''
def shuffle_channels(x, group, top_tail):
    """ShuffleNet's ShuffleChannel: of `group` groups of C / group channels, output channel
    j * group + i is input channel i * (C / group) + j; the top is (num,) + top_tail."""
    num, channels = x.shape[:2]
    x = x.reshape(num, group, channels // group, -1).transpose(1, 2)
    return x.reshape((num,) + top_tail)
'''


@register_source("ShuffleChannel")
def shuffle_channel_to_source(src, ctx, module: ShuffleChannel, inputs, outputs):
    src.helper(SHUFFLE_SOURCE)
    src.assign(outputs, f"shuffle_channels({inputs[0]}, {module.group}, {module.top_tail})")
