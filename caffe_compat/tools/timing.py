"""`caffe-compat time` and `caffe-compat test`: BVLC's `caffe time` and `caffe test`
(tools/caffe.cpp), printing what they print.

`time` runs one warm-up forward and backward, then times each layer's forward and,
in reverse order, each layer's backward for every iteration, and prints the average
per layer and the totals. Each layer runs on its own copies of its bottoms, so its
backward is one autograd call that can be timed alone, as Caffe's Layer::Backward is.
`test` runs the TEST phase forward for N batches and prints each output blob per batch and
its mean over the batches, with the loss weight where the blob is a loss: a scalar blob's
value as Caffe prints it, a larger blob (an embedding) as its shape and mean, unless every
value is asked for (`all_values`, Caffe's own output: one line per element)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ..deploy import DATA_LAYER_TYPES, source_of
from ..devices import resolve_device
from ..errors import CaffeCompatError, printable
from ..graph import layer_included
from ..io.files import NetFile, read_prototxt
from ..memory import check_blob_memory

PathLike = Union[str, Path]
DEFAULT_ITERATIONS = 50  # caffe's --iterations default


def _with_batch_size(net_param, batch_size: int):
    """A copy of the net whose data layers and Input blobs hold `batch_size` items."""
    net = type(net_param)()
    net.CopyFrom(net_param)
    for layer in net.layer:
        for name in ("data_param", "image_data_param", "hdf5_data_param", "memory_data_param"):
            if layer.HasField(name):
                getattr(layer, name).batch_size = batch_size
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if len(shape.dim):
                    shape.dim[0] = batch_size
    for shape in net.input_shape:
        if len(shape.dim):
            shape.dim[0] = batch_size
    if len(net.input_dim) >= 4:
        for i in range(0, len(net.input_dim), 4):
            net.input_dim[i] = batch_size
    return net


def load_for_running(net_path: PathLike, weights: Optional[PathLike], phase: str, device: str,
                     batch_size: Optional[int] = None, need_data: bool = False):
    """(net on `device`, its Input blobs as zeros): Caffe's blobs start as zeros, and
    `caffe time` assumes a net fed by its own data layers or by nothing else."""
    from ..loading import load_net

    if batch_size is not None and batch_size < 1:
        raise CaffeCompatError(f"--batch-size {batch_size}: must be at least 1")
    net_file = read_prototxt(net_path)
    net_param = _with_batch_size(net_file.net, batch_size) if batch_size else net_file.net
    if need_data:
        for layer in net_param.layer:
            source = source_of(layer)
            if layer.type in DATA_LAYER_TYPES and source and layer_included(layer, phase) \
                    and not Path(source).exists():
                raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): source '{source}' is absent; "
                                       f"`test` scores the net on its {phase} data (paths resolve from the "
                                       f"working directory, as in Caffe)")
    dev = resolve_device(device)
    net = load_net(NetFile(net_param, net_file.dialect, net_file.path), weights, phase=phase).to(dev)
    check_blob_memory(net.blob_shapes, str(net_file.path), device=dev)
    inputs = {name: torch.zeros(net.blob_shapes[name], device=dev) for name in net.input_names}
    return net, inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Pass:
    """One forward pass run layer by layer, kept for the backward."""
    outputs: List[Tuple[torch.Tensor, ...]] = field(default_factory=list)  # per step, its tops
    bottoms: List[List[torch.Tensor]] = field(default_factory=list)  # per step, its own copies of its bottoms
    sources: List[List[Optional[Tuple[int, int]]]] = field(default_factory=list)  # (step, top) behind each bottom
    producer: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # blob -> (step, top) of its last value


def _forward(net, inputs: Dict[str, torch.Tensor], device: torch.device, times: List[float]) -> _Pass:
    values = dict(inputs)
    # As Caffe decides bottom_need_backward: a blob needs a gradient when a layer with
    # parameters lies upstream of it (or the net says force_backward).
    force = bool(getattr(net.graph.net, "force_backward", False))
    needs = {name: force and value.is_floating_point() for name, value in inputs.items()}
    run = _Pass()
    for step, (module_name, bottoms, tops) in enumerate(net._plan):
        module = net.layers[module_name]
        own = [values[b].detach().requires_grad_(needs.get(b, False) and values[b].is_floating_point())
               for b in bottoms]
        learns = any(p.requires_grad for p in module.parameters())
        for top in tops:
            needs[top] = learns or force or any(needs.get(b, False) for b in bottoms)
        run.sources.append([run.producer.get(b) for b in bottoms])
        _sync(device)
        start = time.perf_counter()
        out = module(*own)
        _sync(device)
        times[step] += time.perf_counter() - start
        out = (out,) if len(tops) == 1 else tuple(out)
        run.outputs.append(out)
        run.bottoms.append(own)
        for index, top in enumerate(tops):
            values[top] = out[index]
            run.producer[top] = (step, index)
    return run


def _backward(net, run: _Pass, device: torch.device, times: List[float]) -> None:
    grads: Dict[Tuple[int, int], torch.Tensor] = {}
    for top, weight in net.loss_terms:
        step, index = run.producer[top]
        grads[(step, index)] = torch.full_like(run.outputs[step][index], weight)
    for step in range(len(net._plan) - 1, -1, -1):
        module = net.layers[net._plan[step][0]]
        wanted = [(i, out) for i, out in enumerate(run.outputs[step])
                  if (step, i) in grads and out.requires_grad]
        bottoms = [(i, b) for i, b in enumerate(run.bottoms[step]) if b.requires_grad]
        params = [p for p in module.parameters() if p.requires_grad]
        if not wanted or not (bottoms or params):
            continue  # nothing flows back through this layer: Caffe's Backward returns at once
        _sync(device)
        start = time.perf_counter()
        found = torch.autograd.grad([out for _, out in wanted], [b for _, b in bottoms] + params,
                                    [grads[(step, i)] for i, _ in wanted], allow_unused=True)
        _sync(device)
        times[step] += time.perf_counter() - start
        for (i, _), grad in zip(bottoms, found):
            source = run.sources[step][i]
            if grad is not None and source is not None:
                grads[source] = grads[source] + grad if source in grads else grad


def time_net(net_path: PathLike, weights: Optional[PathLike] = None, iterations: int = DEFAULT_ITERATIONS,
             phase: str = "TRAIN", device: str = "cpu", batch_size: Optional[int] = None,
             emit: Callable[[str], None] = print) -> dict:
    """`caffe time`: per-layer average forward and backward times (ms), and totals."""
    if iterations < 1:
        raise CaffeCompatError(f"--iterations {iterations}: must be at least 1")
    net, inputs = load_for_running(net_path, weights, phase, device, batch_size)
    dev = resolve_device(device)
    names = [net.layer_names[module_name] for module_name, _, _ in net._plan]
    forward_ms, backward_ms = [0.0] * len(names), [0.0] * len(names)
    try:
        emit("Performing Forward")
        warm = _forward(net, inputs, dev, [0.0] * len(names))
        loss = sum(weight * float(warm.outputs[warm.producer[top][0]][warm.producer[top][1]].detach().sum())
                   for top, weight in net.loss_terms)
        emit(f"Initial loss: {loss:.6g}")
        emit("Performing Backward")
        _backward(net, warm, dev, [0.0] * len(names))
        del warm
        emit("*** Benchmark begins ***")
        emit(f"Testing for {iterations} iterations.")
        total_start = time.perf_counter()
        forward_total = backward_total = 0.0
        for iteration in range(iterations):
            iteration_start = time.perf_counter()
            run = _forward(net, inputs, dev, forward_ms)
            forward_done = time.perf_counter()
            _backward(net, run, dev, backward_ms)
            del run
            done = time.perf_counter()
            forward_total += forward_done - iteration_start
            backward_total += done - forward_done
            emit(f"Iteration: {iteration + 1} forward-backward time: {1000 * (done - iteration_start):.6g} ms.")
        total = time.perf_counter() - total_start
    finally:
        _close_data_layers(net)
    per_layer = [(name, 1000 * f / iterations, 1000 * b / iterations)
                 for name, f, b in zip(names, forward_ms, backward_ms)]
    emit("Average time per layer: ")
    for name, f, b in per_layer:
        name = printable(name)  # layer names come from the prototxt
        emit(f"{name:>10}\tforward: {f:.6g} ms.")
        emit(f"{name:>10}\tbackward: {b:.6g} ms.")
    summary = {"layers": per_layer, "forward_ms": 1000 * forward_total / iterations,
               "backward_ms": 1000 * backward_total / iterations, "forward_backward_ms": 1000 * total / iterations,
               "total_ms": 1000 * total}
    emit(f"Average Forward pass: {summary['forward_ms']:.6g} ms.")
    emit(f"Average Backward pass: {summary['backward_ms']:.6g} ms.")
    emit(f"Average Forward-Backward: {summary['forward_backward_ms']:.6g} ms.")
    emit(f"Total Time: {summary['total_ms']:.6g} ms.")
    emit("*** Benchmark ends ***")
    return summary


def score_net(net_path: PathLike, weights: PathLike, iterations: int = DEFAULT_ITERATIONS, phase: str = "TEST",
              device: str = "cpu", emit: Callable[[str], None] = print, all_values: bool = False) -> dict:
    """`caffe test`: N forward passes; each output blob per batch, then its mean
    ({blob: [mean per element]}) and the mean loss."""
    if iterations < 1:
        raise CaffeCompatError(f"--iterations {iterations}: must be at least 1")
    net, inputs = load_for_running(net_path, weights, phase, device, need_data=True)
    weights_of_top = dict(net.loss_terms)
    # Caffe's Net collects its outputs in a std::set of names: alphabetical order.
    output_names = sorted(net.output_names)
    sums: Dict[str, torch.Tensor] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    loss = 0.0
    emit(f"Running for {iterations} iterations.")
    try:
        with torch.inference_mode():
            for batch in range(iterations):
                outputs = net(**inputs)
                loss += sum(weight * float(outputs[top].sum()) for top, weight in net.loss_terms)
                for name in output_names:
                    shapes[name] = tuple(outputs[name].shape)
                    values = outputs[name].detach().double().reshape(-1).cpu()
                    sums[name] = sums[name] + values if name in sums else values
                    for line in _blob_lines(name, values, shapes[name], all_values):
                        emit(f"Batch {batch}, {line}")
    finally:
        _close_data_layers(net)
    emit(f"Loss: {loss / iterations:.6g}")
    means = {}
    for name, total in sums.items():
        mean = total / iterations
        means[name] = mean.tolist()
        weight = weights_of_top.get(name, 0.0)
        if total.numel() == 1 or all_values:
            for value in means[name]:
                note = f" (* {weight:g} = {weight * value:.6g} loss)" if weight else ""
                emit(f"{printable(name)} = {value:.6g}{note}")
        else:
            emit(f"{_summary(name, mean, shapes[name])} (mean of {iterations} batches; --all-values prints each)")
    return {"loss": loss / iterations, "outputs": means}


def _blob_lines(name: str, values: torch.Tensor, shape: Tuple[int, ...], all_values: bool) -> List[str]:
    if values.numel() == 1 or all_values:
        return [f"{printable(name)} = {value:.6g}" for value in values.tolist()]
    return [_summary(name, values, shape)]


def _summary(name: str, values: torch.Tensor, shape: Tuple[int, ...]) -> str:
    dims = "x".join(map(str, shape))
    return (f"{printable(name)}: shape {dims}, mean {float(values.mean()):.6g}, "
            f"min {float(values.min()):.6g}, max {float(values.max()):.6g}")


def _close_data_layers(net) -> None:
    from ..data import close_data_layers

    close_data_layers(net)
