"""Training as Caffe's solvers train: the same update arithmetic (not torch.optim), the
same learning-rate policies, iter_size accumulation, gradient clipping, test passes,
snapshots and display, driven by a SolverParameter prototxt.

`CaffeSolver` is the arithmetic: per iteration, as SGDSolver::ApplyUpdate,
    rate = lr_policy(iter); ClipGradients();
    for each learnable param: Normalize (1/iter_size), Regularize (L2 or L1 decay),
                              ComputeUpdateValue (SGD, Nesterov, AdaGrad, ...);
    then w -= update for every param.
`Trainer` is Solver::Step around it: forward/backward `iter_size` times, display, update,
snapshot; test passes with TEST-phase nets sharing the weights.

Snapshots are `<prefix>_iter_<N>.caffemodel` (Caffe's file) and
`<prefix>_iter_<N>.solverstate.pt`: weights, solver history, iteration, RNG states and
data-reader positions as plain dicts, lists and tensors (`torch.load(weights_only=True)`),
so a resumed run continues bit for bit.

Several processes (`torchrun --nproc-per-node K -m caffe_compat train ...`): each reads
its block of every global batch (see caffe_compat.layers.data), the lifted loss is
computed over the gathered global batch, and gradients are all-reduced so that K
processes with batch b update exactly as one process with batch K*b.
"""
from __future__ import annotations

import csv
import io
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
import torch
from torch import nn

from .errors import CaffeCompatError
from .graph import build_graph
from .io import atomic
from .io.files import NetFile, read_caffemodel, read_prototxt, read_solver, weights_of, with_weights, write_caffemodel
from .layers.data import (close_data_layers, data_layers, load_reader_states, reader_states, seed_data_layers,
                          set_sampler, shard_data_layers)
from .net import CaffeNet

PathLike = Union[str, Path]

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
LEGACY_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
STATE_FORMAT = "caffe-compat solverstate"
STATE_VERSION = 1
LIFTED_LOSS_TYPE = "LiftedStructSimilaritySoftmaxLoss"

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


def check_solver(param, where: str = "solver") -> str:
    """Caffe's checks on a SolverParameter, as errors naming the field; returns the type."""
    kind = solver_type(param, where)
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
    if kind == "RMSProp" and not 0 <= param.rms_decay < 1:
        raise CaffeCompatError(f"{where}: rms_decay must lie in [0, 1), got {param.rms_decay}")
    if param.snapshot and not param.HasField("snapshot_prefix"):
        raise CaffeCompatError(f"{where}: snapshot is {param.snapshot} but snapshot_prefix is missing")
    if param.snapshot_format != param.BINARYPROTO:
        raise CaffeCompatError(f"{where}: snapshot_format HDF5 is not supported; use BINARYPROTO")
    return kind


