"""Solver states, `<prefix>_iter_<N>.solverstate.pt`: weights, solver history, iteration,
RNG states and data-reader positions as plain dicts, lists and tensors (read back with
`torch.load(weights_only=True)`), so a resumed run continues bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CaffeCompatError

STATE_FORMAT = "caffe-compat solverstate"
STATE_VERSION = 1


def numpy_rng_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def set_numpy_rng_state(state) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def read_state(path: Path) -> dict:
    """The solver state stored at `path`."""
    if not path.exists():
        raise CaffeCompatError(f"--resume {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise CaffeCompatError(f"{path}: not a caffe-compat solver state: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CaffeCompatError(f"{path}: not a caffe-compat solver state (a .solverstate.pt written by train)")
    return state
