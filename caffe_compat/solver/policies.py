"""Caffe's learning-rate policies (SGDSolver::GetLearningRate), in float32 as Caffe's Dtype."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from ..errors import CaffeCompatError

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

f32 = np.float32


def check_policy(param, where: str) -> None:
    """Caffe's checks on the lr_policy fields of a SolverParameter."""
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        shown = f"'{policy}'" if policy else "missing"
        raise CaffeCompatError(f"{where}: lr_policy is {shown}; known: {', '.join(LR_POLICIES)}")
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise CaffeCompatError(f"{where}: lr_policy '{policy}' needs stepsize > 0, got {param.stepsize}")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise CaffeCompatError(f"{where}: gamma must be >= 0, got {param.gamma}")
    if policy == "poly" and param.max_iter <= 0:
        raise CaffeCompatError(f"{where}: lr_policy 'poly' needs max_iter > 0")


def learning_rate(param, it: int, current_step: int) -> Tuple[float, int]:
    """(rate at iteration `it`, the new current_step). `current_step` advances for
    multistep exactly as in Caffe, so call this once per update."""
    p = param
    base_lr = float(p.base_lr)
    policy = p.lr_policy
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        current_step = it // p.stepsize
        rate = base_lr * math.pow(p.gamma, current_step)
    elif policy == "exp":
        rate = base_lr * math.pow(p.gamma, it)
    elif policy == "inv":
        rate = f32(base_lr) * np.power(f32(1) + f32(p.gamma) * f32(it), -f32(p.power))
    elif policy == "multistep":
        if current_step < len(p.stepvalue) and it >= p.stepvalue[current_step]:
            current_step += 1
        rate = base_lr * math.pow(p.gamma, current_step)
    elif policy == "poly":
        rate = f32(base_lr) * np.power(f32(1) - f32(it) / f32(p.max_iter), f32(p.power))
    else:  # sigmoid
        rate = f32(base_lr) * (f32(1) / (f32(1) + np.exp(-f32(p.gamma) * (f32(it) - f32(p.stepsize)))))
    return float(f32(rate)), current_step