# ---------------------------------------------------------------------------------------
# the update arithmetic

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
        """SGDSolver::GetLearningRate for the current iteration (float32, as Caffe's Dtype).
        Advances `current_step` for multistep exactly as Caffe does: call once per update."""
        p, it = self.param, self.iter
        base_lr = float(p.base_lr)
        policy = p.lr_policy
        if policy == "fixed":
            rate = base_lr
        elif policy == "step":
            self.current_step = it // p.stepsize
            rate = base_lr * math.pow(p.gamma, self.current_step)
        elif policy == "exp":
            rate = base_lr * math.pow(p.gamma, it)
        elif policy == "inv":
            rate = f32(base_lr) * np.power(f32(1) + f32(p.gamma) * f32(it), -f32(p.power))
        elif policy == "multistep":
            if self.current_step < len(p.stepvalue) and it >= p.stepvalue[self.current_step]:
                self.current_step += 1
            rate = base_lr * math.pow(p.gamma, self.current_step)
        elif policy == "poly":
            rate = f32(base_lr) * np.power(f32(1) - f32(it) / f32(p.max_iter), f32(p.power))
        else:  # sigmoid
            rate = f32(base_lr) * (f32(1) / (f32(1) + np.exp(-f32(p.gamma) * (f32(it) - f32(p.stepsize)))))
        return float(f32(rate))

    @torch.no_grad()
    def step(self) -> float:
        """One ApplyUpdate plus Net::Update; returns the rate used. Grads are consumed."""
        rate = self.learning_rate()
        grads = [p.tensor.grad if p.tensor.grad is not None else torch.zeros_like(p.tensor) for p in self.params]
        self._clip(grads)
        updates = []
        for p, grad, history in zip(self.params, grads, self.history):
            self._normalize(grad)
            self._regularize(p, grad)
            updates.append(self._update_value(p, grad, history, rate))
        for p, update in zip(self.params, updates):
            p.tensor.sub_(update)
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

    def _normalize(self, grad: torch.Tensor) -> None:
        if self.param.iter_size > 1:
            grad.mul_(float(f32(1) / f32(self.param.iter_size)))

    def _regularize(self, p: LearnableParam, grad: torch.Tensor) -> None:
        local_decay = float(f32(self.param.weight_decay) * f32(p.decay_mult))
        if not local_decay:
            return
        if self.param.regularization_type == "L2":
            grad.add_(p.tensor, alpha=local_decay)
        else:
            grad.add_(torch.sign(p.tensor), alpha=local_decay)

    def _update_value(self, p: LearnableParam, grad: torch.Tensor, history: List[torch.Tensor],
                      rate: float) -> torch.Tensor:
        """ComputeUpdateValue of each solver: the value Net::Update subtracts."""
        prm = self.param
        local_rate = float(f32(rate) * f32(p.lr_mult))
        momentum = float(prm.momentum)
        delta = float(prm.delta)
        h = history[0]
        if self.kind == "SGD":
            h.mul_(momentum).add_(grad, alpha=local_rate)
            return h.clone()
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
            raise CaffeCompatError(f"{where}: written by a {state.get('type')} solver, this one is {self.kind}")
        saved = state["history"]
        names = [p.name for p in self.params]
        if sorted(saved) != sorted(names):
            raise CaffeCompatError(f"{where}: its learnable params ({', '.join(sorted(saved))}) differ from "
                                   f"the net's ({', '.join(sorted(names))})")
        for p, hist in zip(self.params, self.history):
            for target, value in zip(hist, saved[p.name]):
                if tuple(value.shape) != tuple(target.shape):
                    raise CaffeCompatError(f"{where}: history of {p.name} has shape {tuple(value.shape)}, "
                                           f"the param {tuple(target.shape)}")
                target.copy_(value)
        self.iter = int(state["iter"])
        self.current_step = int(state["current_step"])


# ---------------------------------------------------------------------------------------
# several processes

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast_module(self, module: nn.Module) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, 0)

    def reduce_gradients(self, params: Sequence[LearnableParam], scale: float) -> None:
        """All-reduce (sum) the grads in one flat buffer, then multiply by `scale`."""
        import torch.distributed as dist

        grads = [p.tensor.grad if p.tensor.grad is not None else torch.zeros_like(p.tensor) for p in params]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.mul_(scale)
        offset = 0
        for p, g in zip(params, grads):
            p.tensor.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, value: float, device: torch.device) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        import torch.distributed as dist

        tensor = torch.tensor([int(flag)], device=device)
        dist.all_reduce(tensor)
        return bool(tensor.item())

    def gather(self, obj) -> list:
        import torch.distributed as dist

        result = [None] * self.world_size
        dist.all_gather_object(result, obj)
        return result

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _distribute_lifted_losses(net: CaffeNet) -> int:
    """Swap every lifted loss for the variant over the all-gathered global batch. Its
    backward scales each rank's share by the world size, so averaging the ranks'
    gradients (as for every other loss) gives the single-process gradient."""
    from .losses.distributed import DistributedLiftedStructSimilaritySoftmaxLoss

    swapped = 0
    for node in net.graph.layers:
        if node.type != LIFTED_LOSS_TYPE:
            continue
        module_name = net.module_names[node.name]
        local = net.layers[module_name]
        net.layers[module_name] = DistributedLiftedStructSimilaritySoftmaxLoss(
            margin=local.margin, caffe_exact=local.caffe_exact, ddp_average=True)
        swapped += 1
    return swapped


