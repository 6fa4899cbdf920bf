"""The one place a `--device` string becomes a torch device, with a clean error."""
from __future__ import annotations

import re

from .errors import CaffeCompatError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def check_device_name(name: str, what: str = "--device") -> str:
    """The name, if it can be a device caffe-compat runs on ('cpu', 'cuda', 'cuda:N');
    needs no torch, so argument parsing can call it."""
    match = _DEVICE.match(str(name).strip().lower())
    if match is None:
        raise CaffeCompatError(f"{what} {name!r}: not a device (use cpu, cuda or cuda:N)")
    return match.group(0)


def resolve_device(name, what: str = "--device"):
    """A torch.device for `name`, refusing CUDA where none is available."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    name = check_device_name(name, what)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CaffeCompatError(f"{what} {name}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CaffeCompatError(f"{what} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
