"""The one place a `--device` string becomes a torch device, with a clean error."""
from __future__ import annotations

import re
import warnings

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


def solver_device(gpu: bool, device_id: int, where: str) -> str:
    """The device a solver's `solver_mode` and `device_id` name, as Caffe reads them: GPU
    is device_id's CUDA device, refused when there is no such device. Without CUDA here
    the net trains on the CPU, and says so in one warning line."""
    import torch

    if not gpu:
        return "cpu"
    if not torch.cuda.is_available():
        warnings.warn(f"{where}: solver_mode is GPU (device_id {device_id}), but CUDA is not available here: "
                      f"training on the CPU (--device cpu chooses it without this warning)", stacklevel=2)
        return "cpu"
    count = torch.cuda.device_count()
    if device_id >= count:
        raise CaffeCompatError(f"{where}: device_id {device_id}: no such GPU, this machine has {count} CUDA "
                               f"device(s) (0 to {count - 1}); set device_id or give --device")
    return f"cuda:{device_id}"
