"""Caffe's update rules: the SGDSolver family's arithmetic (not torch.optim), per
iteration as SGDSolver::ApplyUpdate:
    rate = lr_policy(iter); ClipGradients();
    for each learnable param: Normalize (1/iter_size), Regularize (L2 or L1 decay),
                              ComputeUpdateValue (SGD, Nesterov, AdaGrad, ...);
    then w -= update for every param.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError, shortened
from ..net import CaffeNet
from .policies import check_policy, learning_rate

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
LEGACY_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}

f32 = np.float32


def solver_type(param, where: str = "solver") -> str:
    """The solver type, after Caffe's UpgradeSolverType (legacy `solver_type` enum)."""
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise CaffeCompatError(f"{where}: give either type (string) or the legacy solver_type (enum), "
                                   f"not both")
        return LEGACY_SOLVER_TYPES[param.solver_type]
    if param.type not in SOLVER_TYPES:
        raise CaffeCompatError(f"{where}: unknown solver type '{param.type}'; known: {', '.join(SOLVER_TYPES)}")
    return param.type


# Real-valued fields of the update arithmetic: one NaN or inf there makes every weight
# NaN at the first update (clip_gradients too: its comparison with NaN is never true).
FINITE_FIELDS = ("base_lr", "gamma", "power", "momentum", "momentum2", "weight_decay", "delta", "rms_decay",
                 "clip_gradients")


def check_solver(param, where: str = "solver") -> str:
    """Caffe's checks on a SolverParameter, as errors naming the field; returns the type."""
    kind = solver_type(param, where)
    for name in FINITE_FIELDS:
        value = getattr(param, name)
        if not math.isfinite(value):
            raise CaffeCompatError(f"{where}: {name} must be a finite number, got {value}")
    check_policy(param, where)
    if param.iter_size < 1:
        raise CaffeCompatError(f"{where}: iter_size must be >= 1, got {param.iter_size}")
    if param.average_loss < 1:
        raise CaffeCompatError(f"{where}: average_loss must be >= 1, got {param.average_loss}")
    if param.max_iter < 0:
        raise CaffeCompatError(f"{where}: max_iter must be >= 0, got {param.max_iter}")
    if param.display < 0 or param.snapshot < 0 or param.test_interval < 0:
        raise CaffeCompatError(f"{where}: display, snapshot and test_interval must be >= 0")
    if param.regularization_type not in ("L1", "L2"):
        raise CaffeCompatError(f"{where}: unknown regularization_type '{param.regularization_type}' "
                               f"(L1 or L2)")
    if kind in ("AdaGrad", "RMSProp") and param.momentum != 0:
        raise CaffeCompatError(f"{where}: momentum cannot be used with {kind} (got {param.momentum})")
    if kind == "Adam" and not (0 <= param.momentum < 1 and 0 <= param.momentum2 < 1):
        # Its bias correction sqrt(1 - momentum2^t) / (1 - momentum^t) is otherwise no real number.
        raise CaffeCompatError(f"{where}: Adam's momentum and momentum2 must lie in [0, 1), got "
                               f"{param.momentum:g} and {param.momentum2:g}")
    if kind == "RMSProp" and not 0 <= param.rms_decay < 1:
        raise CaffeCompatError(f"{where}: rms_decay must lie in [0, 1), got {param.rms_decay}")
    if param.snapshot and not param.HasField("snapshot_prefix"):
        raise CaffeCompatError(f"{where}: snapshot is {param.snapshot} but snapshot_prefix is missing")
    if param.snapshot_format != param.BINARYPROTO:
        raise CaffeCompatError(f"{where}: snapshot_format HDF5 is not supported; use BINARYPROTO")
    return kind



@dataclass
class LearnableParam:
    name: str
    tensor: torch.Tensor
    lr_mult: float
    decay_mult: float


def learnable_params(net: CaffeNet) -> List[LearnableParam]:
    """The params the solver updates, in Caffe's order. lr_mult 0 params are left out
    (Caffe computes no gradient for them and their update is 0) and stop requiring grad."""
    params = dict(net.named_parameters())
    result = []
    for name, (lr_mult, decay_mult) in net.param_multipliers.items():
        tensor = params[name]
        if lr_mult == 0:
            tensor.requires_grad_(False)
            continue
        result.append(LearnableParam(name, tensor, lr_mult, decay_mult))
    return result


