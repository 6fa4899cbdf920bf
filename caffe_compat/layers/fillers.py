"""Caffe's weight fillers, for layers built without weights (training from scratch)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import CaffeCompatError


def _fans(shape: Sequence[int]):
    count = math.prod(shape)
    # Caffe: fan_in = count / num, fan_out = count / channels (blob axes 0 and 1)
    fan_in = count // shape[0] if shape else 1
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def variance_denominator(filler, shape) -> float:
    fan_in, fan_out = _fans(shape)
    norm = filler.variance_norm  # 0 FAN_IN, 1 FAN_OUT, 2 AVERAGE
    if norm == 1:
        return fan_out
    if norm == 2:
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(filler, shape: Sequence[int], layer_name: str = "?") -> torch.Tensor:
    """A float32 tensor of `shape` drawn as Caffe's FillerParameter `filler` says."""
    shape = tuple(int(s) for s in shape)
    kind = filler.type
    if filler.sparse != -1 and kind != "gaussian":
        raise CaffeCompatError(f"layer '{layer_name}': sparsity is only supported by the gaussian filler")
    if kind == "constant":
        return torch.full(shape, float(filler.value))
    if kind == "uniform":
        if filler.min > filler.max:
            raise CaffeCompatError(f"layer '{layer_name}': uniform filler min {filler.min} exceeds max {filler.max}")
        return torch.empty(shape).uniform_(filler.min, filler.max)
    if kind == "gaussian":
        values = torch.empty(shape).normal_(filler.mean, filler.std)
        if filler.sparse >= 0:
            # Caffe keeps each weight with probability sparse / num_outputs (blob axis 0).
            if not shape or filler.sparse > shape[0]:
                raise CaffeCompatError(f"layer '{layer_name}': sparse {filler.sparse} needs a blob with at "
                                       f"least that many outputs, got shape {shape}")
            values *= torch.bernoulli(torch.full(shape, filler.sparse / shape[0]))
        elif filler.sparse != -1:
            raise CaffeCompatError(f"layer '{layer_name}': sparse must be -1 or a count, got {filler.sparse}")
        return values
    if kind == "xavier":
        bound = math.sqrt(3.0 / variance_denominator(filler, shape))
        return torch.empty(shape).uniform_(-bound, bound)
    if kind == "msra":
        return torch.empty(shape).normal_(0.0, math.sqrt(2.0 / variance_denominator(filler, shape)))
    if kind == "positive_unitball":
        values = torch.rand(shape)
        rows = values.reshape(shape[0], -1)
        return (rows / rows.sum(dim=1, keepdim=True)).reshape(shape)
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise CaffeCompatError(f"layer '{layer_name}': bilinear filler needs a square 4-D blob, got {shape}")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        taps = 1 - (torch.arange(k, dtype=torch.float32) / f - c).abs()
        return (taps[:, None] * taps[None, :]).expand(shape).clone()
    raise CaffeCompatError(f"layer '{layer_name}': unknown filler type '{kind}'")