# ---------------------------------------------------------------------------------------
# the training loop

@dataclass
class TrainResult:
    iterations: int
    last_loss: Optional[float]
    stopped_early: bool
    snapshots: List[Path] = field(default_factory=list)


class _StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (torchrun stopping its workers) asks for a stop at the
    next iteration boundary, then a snapshot; a second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a signal handler may interrupt a print in progress.
        os.write(2, b"caffe-compat: stopping after this iteration to write a snapshot "
                    b"(signal again to abort at once)\n")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _net_source(param, where: str) -> Tuple[str, object]:
    """(description, NetFile) of the train net: exactly one of net, net_param, train_net, train_net_param."""
    given = [f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)]
    if not given:
        raise CaffeCompatError(f"{where}: no train net; set `net: \"NET.prototxt\"` (or net_param, train_net, "
                               f"train_net_param)")
    if len(given) > 1:
        raise CaffeCompatError(f"{where}: give one train net, not {' and '.join(given)}")
    name = given[0]
    if name in ("net", "train_net"):
        path = getattr(param, name)
        if not Path(path).exists():
            raise CaffeCompatError(f"{where}: {name} '{path}' does not exist (paths in a solver are relative "
                                   f"to the working directory {os.getcwd()}, as in Caffe)")
        return path, read_prototxt(path)
    return f"{where}: {name}", NetFile(getattr(param, name), "bvlc", Path(where))


def _test_sources(param, train: Tuple[str, NetFile], where: str) -> List[Tuple[str, NetFile]]:
    """One (description, NetFile) per test_iter entry, in Caffe's order."""
    sources = [(f"{where}: test_net_param {i}", NetFile(p, "bvlc", Path(where)))
               for i, p in enumerate(param.test_net_param)]
    for path in param.test_net:
        if not Path(path).exists():
            raise CaffeCompatError(f"{where}: test_net '{path}' does not exist")
        sources.append((path, read_prototxt(path)))
    generic = param.HasField("net") or param.HasField("net_param")
    if len(param.test_iter) < len(sources) or (not generic and len(param.test_iter) != len(sources)):
        raise CaffeCompatError(f"{where}: test_iter must be given once per test net ({len(sources)} test nets, "
                               f"{len(param.test_iter)} test_iter)")
    sources += [train] * (len(param.test_iter) - len(sources))
    if sources and param.test_interval <= 0:
        raise CaffeCompatError(f"{where}: test nets need test_interval > 0")
    if param.test_state and len(param.test_state) != len(sources):
        raise CaffeCompatError(f"{where}: test_state must be given once per test net or not at all")
    return sources


def _state_of(net_file: NetFile, override) -> Tuple[int, List[str]]:
    """(level, stages): the net's own NetState, overridden by the solver's train/test_state."""
    state = net_file.net.state
    level = override.level if override is not None and override.HasField("level") else state.level
    stages = list(override.stage) if override is not None and len(override.stage) else list(state.stage)
    return level, stages


def _build_net(net_file: NetFile, phase: str, override, where: str) -> CaffeNet:
    level, stages = _state_of(net_file, override)
    graph = build_graph(net_file.net, phase, net_file.dialect, level, stages)
    if graph.inputs:
        raise CaffeCompatError(f"{where}: the {phase} net reads Input blobs ({', '.join(graph.inputs)}); "
                               f"training needs data layers (Data or ImageData) instead")
    return CaffeNet(graph)


