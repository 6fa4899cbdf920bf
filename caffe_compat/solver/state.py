"""Solver states, `<prefix>_iter_<N>.solverstate.pt`: weights, solver history, iteration,
RNG states and data-reader positions as plain dicts, lists and tensors (read back with
`torch.load(weights_only=True)`), so a resumed run continues bit for bit.

A state is checked key by key when read: a damaged or foreign file ends in one line
naming the file and the key, never in a KeyError half-way through restoring it.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError

STATE_FORMAT = "caffe-compat solverstate"
STATE_VERSION = 1
STATE_SUFFIX = ".solverstate.pt"
NUMPY_KEYS = 624  # MT19937's state words


def numpy_rng_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def set_numpy_rng_state(state) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def read_state(path: Path) -> dict:
    """The solver state stored at `path`, its structure checked."""
    if not path.exists():
        raise CaffeCompatError(f"--resume {path}: no such file")
    if path.is_dir():
        raise CaffeCompatError(f"--resume {path}: is a directory; give a {STATE_SUFFIX} file")
    if not path.is_file():  # a device or a pipe: reading it may never end
        raise CaffeCompatError(f"--resume {path}: not a regular file; give a {STATE_SUFFIX} file")
    not_ours = f"{path}: not a caffe-compat solver state (a {STATE_SUFFIX} file written by train)"
    if not zipfile.is_zipfile(path):
        hint = "; it is a caffemodel: start from it with --weights" if path.suffix == ".caffemodel" else ""
        raise CaffeCompatError(not_ours + hint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's text here advises weights_only=False: never for a file that holds code.
        raise CaffeCompatError(f"{path}: refused: it holds Python objects other than tensors, numbers, strings, "
                               f"lists and dicts; {not_ours.split(': ', 1)[1]}") from None
    except Exception:  # zip entries damaged or missing; torch raises several types
        raise CaffeCompatError(f"{path}: damaged: its archive cannot be read as a saved solver state") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CaffeCompatError(not_ours)
    check_state(state, str(path))
    return state


def check_state(state: dict, where: str) -> None:
    """Raise CaffeCompatError naming `where` and the key unless `state` has the
    structure `Trainer.state_dict` writes."""
    check = _Checker(where)
    version = check.get(state, "version", int)
    if version != STATE_VERSION:
        raise check.error("version", f"is {version}; this caffe-compat reads version {STATE_VERSION}")
    solver = check.get(state, "solver", dict)
    check.get(solver, "type", str, "solver.")
    for key in ("iter", "current_step"):
        if check.get(solver, key, int, "solver.") < 0:
            raise check.error(f"solver.{key}", "is negative")
    check.tensor_lists(check.get(solver, "history", dict, "solver."), "solver.history")
    check.tensor_lists(check.get(state, "weights", dict), "weights")
    rng = check.get(state, "rng", dict)
    torch_state = check.get(rng, "torch", torch.Tensor, "rng.")
    if torch_state.dtype != torch.uint8 or torch_state.shape != torch.get_rng_state().shape:
        raise check.error("rng.torch", f"is a {torch_state.dtype} tensor of shape {tuple(torch_state.shape)}, "
                                       f"not torch's generator state")
    numpy_state = check.get(rng, "numpy", (tuple, list), "rng.")
    if (len(numpy_state) != 5 or numpy_state[0] != "MT19937" or not isinstance(numpy_state[1], torch.Tensor)
            or tuple(numpy_state[1].shape) != (NUMPY_KEYS,) or not all(isinstance(v, int) for v in numpy_state[2:4])
            or not isinstance(numpy_state[4], float) or not 0 <= numpy_state[2] <= NUMPY_KEYS):
        raise check.error("rng.numpy", "is not numpy's MT19937 state")
    if "cuda" in rng:
        check.items(check.get(rng, "cuda", list, "rng."), "rng.cuda", torch.Tensor)
    readers = check.get(state, "readers", dict)
    for key in ("train", "test"):
        for index, layers in enumerate(check.items(check.get(readers, key, list, "readers."), f"readers.{key}", dict)):
            for name, reader in layers.items():
                if not isinstance(name, str) or not isinstance(reader, dict):
                    raise check.error(f"readers.{key}[{index}]", "is not a map of layer names to reader states")
    for index, row in enumerate(check.items(check.get(state, "log", list), "log", (list, tuple))):
        if len(row) != 4 or not all(isinstance(v, (int, float)) for v in row):
            raise check.error(f"log[{index}]", "is not a row of iteration, loss, lr, smoothed loss")
    smoothing = check.get(state, "smoothing", dict)
    check.get(smoothing, "smoothed", float, "smoothing.")
    if not all(isinstance(v, float) for v in check.get(smoothing, "window", list, "smoothing.")):
        raise check.error("smoothing.window", "is not a list of losses")
    if check.get(state, "world_size", int) < 1:
        raise check.error("world_size", "is below 1")
    if "loss_scale" in state:  # fp16 runs: [scale, clean iterations since it last grew]
        scale = check.get(state, "loss_scale", list)
        if (len(scale) != 2 or not isinstance(scale[0], float) or not isinstance(scale[1], int)
                or not 0 < scale[0] < float("inf") or scale[1] < 0):
            raise check.error("loss_scale", "is not [scale, clean iterations]")


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def error(self, key: str, what: str) -> CaffeCompatError:
        return CaffeCompatError(f"{self.where}: damaged solver state: key '{key}' {what}")

    def get(self, mapping: dict, key: str, kind, prefix: str = "") -> Any:
        if key not in mapping:
            raise self.error(prefix + key, "is missing")
        value = mapping[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(prefix + key, f"is a {type(value).__name__}, expected {_kind_name(kind)}")
        return value

    def items(self, values: list, key: str, kind) -> list:
        for index, value in enumerate(values):
            if not isinstance(value, kind):
                raise self.error(f"{key}[{index}]", f"is a {type(value).__name__}, expected {_kind_name(kind)}")
        return values

    def tensor_lists(self, mapping: dict, key: str) -> None:
        """A map of layer (or param) names to lists of floating-point tensors."""
        for name, tensors in mapping.items():
            if not isinstance(name, str) or not isinstance(tensors, list):
                raise self.error(key, "is not a map of names to lists of tensors")
            for index, tensor in enumerate(tensors):
                if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                    raise self.error(f"{key}.{name}[{index}]", "is not a floating-point tensor")


def _kind_name(kind) -> str:
    kinds: Tuple = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("tensor" if k is torch.Tensor else k.__name__ for k in kinds)