class CaffeSolver:
    """Caffe's SGDSolver family on a list of params whose `.grad` holds Caffe's diffs."""

    def __init__(self, param, params: Sequence[LearnableParam], where: str = "solver"):
        self.kind = check_solver(param, where)
        self.param = param
        self.params = list(params)
        self.iter = 0
        self.current_step = 0
        slots = 2 if self.kind in ("AdaDelta", "Adam") else 1
        self.history = [[torch.zeros_like(p.tensor) for _ in range(slots)] for p in self.params]
    def learning_rate(self) -> float:
        """SGDSolver::GetLearningRate for the current iteration; advances `current_step`
        for multistep as Caffe does: call once per update."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return rate

    @torch.no_grad()
    def step(self) -> float:
        """One ApplyUpdate plus Net::Update; returns the rate used. Grads are consumed.
        The params sharing a decay and a rate (GoogLeNet: 116 params, 4 groups) are
        normalized, regularized and, for SGD, updated by one torch._foreach_* call each:
        the same operations on every param as one at a time, without Python per param."""
        rate = self.learning_rate()
        grads = [p.tensor.grad if p.tensor.grad is not None else torch.zeros_like(p.tensor) for p in self.params]
        self._clip(grads)
        groups: Dict[Tuple[float, float], List[int]] = {}
        # A float32 rate times lr_mult may overflow to inf, as in Caffe: the trainer's
        # check on the weights then reports it, in one line.
        with np.errstate(over="ignore"):
            for index, p in enumerate(self.params):
                local_decay = float(f32(self.param.weight_decay) * f32(p.decay_mult))
                groups.setdefault((local_decay, float(f32(rate) * f32(p.lr_mult))), []).append(index)
        for (local_decay, local_rate), indices in groups.items():
            weights = [self.params[i].tensor for i in indices]
            group_grads = [grads[i] for i in indices]
            if self.param.iter_size > 1:  # Normalize
                torch._foreach_mul_(group_grads, float(f32(1) / f32(self.param.iter_size)))
            if local_decay:  # Regularize
                decay = weights if self.param.regularization_type == "L2" else torch._foreach_sign(weights)
                torch._foreach_add_(group_grads, decay, alpha=local_decay)
            if self.kind == "SGD":  # ComputeUpdateValue and Net::Update; the history is the update
                history = [self.history[i][0] for i in indices]
                torch._foreach_mul_(history, float(self.param.momentum))
                torch._foreach_add_(history, group_grads, alpha=local_rate)
                torch._foreach_sub_(weights, history)
                continue
            updates = [self._update_value(grads[i], self.history[i], local_rate) for i in indices]
            torch._foreach_sub_(weights, updates)
        self.iter += 1
        return rate

    def skip(self) -> float:
        """An iteration without an update (fp16 overflow): the rate and iteration advance as for one."""
        rate = self.learning_rate()
        self.iter += 1
        return rate

    def _clip(self, grads: List[torch.Tensor]) -> None:
        clip = float(self.param.clip_gradients)
        if clip < 0 or not grads:
            return
        sumsq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        norm = float(torch.sqrt(sumsq))
        if norm > clip:
            scale = float(f32(clip) / f32(norm))
            for g in grads:
                g.mul_(scale)

    def _update_value(self, grad: torch.Tensor, history: List[torch.Tensor], local_rate: float) -> torch.Tensor:
        """ComputeUpdateValue of each solver but SGD (done in `step`): the value Net::Update subtracts."""
        prm = self.param
        momentum = float(prm.momentum)
        delta = float(prm.delta)
        h = history[0]
        if self.kind == "Nesterov":
            previous = h.clone()
            h.mul_(momentum).add_(grad, alpha=local_rate)
            return h * (1 + momentum) - previous * momentum
        if self.kind == "AdaGrad":
            h.add_(grad * grad)
            return grad / (h.sqrt() + delta) * local_rate
        if self.kind == "RMSProp":
            decay = float(prm.rms_decay)
            h.mul_(decay).add_(grad * grad, alpha=1 - decay)
            return grad / (h.sqrt() + delta) * local_rate
        if self.kind == "AdaDelta":
            updates_history = history[1]
            h.mul_(momentum).add_(grad * grad, alpha=1 - momentum)
            step = grad * ((updates_history + delta) / (h + delta)).sqrt()
            updates_history.mul_(momentum).add_(step * step, alpha=1 - momentum)
            return step * local_rate
        # Adam: history[0] is m, history[1] is v; t counts from 1.
        beta1, beta2 = momentum, float(prm.momentum2)
        v = history[1]
        t = self.iter + 1
        correction = float(f32(math.sqrt(1 - math.pow(beta2, t)) / (1 - math.pow(beta1, t))))  # double, as Caffe
        h.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).add_(grad * grad, alpha=1 - beta2)
        return h / (v.sqrt() + delta) * float(f32(local_rate) * f32(correction))

    def state_dict(self) -> dict:
        return {"type": self.kind, "iter": self.iter, "current_step": self.current_step,
                "history": {p.name: [h.detach().cpu().clone() for h in hist]
                            for p, hist in zip(self.params, self.history)}}

    def load_state_dict(self, state: dict, where: str = "solver state") -> None:
        if state.get("type") != self.kind:
            raise CaffeCompatError(f"{where}: written by a {shortened(str(state.get('type')))} solver, this one is "
                                   f"{self.kind}")
        saved = state["history"]
        names = [p.name for p in self.params]
        if sorted(saved) != sorted(names):
            raise CaffeCompatError(f"{where}: its learnable params ({', '.join(sorted(saved))}) differ from "
                                   f"the net's ({', '.join(sorted(names))})")
        for p, hist in zip(self.params, self.history):
            if len(saved[p.name]) != len(hist):
                raise CaffeCompatError(f"{where}: {len(saved[p.name])} history blobs for {p.name}, a {self.kind} "
                                       f"solver keeps {len(hist)}")
            for target, value in zip(hist, saved[p.name]):
                if tuple(value.shape) != tuple(target.shape):
                    raise CaffeCompatError(f"{where}: history of {p.name} has shape {tuple(value.shape)}, "
                                           f"the param {tuple(target.shape)}")
                target.copy_(value)
        self.iter = int(state["iter"])
        self.current_step = int(state["current_step"])