def _share_weights(target: CaffeNet, source: CaffeNet) -> None:
    """Caffe's ShareTrainedLayersWith: blobs of same-named layers become the same tensors."""
    for module_name, module in target.layers.items():
        other_name = source.module_names.get(target.layer_names[module_name])
        names = getattr(module, "blob_names", ())
        if other_name is None or not names:
            continue
        other = source.layers[other_name]
        for attr, other_attr in zip(names, other.blob_names):
            mine, theirs = getattr(module, attr), getattr(other, other_attr)
            if tuple(mine.shape) != tuple(theirs.shape):
                raise CaffeCompatError(f"layer '{target.layer_names[module_name]}': blob shape "
                                       f"{tuple(mine.shape)} in the TEST net, {tuple(theirs.shape)} in TRAIN")
            setattr(module, attr, theirs)


def _check_writable(prefix: str, where: str) -> None:
    """Fail now, not at the first snapshot hours later (Caffe's CheckSnapshotWritePermissions)."""
    folder = Path(prefix).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaffeCompatError(f"{where}: snapshot_prefix '{prefix}': cannot create {folder}: "
                               f"{err.strerror or err}") from None
    if not os.access(folder, os.W_OK):
        raise CaffeCompatError(f"{where}: snapshot_prefix '{prefix}': {folder} is not writable")


def _default_device(param) -> str:
    return "cuda" if param.solver_mode == param.GPU and torch.cuda.is_available() else "cpu"


