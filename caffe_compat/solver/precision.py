"""Lower precision for speed: `--precision bf16|fp16` runs the net's forward under
torch.autocast (convolutions and inner products in 16 bits, accumulating in 32), the
loss layers and Caffe's update arithmetic in float32; fp32 (the default) is Caffe's
arithmetic, as the parity tests check. `--memory-format channels_last` stores the 4-d
weights (and so the convolutions' outputs) as N x H x W x C, which oneDNN and cuDNN
convolve faster; it is the default but for fp32 on CUDA, which keeps Caffe's NCHW. On
CPU it trains fp32 GoogLeNet 1.2x (AVX2) to 1.5x (AVX-512) faster than NCHW, with the
same values up to rounding (the solver fixture ends within 2e-6 of Caffe's weights
either way).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import CaffeCompatError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def check_precision(precision: str, memory_format: Optional[str], device_type: str) -> str:
    """The memory format to use (its default follows the precision and the device),
    after checking both names."""
    if precision not in PRECISIONS:
        raise CaffeCompatError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if memory_format is None:
        return "nchw" if precision == "fp32" and device_type == "cuda" else "channels_last"
    if memory_format not in MEMORY_FORMATS:
        raise CaffeCompatError(f"--memory-format {memory_format!r}: expected one of {', '.join(MEMORY_FORMATS)}")
    return memory_format


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Float32Loss(nn.Module):
    """A loss layer run in float32 whatever the autocast around it: its sums over the
    batch (the lifted loss's distances and exponentials) lose too much in 16 bits."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, *bottoms):
        with torch.autocast(bottoms[0].device.type, enabled=False):
            return self.loss(*(b.float() if b.is_floating_point() else b for b in bottoms))


def losses_in_float32(net) -> int:
    """Wrap every parameterless loss layer of the net (Caffe's types ending in Loss)."""
    wrapped = 0
    for node in net.graph.layers:
        name = net.module_names.get(node.name)
        module = net.layers[name] if name is not None else None
        if node.type.endswith("Loss") and module is not None and not list(module.parameters()):
            net.layers[name] = Float32Loss(module)
            wrapped += 1
    return wrapped


class LossScaler:
    """fp16's dynamic loss scale, as torch.amp.GradScaler does it: the loss is multiplied
    before backward and the gradients divided after; an iteration whose gradients
    overflow is not applied and halves the scale; `growth_interval` clean ones double it."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = scale
        self.growth_interval = growth_interval
        self.clean = 0

    def unscale(self, grads: Sequence[Optional[torch.Tensor]]) -> bool:
        """Divide the gradients by the scale; False (and the scale halved) if any overflowed."""
        present = [g for g in grads if g is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in present]).all()) if present else True
        if not finite:
            self.scale /= 2
            self.clean = 0
            return False
        for g in present:
            g.div_(self.scale)
        self.clean += 1
        if self.clean == self.growth_interval:
            self.scale *= 2
            self.clean = 0
        return True
