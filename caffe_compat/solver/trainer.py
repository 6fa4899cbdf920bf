"""The training loop, as Caffe's Solver::Solve: forward/backward `iter_size` times,
display, update (caffe_compat.solver.rules), snapshot; test passes with TEST-phase nets
sharing the weights; SIGINT/SIGTERM stop at an iteration boundary with a snapshot;
`--resume` continues from a `.solverstate.pt` bit for bit.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
import torch

from ..data import (close_data_layers, data_layers, load_reader_states, parse_sampler, reader_states,
                    seed_data_layers, set_sampler, shard_data_layers)
from ..deploy import override_mean
from ..devices import resolve_device, solver_device
from ..errors import CaffeCompatError, printable
from ..io import atomic
from ..io.files import read_caffemodel, read_solver, weights_of, with_weights, write_caffemodel
from ..memory import keep_freed_memory
from ..net import CaffeNet
from .distributed import Distributed, distribute_lifted_losses
from .nets import build_net, net_source, share_weights, test_sources
from .outputs import (LogRow, check_snapshot_prefix, refuse_outputs_over_inputs, snapshot_prefix,
                      write_training_log)
from .precision import MEMORY_FORMATS, LossScaler, autocast, check_precision, losses_in_float32
from .progress import TrainProgress
from .rules import CaffeSolver, check_solver, learnable_params
from .state import STATE_FORMAT, STATE_VERSION, numpy_rng_state, read_state, set_numpy_rng_state

PathLike = Union[str, Path]


@dataclass
class TrainResult:
    iterations: int
    last_loss: Optional[float]
    stopped_early: bool
    snapshots: List[Path] = field(default_factory=list)
    stop_signal: Optional[int] = None  # the signal that stopped the run early


class _StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (torchrun stopping its workers) asks for a stop at the
    next iteration boundary, then a snapshot; a second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[int] = None  # the signal number once one came
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        # os.write, not print: a signal handler may interrupt a print in progress.
        os.write(2, b"caffe-compat: stopping after this iteration to write a snapshot "
                    b"(signal again to abort at once)\n")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Trainer:
    """Caffe's Solver::Solve for one solver prototxt."""

    def __init__(self, solver_path: PathLike, weights: Optional[PathLike] = None,
                 resume: Optional[PathLike] = None, device: Optional[str] = None,
                 max_iter: Optional[int] = None, sampler: Optional[str] = None,
                 log_path: Optional[PathLike] = None, output: Optional[PathLike] = None,
                 stream: Optional[TextIO] = None, allow_missing_weights: bool = False, precision: str = "fp32",
                 memory_format: Optional[str] = None, net: Optional[PathLike] = None,
                 mean_file: Optional[PathLike] = None, mean_values: Optional[Sequence[float]] = None):
        if weights is not None and resume is not None:
            raise CaffeCompatError("give --weights to fine-tune or --resume to continue, not both")
        self.solver_path = Path(solver_path)
        where = str(self.solver_path)
        self.param = read_solver(solver_path)
        if net is not None:  # in place of the solver's (the paper's names its authors' absolute path)
            for name in ("net", "net_param", "train_net", "train_net_param"):
                self.param.ClearField(name)
            self.param.net = str(net)
        if max_iter is not None:
            if max_iter < 0:
                raise CaffeCompatError(f"--max-iter must be >= 0, got {max_iter}")
            self.param.max_iter = max_iter
        check_solver(self.param, where)
        self.log_path = Path(log_path) if log_path is not None else None
        self.output = Path(output) if output is not None else None
        self._check_outputs(where)
        saved = (Path(resume), read_state(Path(resume))) if resume is not None else None  # a wrong file fails now
        if sampler is not None:
            parse_sampler(sampler, None, "--sampler")  # its spelling, before any work
        self.precision = precision
        self.loss_scaler = LossScaler() if precision == "fp16" else None
        self.stream = stream if stream is not None else sys.stdout
        self.dist = Distributed.from_env()
        self.device = resolve_device(device or solver_device(self.param.solver_mode == self.param.GPU,
                                                             self.param.device_id, where))
        if self.dist.active and self.device.type == "cuda":
            self.device = resolve_device(f"cuda:{self.dist.local_rank}")
            torch.cuda.set_device(self.device)
        self.memory_format = check_precision(precision, memory_format, self.device.type)
        seed = int(self.param.random_seed)
        if seed >= 0:
            torch.manual_seed(seed)  # same fillers on every rank
            np.random.seed(seed % 2 ** 32)

        train_source, self.net_file = net_source(self.param, where)
        test_nets = test_sources(self.param, (train_source, self.net_file), where)
        for net_file in {id(f): f for f in [self.net_file] + [f for _, f in test_nets]}.values():
            override_mean(net_file.net, mean_file, mean_values)
        # A stop (Ctrl-C) snapshots at any iteration; a resumed one at its first rewrites the same state.
        first = int(saved[1]["solver"]["iter"]) + 1 if saved is not None else 0
        refuse_outputs_over_inputs(self.solver_path, [("the train net", self.net_file)]
                                   + [("a test net", net_file) for _, net_file in test_nets],
                                   None if weights is None else Path(weights), None if saved is None else saved[0],
                                   (self.output, self.log_path), snapshot_prefix(self.param, self.solver_path),
                                   range(first, max(first, self.param.max_iter + 1)))
        train_state = self.param.train_state if self.param.HasField("train_state") else None
        self.net = build_net(self.net_file, "TRAIN", train_state, train_source, self.device)
        if not self.net.loss_terms:
            raise CaffeCompatError(f"{train_source}: the TRAIN net has no loss layer")
        self.test_nets: List[Tuple[CaffeNet, int]] = []
        for i, (description, net_file) in enumerate(test_nets):
            test_state = self.param.test_state[i] if self.param.test_state else None
            self.test_nets.append((build_net(net_file, "TEST", test_state, description, self.device),
                                   int(self.param.test_iter[i])))
        if weights is not None:
            self.net.load_caffe_weights(weights_of(read_caffemodel(weights)), source=str(weights),
                                        allow_missing=allow_missing_weights)
        if sampler is not None:
            takers = set_sampler(self.net, sampler)
            if not takers:
                raise CaffeCompatError(f"--sampler {sampler}: the TRAIN net has no ImageData layer")
        if self.dist.active:
            self.dist.init(self.device)
            shard_data_layers(self.net, self.dist.rank, self.dist.world_size)
            distribute_lifted_losses(self.net)
        if seed >= 0:
            seed_data_layers(self.net, seed + self.dist.rank)
            for i, (net, _) in enumerate(self.test_nets):
                seed_data_layers(net, seed + 1 + i)
            torch.manual_seed(seed + self.dist.rank)  # dropout and the like differ per rank, as Caffe's
        self.net.to(self.device, memory_format=MEMORY_FORMATS[self.memory_format])
        if self.precision != "fp32":
            losses_in_float32(self.net)
            for net, _ in self.test_nets:
                losses_in_float32(net)
        if self.dist.active:
            self.dist.broadcast_module(self.net)
        for net, _ in self.test_nets:
            net.to(self.device)
            share_weights(net, self.net)
        self.params = learnable_params(self.net)
        self.solver = CaffeSolver(self.param, self.params, where)
        self.log_rows: List[LogRow] = []
        # Caffe's average_loss window; kept in the solver state so a resumed run logs as a straight one.
        self.loss_window: List[float] = []
        self.smoothed_loss = 0.0
        self.images_per_iter = self._images_per_iteration()
        self.progress: Optional[TrainProgress] = None
        self.last_snapshot: Optional[Path] = None  # the newest solver state known good
        if saved is not None:
            self._restore(*saved)
            self.last_snapshot = saved[0]

    def _check_outputs(self, where: str) -> None:
        """Every path this run will write, checked before any training work."""
        if self.output is not None:
            atomic.check_writable(self.output, "--output")
        if self.log_path is not None:
            atomic.check_writable(self.log_path, "--log")
        if self.param.snapshot or self.param.snapshot_after_train:
            check_snapshot_prefix(snapshot_prefix(self.param, self.solver_path), where)

    # ---- running
    def run(self) -> TrainResult:
        param = self.param
        snapshots: List[Path] = []
        last_loss: Optional[float] = None
        stopped = False
        self.progress = TrainProgress(self.stream, self.solver.iter, param.max_iter, self.images_per_iter,
                                      param.display, enabled=self.is_root, average_loss=param.average_loss)
        self._announce()
        if self.device.type == "cpu":
            keep_freed_memory()
        try:
            with _StopRequest() as stop:
                while self.solver.iter < param.max_iter:
                    if self._agree(stop.requested is not None):
                        stopped = True
                        break
                    it = self.solver.iter
                    if param.test_interval and it % param.test_interval == 0 and (it > 0 or param.test_initialization):
                        self.test()
                    total, last_loss = self._forward_backward()
                    smoothed = self._smooth(total / param.iter_size, it)
                    if self.dist.active:
                        # Caffe's multi-GPU rule: the ranks' gradients are averaged.
                        self.dist.reduce_gradients(self.params, 1.0 / self.dist.world_size)
                    if self.loss_scaler is None or self.loss_scaler.unscale([p.tensor.grad for p in self.params]):
                        rate = self.solver.step()
                    else:
                        rate = self.solver.skip()
                        self._print(f"iteration {it}: fp16 gradients overflowed, update skipped; loss scale now "
                                    f"{self.loss_scaler.scale:g}")
                    self._stop_if_not_finite(it, last_loss, rate)
                    self.log_rows.append(LogRow(it, last_loss, rate, smoothed))
                    self.progress.iteration(it, last_loss, smoothed, rate)
                    if param.snapshot and self.solver.iter % param.snapshot == 0:
                        snapshots.append(self.snapshot())
            self.progress.close()
            if stopped:
                snapshots.append(self.snapshot())
                # Ranks stopped by another rank's signal report SIGTERM, as torchrun sends.
                return TrainResult(self.solver.iter, last_loss, True, snapshots, stop.requested or signal.SIGTERM)
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
            self.progress.close()
            self.progress = None
            close_data_layers(self.net)
            for net, _ in self.test_nets:
                close_data_layers(net)

    def _smooth(self, loss: float, it: int) -> float:
        """Solver::UpdateSmoothedLoss: the mean of the last average_loss losses. (Caffe counts
        the slot from the run's first iteration and restarts the window on resume; here it
        counts from iteration 0 and the window is restored, so resumed logs equal straight ones.)"""
        window, losses = self.param.average_loss, self.loss_window
        if len(losses) < window:
            losses.append(loss)
            self.smoothed_loss = (self.smoothed_loss * (len(losses) - 1) + loss) / len(losses)
        else:
            slot = it % window
            self.smoothed_loss += (loss - losses[slot]) / window
            losses[slot] = loss
        return self.smoothed_loss

    def _forward_backward(self) -> Tuple[float, float]:
        """iter_size forward/backward passes accumulating grads; (sum of losses, last loss)."""
        for p in self.params:
            p.tensor.grad = None
        total, last = 0.0, 0.0
        keep = [top for top, _ in self.net.loss_terms]
        for _ in range(self.param.iter_size):
            with autocast(self.device, self.precision):
                # Only the loss tops are kept: backward frees each activation once it is used.
                loss = self.net.loss(self.net.run({}, keep=keep))
            (loss * self.loss_scaler.scale if self.loss_scaler else loss).backward()
            last = float(loss.detach())
            if self.dist.active:  # the global lifted loss is the same on every rank anyway
                last = self.dist.mean(last, self.device)
            total += last
        return total, last

    def _stop_if_not_finite(self, it: int, loss: float, rate: float) -> None:
        """Stop at the first update that leaves NaN or inf in the weights, before any
        snapshot or output holds them: those on disk stay the last good ones."""
        layer = self.net.first_nonfinite_layer()
        if layer is None:
            return
        kept = (f"the last snapshot, {self.last_snapshot}, is kept" if self.last_snapshot is not None
                else "this run wrote no snapshot")
        raise CaffeCompatError(f"iteration {it}: the update left NaN/inf in the weights of layer '{layer}' "
                               f"(loss {loss:.6g}, lr {rate:g}); stopped without writing them, {kept} "
                               f"(lower base_lr, or set clip_gradients)")

    def _agree(self, flag: bool) -> bool:
        return self.dist.any(flag, self.device) if self.dist.active else flag

    def test(self) -> None:
        """Solver::Test: mean of every output of each test net over test_iter batches."""
        if not self.is_root:
            return
        for index, (net, iters) in enumerate(self.test_nets):
            sums: Dict[str, torch.Tensor] = {}
            total_loss = 0.0
            with torch.no_grad(), autocast(self.device, self.precision):
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
        rng = {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()}
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
            "smoothing": {"window": list(self.loss_window), "smoothed": self.smoothed_loss},
            "world_size": self.dist.world_size,
            **({"loss_scale": [self.loss_scaler.scale, self.loss_scaler.clean]} if self.loss_scaler else {}),
        }

    def load_state(self, path: PathLike) -> None:
        """Continue from the solver state at `path` (what snapshot() wrote)."""
        self._restore(Path(path), read_state(Path(path)))

    def _restore(self, path: Path, state: dict) -> None:
        if state["world_size"] != self.dist.world_size:
            raise CaffeCompatError(f"{path}: written by {state['world_size']} process(es), resumed with "
                                   f"{self.dist.world_size}; the data positions would not line up")
        readers = state["readers"]
        if len(readers["train"]) != self.dist.world_size or len(readers["test"]) != len(self.test_nets):
            raise CaffeCompatError(f"{path}: damaged solver state: key 'readers' holds {len(readers['train'])} "
                                   f"train and {len(readers['test'])} test reader sets, the run needs "
                                   f"{self.dist.world_size} and {len(self.test_nets)}")
        weights = {name: [t.numpy() for t in blobs] for name, blobs in state["weights"].items()}
        _check_same_blobs(weights, self.net.caffe_weights(), f"{path}: key 'weights'")
        self.net.load_caffe_weights(weights)
        self.solver.load_state_dict(state["solver"], str(path))
        for hist in self.solver.history:
            for h in hist:
                h.data = h.data.to(self.device)
        load_reader_states(self.net, readers["train"][self.dist.rank], str(path))
        for (net, _), net_readers in zip(self.test_nets, readers["test"]):
            load_reader_states(net, net_readers, str(path))
        torch.set_rng_state(state["rng"]["torch"])
        set_numpy_rng_state(state["rng"]["numpy"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log_rows = [LogRow(int(i), float(loss), float(lr), float(smoothed)) for i, loss, lr, smoothed in state["log"]]
        self.loss_window = [float(v) for v in state["smoothing"]["window"]][:self.param.average_loss]
        self.smoothed_loss = float(state["smoothing"]["smoothed"])
        if self.loss_scaler is not None and "loss_scale" in state:
            self.loss_scaler.scale, self.loss_scaler.clean = state["loss_scale"]

    def snapshot(self) -> Path:
        """Write <prefix>_iter_<N>.caffemodel and .solverstate.pt (rank 0); returns the state path."""
        base = f"{snapshot_prefix(self.param, self.solver_path)}_iter_{self.solver.iter}"
        state = self.state_dict()  # every rank takes part in gathering reader states
        state_path = Path(base + ".solverstate.pt")
        if self.is_root:
            self.write_caffemodel(base + ".caffemodel")
            with atomic.atomic_file(state_path) as handle:
                torch.save(state, handle)
            self._write_log()
            self._print(f"Snapshotting to {base}.caffemodel and {state_path}")
        self.last_snapshot = state_path
        return state_path

    def write_caffemodel(self, path: PathLike) -> None:
        # Training checks every update; this catches weights that were never trained
        # (--max-iter 0, or a resume at max_iter) and came in holding NaN or inf.
        layer = self.net.first_nonfinite_layer()
        if layer is not None:
            raise CaffeCompatError(f"{path}: not written: the weights of layer '{layer}' hold NaN/inf")
        write_caffemodel(with_weights(self.net_file.net, self.net.caffe_weights()), path)

    def _write_log(self) -> None:
        if self.log_path is not None and self.is_root:
            write_training_log(self.log_path, self.log_rows)

    # ---- output
    @property
    def is_root(self) -> bool:
        return self.dist.rank == 0

    def _print(self, line: str) -> None:
        line = printable(line)  # net, blob and file names in it come from the user's files
        if self.progress is not None:
            self.progress.print(line)
        elif self.is_root:
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


def _check_same_blobs(saved: Dict[str, list], expected: Dict[str, list], where: str) -> None:
    """The saved weights cover exactly the net's layers, blob for blob, shape for shape."""
    if sorted(saved) != sorted(expected):
        raise CaffeCompatError(f"{where}: its layers ({', '.join(sorted(saved))}) differ from the net's "
                               f"({', '.join(sorted(expected))})")
    for name, blobs in expected.items():
        shapes = [tuple(b.shape) for b in saved[name]]
        if shapes != [tuple(b.shape) for b in blobs]:
            raise CaffeCompatError(f"{where}: layer '{name}' has blob shapes {shapes}, the net "
                                   f"{[tuple(b.shape) for b in blobs]}")




def train(solver_path: PathLike, weights: Optional[PathLike] = None, resume: Optional[PathLike] = None,
          device: Optional[str] = None, max_iter: Optional[int] = None, output: Optional[PathLike] = None,
          log_path: Optional[PathLike] = None, sampler: Optional[str] = None,
          stream: Optional[TextIO] = None, allow_missing_weights: bool = False, precision: str = "fp32",
          memory_format: Optional[str] = None, net: Optional[PathLike] = None,
          mean_file: Optional[PathLike] = None, mean_values: Optional[Sequence[float]] = None) -> TrainResult:
    """Train as `caffe train --solver=SOLVER [--weights W | --snapshot S]` would."""
    dist = Distributed.from_env()
    try:
        with warnings.catch_warnings():
            # Layers of the weights file that the TRAIN net lacks are normal when fine-tuning.
            warnings.filterwarnings("ignore", message="weights for layers not in the")
            trainer = Trainer(solver_path, weights=weights, resume=resume, device=device, max_iter=max_iter,
                              sampler=sampler, log_path=log_path, output=output, stream=stream,
                              allow_missing_weights=allow_missing_weights, precision=precision,
                              memory_format=memory_format, net=net, mean_file=mean_file, mean_values=mean_values)
        return trainer.run()
    finally:
        if dist.active:
            dist.shutdown()