def _numpy_rng_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _set_numpy_rng_state(state) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class Trainer:
    """Caffe's Solver::Solve for one solver prototxt."""

    def __init__(self, solver_path: PathLike, weights: Optional[PathLike] = None,
                 resume: Optional[PathLike] = None, device: Optional[str] = None,
                 max_iter: Optional[int] = None, sampler: Optional[str] = None,
                 log_path: Optional[PathLike] = None, output: Optional[PathLike] = None,
                 stream: Optional[TextIO] = None):
        if weights is not None and resume is not None:
            raise CaffeCompatError("give --weights to fine-tune or --resume to continue, not both")
        self.solver_path = Path(solver_path)
        where = str(self.solver_path)
        self.param = read_solver(solver_path)
        if max_iter is not None:
            if max_iter < 0:
                raise CaffeCompatError(f"--max-iter must be >= 0, got {max_iter}")
            self.param.max_iter = max_iter
        check_solver(self.param, where)
        self.log_path = Path(log_path) if log_path is not None else None
        self.output = Path(output) if output is not None else None
        self.stream = stream if stream is not None else sys.stdout
        self.dist = Distributed.from_env()
        device_name = device or _default_device(self.param)
        if device_name.startswith("cuda") and not torch.cuda.is_available():
            raise CaffeCompatError(f"--device {device_name}: CUDA is not available here")
        if self.dist.active and device_name.startswith("cuda"):
            device_name = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(self.dist.local_rank)
        self.device = torch.device(device_name)
        seed = int(self.param.random_seed)
        if seed >= 0:
            torch.manual_seed(seed)  # same fillers on every rank
            np.random.seed(seed % 2 ** 32)

        train_source, self.net_file = _net_source(self.param, where)
        test_sources = _test_sources(self.param, (train_source, self.net_file), where)
        train_state = self.param.train_state if self.param.HasField("train_state") else None
        self.net = _build_net(self.net_file, "TRAIN", train_state, train_source)
        if not self.net.loss_terms:
            raise CaffeCompatError(f"{train_source}: the TRAIN net has no loss layer")
        self.test_nets: List[Tuple[CaffeNet, int]] = []
        for i, (description, net_file) in enumerate(test_sources):
            test_state = self.param.test_state[i] if self.param.test_state else None
            self.test_nets.append((_build_net(net_file, "TEST", test_state, description), int(self.param.test_iter[i])))
        if weights is not None:
            self.net.load_caffe_weights(weights_of(read_caffemodel(weights)))
        if sampler is not None:
            takers = set_sampler(self.net, sampler)
            if not takers:
                raise CaffeCompatError(f"--sampler {sampler}: the TRAIN net has no ImageData layer")
        if self.dist.active:
            self.dist.init(self.device)
            shard_data_layers(self.net, self.dist.rank, self.dist.world_size)
            _distribute_lifted_losses(self.net)
        if seed >= 0:
            seed_data_layers(self.net, seed + self.dist.rank)
            for i, (net, _) in enumerate(self.test_nets):
                seed_data_layers(net, seed + 1 + i)
            torch.manual_seed(seed + self.dist.rank)  # dropout and the like differ per rank, as Caffe's
        if self.param.snapshot or self.param.snapshot_after_train:
            _check_writable(self.param.snapshot_prefix, where)
        self.net.to(self.device)
        if self.dist.active:
            self.dist.broadcast_module(self.net)
        for net, _ in self.test_nets:
            net.to(self.device)
            _share_weights(net, self.net)
        self.params = learnable_params(self.net)
        self.solver = CaffeSolver(self.param, self.params, where)
        self.log_rows: List[Tuple[int, float, float]] = []
        self.images_per_iter = self._images_per_iteration()
        if resume is not None:
            self.load_state(resume)

    # ---- running
    def run(self) -> TrainResult:
        param = self.param
        snapshots: List[Path] = []
        losses: List[float] = []
        smoothed = 0.0
        start_iter = self.solver.iter
        last_loss: Optional[float] = None
        stopped = False
        self._announce()
        window_start, window_iters = time.perf_counter(), 0
        try:
            with _StopRequest() as stop:
                while self.solver.iter < param.max_iter:
                    if self._agree(stop.requested):
                        stopped = True
                        break
                    it = self.solver.iter
                    if param.test_interval and it % param.test_interval == 0 and (it > 0 or param.test_initialization):
                        self.test()
                    total, last_loss = self._forward_backward()
                    smoothed = _smoothed_loss(losses, smoothed, total / param.iter_size, it - start_iter,
                                              param.average_loss)
                    if self.dist.active:
                        # Caffe's multi-GPU rule: the ranks' gradients are averaged.
                        self.dist.reduce_gradients(self.params, 1.0 / self.dist.world_size)
                    rate = self.solver.step()
                    self.log_rows.append((it, last_loss, rate))
                    window_iters += 1
                    elapsed = time.perf_counter() - window_start
                    self._progress(it, last_loss, smoothed, rate, window_iters / elapsed if elapsed else 0.0)
                    if param.display and it % param.display == 0:
                        window_start, window_iters = time.perf_counter(), 0
                    if param.snapshot and self.solver.iter % param.snapshot == 0:
                        snapshots.append(self.snapshot())
            if self.stream_is_tty:
                self._print("")
            if stopped:
                snapshots.append(self.snapshot())
                self._print(f"stopped at iteration {self.solver.iter}: resume with --resume {snapshots[-1]}")
                return TrainResult(self.solver.iter, last_loss, True, snapshots)
            if param.snapshot_after_train and (not param.snapshot or self.solver.iter % param.snapshot != 0):
                snapshots.append(self.snapshot())
            if param.test_interval and self.solver.iter % param.test_interval == 0 and self.test_nets:
                self.test()
            if self.output is not None and self.is_root:
                self.write_caffemodel(self.output)
                self._print(f"wrote {self.output}")
            self._write_log()
            return TrainResult(self.solver.iter, last_loss, False, snapshots)
        finally:
            close_data_layers(self.net)
            for net, _ in self.test_nets:
                close_data_layers(net)

    def _forward_backward(self) -> Tuple[float, float]:
        """iter_size forward/backward passes accumulating grads; (sum of losses, last loss)."""
        for p in self.params:
            p.tensor.grad = None
        total, last = 0.0, 0.0
        for _ in range(self.param.iter_size):
            blobs = self.net.run({})
            loss = self.net.loss(blobs)
            loss.backward()
            last = float(loss.detach())
            if self.dist.active:  # the global lifted loss is the same on every rank anyway
                last = self.dist.mean(last, self.device)
            total += last
        return total, last

    def _agree(self, flag: bool) -> bool:
        return self.dist.any(flag, self.device) if self.dist.active else flag

    def test(self) -> None:
        """Solver::Test: mean of every output of each test net over test_iter batches."""
        if not self.is_root:
            return
        for index, (net, iters) in enumerate(self.test_nets):
            sums: Dict[str, torch.Tensor] = {}
            total_loss = 0.0
            with torch.no_grad():
                for _ in range(iters):
                    blobs = net.run({})
                    if self.param.test_compute_loss and net.loss_terms:
                        total_loss += float(net.loss(blobs))
                    for name in net.output_names:
                        value = blobs[name].detach().double().reshape(-1)
                        sums[name] = sums[name] + value if name in sums else value
            self._print(f"Iteration {self.solver.iter}, Testing net (#{index})")
            if self.param.test_compute_loss:
                self._print(f"    Test loss: {total_loss / max(iters, 1):.6g}")
            weights = dict(net.loss_terms)
            for name, total in sums.items():
                mean = (total / max(iters, 1)).cpu()
                if mean.numel() > 16:
                    self._print(f"    Test net output: {name} ({mean.numel()} values, mean {float(mean.mean()):.6g})")
                    continue
                for k, value in enumerate(mean.tolist()):
                    suffix = f" (* {weights[name]:g} = {weights[name] * value:.6g} loss)" if name in weights else ""
                    label = name if mean.numel() == 1 else f"{name}[{k}]"
                    self._print(f"    Test net output: {label} = {value:.6g}{suffix}")

    # ---- snapshots
    def state_dict(self) -> dict:
        states = reader_states(self.net)
        train_readers = self.dist.gather(states) if self.dist.active else [states]
        rng = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "solver": self.solver.state_dict(),
            "weights": {name: [torch.from_numpy(a) for a in arrays]
                        for name, arrays in self.net.caffe_weights().items()},
            "rng": rng,
            "readers": {"train": train_readers, "test": [reader_states(net) for net, _ in self.test_nets]},
            "log": [list(row) for row in self.log_rows],
            "world_size": self.dist.world_size,
        }

    def load_state(self, path: PathLike) -> None:
        path = Path(path)
        if not path.exists():
            raise CaffeCompatError(f"--resume {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file
            raise CaffeCompatError(f"{path}: not a caffe-compat solver state: {err}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CaffeCompatError(f"{path}: not a caffe-compat solver state (a .solverstate.pt written by train)")
        if state["world_size"] != self.dist.world_size:
            raise CaffeCompatError(f"{path}: written by {state['world_size']} process(es), resumed with "
                                   f"{self.dist.world_size}; the data positions would not line up")
        self.net.load_caffe_weights({name: [t.numpy() for t in blobs] for name, blobs in state["weights"].items()})
        self.solver.load_state_dict(state["solver"], str(path))
        for hist in self.solver.history:
            for h in hist:
                h.data = h.data.to(self.device)
        load_reader_states(self.net, state["readers"]["train"][self.dist.rank])
        for (net, _), readers in zip(self.test_nets, state["readers"]["test"]):
            load_reader_states(net, readers)
        torch.set_rng_state(state["rng"]["torch"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log_rows = [(int(i), float(loss), float(lr)) for i, loss, lr in state["log"]]

    def snapshot(self) -> Path:
        """Write <prefix>_iter_<N>.caffemodel and .solverstate.pt (rank 0); returns the state path."""
        base = f"{self.param.snapshot_prefix}_iter_{self.solver.iter}"
        state = self.state_dict()  # every rank takes part in gathering reader states
        state_path = Path(base + ".solverstate.pt")
        if self.is_root:
            self.write_caffemodel(base + ".caffemodel")
            with atomic.atomic_path(state_path) as tmp:
                torch.save(state, tmp)
            self._write_log()
            self._print(f"Snapshotting to {base}.caffemodel and {state_path}")
        return state_path

    def write_caffemodel(self, path: PathLike) -> None:
        write_caffemodel(with_weights(self.net_file.net, self.net.caffe_weights()), path)

    def _write_log(self) -> None:
        if self.log_path is None or not self.is_root:
            return
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["iteration", "loss", "lr"])
        for it, loss, lr in self.log_rows:
            writer.writerow([it, repr(loss), repr(lr)])
        atomic.write_text(self.log_path, text.getvalue())

    # ---- output
    @property
    def is_root(self) -> bool:
        return self.dist.rank == 0

    @property
    def stream_is_tty(self) -> bool:
        return self.is_root and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _print(self, line: str) -> None:
        if self.is_root:
            print(line, file=self.stream, flush=True)

    def _images_per_iteration(self) -> Optional[int]:
        layers = data_layers(self.net)
        if not layers:
            return None
        return layers[0][1].batch_size * self.param.iter_size * self.dist.world_size

    def _announce(self) -> None:
        world = f", {self.dist.world_size} processes" if self.dist.active else ""
        self._print(f"Solving {self.net.graph.name or self.solver_path.name}: {self.solver.kind}, lr_policy "
                    f"{self.param.lr_policy}, iterations {self.solver.iter} to {self.param.max_iter}, "
                    f"device {self.device}{world}")

    def _progress(self, it: int, loss: float, smoothed: float, rate: float, iters_per_s: float) -> None:
        if not self.is_root:
            return
        speed = (f"{iters_per_s * self.images_per_iter:.1f} img/s" if self.images_per_iter
                 else f"{iters_per_s:.2f} it/s")
        text = f"iteration {it} loss {loss:.6g} (smoothed {smoothed:.6g}) lr {rate:.6g} {speed}"
        if self.stream_is_tty:
            done = (it + 1) / max(self.param.max_iter, 1)
            bar = "#" * int(done * 30)
            self.stream.write(f"\r[{bar:<30}] {it + 1}/{self.param.max_iter} {text}\x1b[K")
            self.stream.flush()
        elif self.param.display and it % self.param.display == 0:
            self._print(text)


def _smoothed_loss(losses: List[float], smoothed: float, loss: float, index: int, window: int) -> float:
    """Solver::UpdateSmoothedLoss: the mean of the last `window` losses."""
    if len(losses) < window:
        losses.append(loss)
        return (smoothed * (len(losses) - 1) + loss) / len(losses)
    slot = index % window
    smoothed += (loss - losses[slot]) / window
    losses[slot] = loss
    return smoothed


def train(solver_path: PathLike, weights: Optional[PathLike] = None, resume: Optional[PathLike] = None,
          device: Optional[str] = None, max_iter: Optional[int] = None, output: Optional[PathLike] = None,
          log_path: Optional[PathLike] = None, sampler: Optional[str] = None,
          stream: Optional[TextIO] = None) -> TrainResult:
    """Train as `caffe train --solver=SOLVER [--weights W | --snapshot S]` would."""
    dist = Distributed.from_env()
    try:
        with warnings.catch_warnings():
            # Layers of the weights file that the TRAIN net lacks are normal when fine-tuning.
            warnings.filterwarnings("ignore", message="weights for layers not in the")
            trainer = Trainer(solver_path, weights=weights, resume=resume, device=device, max_iter=max_iter,
                              sampler=sampler, log_path=log_path, output=output, stream=stream)
        return trainer.run()
    finally:
        if dist.active:
            dist.shutdown()
