"""Shape rules of the layers without parameters that keep, combine, move or pick values:
element-wise maps, Eltwise, MVN, Reduction, Concat ... ArgMax, Filter, BatchReindex."""
from __future__ import annotations


from ..params.layer import concat_top, flatten_top, reshape_top, slice_tops
from .base import rule, same_shape

rule("ReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold", "Dropout",
     "Softmax", "Clip", "Swish")(same_shape)


@rule("Eltwise")
def _eltwise(v):
    if len(v.bottoms) < 2:
        raise v.error(f"expects at least 2 bottoms, got {len(v.bottoms)}")
    if any(tuple(s) != tuple(v.bottom_shapes[0]) for s in v.bottom_shapes[1:]):
        raise v.error(f"all bottoms must have the same shape, got {v.bottom_shapes}")
    return same_shape(v)


@rule("MVN")
def _mvn(v):
    shape = v.expect_rank(1, 2, 3, 4)
    return [tuple(shape) + (1,) * (4 - len(shape))], []  # Caffe's 4-D (num, channels, height, width) view


@rule("Reduction")
def _reduction(v):
    shape = v.bottom_shapes[0]
    return [tuple(shape[:v.canonical_axis(v.param.reduction_param.axis, len(shape))])], []


@rule("Concat")
def _concat(v):
    return [tuple(concat_top(v)[0])], []


@rule("Slice")
def _slice(v):
    return slice_tops(v)[2], []


@rule("Split")
def _split(v):
    return [v.bottom_shapes[0]] * len(v.tops), []


@rule("Flatten")
def _flatten(v):
    return [flatten_top(v)[0]], []


@rule("Reshape")
def _reshape(v):
    return [tuple(reshape_top(tuple(v.bottom_shapes[0]), v.param.reshape_param, v.error)[0])], []


@rule("Tile")
def _tile(v):
    shape = list(v.bottom_shapes[0])
    param = v.param.tile_param
    shape[v.canonical_axis(param.axis, len(shape))] *= param.tiles
    return [tuple(shape)], []


@rule("Silence")
def _silence(v):
    return [], []


@rule("ArgMax")
def _argmax(v):
    shape = tuple(v.bottom_shapes[0])
    param = v.param.argmax_param
    if param.HasField("axis"):
        axis = v.canonical_axis(param.axis, len(shape))
        return [shape[:axis] + (param.top_k,) + shape[axis + 1:]], []
    top = [1] * max(3, len(shape))
    top[0], top[1], top[2] = shape[0], 2 if param.out_max_val else 1, param.top_k
    return [tuple(top)], []


@rule("Filter")
def _filter(v):
    if len(v.bottoms) < 2:
        raise v.error(f"expects at least 2 bottoms (data..., selector), got {len(v.bottoms)}")
    # the selected count is known only at run time: the declared shapes are Caffe's first reshape
    return list(v.bottom_shapes[:-1]), []


@rule("BatchReindex")
def _batch_reindex(v):
    v.expect_bottoms(2)
    data, index = (tuple(s) for s in v.bottom_shapes)
    return [index[:1] + data[1:]], []


@rule("LSTMUnit")
def _lstm_unit(v):
    v.expect_bottoms(3)
    return [v.bottom_shapes[0]] * 2, []  # c_t and h_t, shaped as c_{t-1}
