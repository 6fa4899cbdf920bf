"""Caffe's Reshape arithmetic (reshape_layer.cpp's LayerSetUp and Reshape), without torch:
one piece for the layer builder (layers/shape.py) and the shape rule `inspect` uses
(shapes/tensors.py)."""
from __future__ import annotations

import math
from typing import Callable, List, Tuple


def reshape_top(shape: Tuple[int, ...], param, error: Callable[[str], Exception]) -> Tuple[List[int], int, int]:
    """(the top shape, the first and one-past-last bottom axes replaced) for a bottom of
    `shape` under ReshapeParameter `param`; `error(message)` gives what to raise."""
    rank = len(shape)
    dims = [int(d) for d in param.shape.dim]
    if dims.count(-1) > 1:
        raise error(f"shape {dims} has more than one -1")
    if any(d < -1 for d in dims):
        raise error(f"shape {dims} has a negative dimension other than -1")
    start = param.axis if param.axis >= 0 else rank + param.axis + 1
    if not 0 <= start <= rank:
        raise error(f"axis {param.axis} is out of range for a bottom of rank {rank}")
    if param.num_axes < -1:
        raise error(f"num_axes must be >= 0, or -1 for all, got {param.num_axes}")
    end = rank if param.num_axes == -1 else start + param.num_axes
    if end > rank:
        raise error(f"axis + num_axes = {end} is out of range for a bottom of rank {rank}")
    new = []
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= rank:
                raise error(f"shape {dims} copies (0) axis {start + i}, which the bottom {shape} lacks")
            new.append(shape[start + i])
        else:
            new.append(d)
    top = list(shape[:start]) + new + list(shape[end:])
    if -1 in dims:
        inferred = start + dims.index(-1)
        known = math.prod(d for i, d in enumerate(top) if i != inferred)
        if known == 0 or math.prod(shape) % known:
            raise error(f"bottom of shape {shape} cannot be reshaped to {dims} (count not divisible)")
        top[inferred] = math.prod(shape) // known
    elif math.prod(top) != math.prod(shape):
        raise error(f"bottom of shape {shape} ({math.prod(shape)} values) cannot be reshaped to "
                    f"{tuple(top)} ({math.prod(top)} values)")
    return top, start, end
