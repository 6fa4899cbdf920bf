"""Caffe net -> a `torch.export` program (`model.pt2`) with a dynamic batch dimension, which
`torch.export.load` reads without caffe-compat: the program holds the graph of aten calls
and the weights, nothing of this package.

The program's module takes the net's inputs in the prototxt's order and returns what the
`CaffeNet` returns: a dict of its output blobs, by name, in Caffe's order. It is exported
in eval mode; LRN runs in its PyTorch form (the C kernel is not traced: see
`layers.lrn._kernel_applies`); DetectionOutput, py-faster-rcnn's proposal layer, ROIPooling,
PSROIPooling and the lifted loss run their export forms (`torch.compiler.is_exporting`), which
give their eager bits (but DetectionOutput's choice among tied scores at its keep_top_k cut),
the rois' count a dynamic dimension of its own (unbacked where the proposal layer makes them).
The preprocessing the net expects is stored beside the graph as the extra file
`preprocess.json` (`torch.export.load(f, extra_files={...})`).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import CaffeCompatError
from ..io.atomic import atomic_file
from ..net import CaffeNet
from .artifact import load as load_model

PathLike = Union[str, Path]
PREPROCESS_FILE = "preprocess.json"
# Traced at batch 2: torch.export fixes a dimension traced at size 0 or 1 to that size.
TRACE_BATCH = 2
# An input of rois has a count of its own, traced at another size than the batch's (torch.export
# would take two dynamic dimensions of equal size for one).
TRACE_ROIS = 3
ROI_TYPES = ("ROIPooling", "PSROIPooling")
# Types a program cannot hold: those that read or write files. Refused by name before tracing.
NOT_EXPORTABLE = {
    "Data": "it reads its records from files: export the deploy net, whose data are inputs",
    "ImageData": "it reads its records from files: export the deploy net, whose data are inputs",
    "HDF5Data": "it reads its records from files: export the deploy net, whose data are inputs",
    "HDF5Output": "it writes its bottoms to a file at every pass",
}


def _batched(net: CaffeNet) -> List[bool]:
    """Which inputs have the batch as dim 0: those whose built dim 0 is the first input's
    (a net's labels, say); an input of another length (a Scale layer's factors) keeps its shape."""
    shapes = [tuple(net.blob_shapes[name]) for name in net.input_names]
    batch = shapes[0][0] if shapes and shapes[0] else None
    return [bool(shape) and shape[0] == batch for shape in shapes]


def _roi_inputs(net: CaffeNet) -> List[bool]:
    """Which inputs are the rois (R, 5) of an ROI layer: R is dynamic, apart from the batch."""
    rois = {bottoms[1] for module_name, bottoms, _ in net._plan
            if len(bottoms) > 1 and net.graph.layer(net.layer_names[module_name]).type in ROI_TYPES}
    return [name in rois for name in net.input_names]


def _example(net: CaffeNet, batched: List[bool], rois: List[bool]) -> Tuple[torch.Tensor, ...]:
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return tuple(torch.zeros((TRACE_ROIS if is_rois else TRACE_BATCH, *net.blob_shapes[name][1:])
                             if is_batched or is_rois else net.blob_shapes[name], dtype=dtype)
                 for name, is_batched, is_rois in zip(net.input_names, batched, rois))


def _dynamic_shapes(batched: List[bool], rois: List[bool]):
    batch, count = torch.export.Dim("batch", min=1), torch.export.Dim("rois", min=1)
    # forward(*inputs): one entry, the tuple of the inputs' specs
    return (tuple({0: count} if is_rois else {0: batch} if is_batched else None
                  for is_batched, is_rois in zip(batched, rois)),)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export logs warnings, and prints the partial graph, of what it then raises:
    the one-line error says it. Its save warns of a value it writes in a default type (the
    empty list of a scan's extra inputs, as DetectionOutput's NMS has it)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _layer_refusing(net: CaffeNet, example: Tuple[torch.Tensor, ...]) -> Optional[Tuple[str, BaseException]]:
    """The first layer, in Caffe's order, that fails at the traced batch size or that
    torch.export cannot trace alone with its bottoms' batch dimension dynamic, and its
    error; None when each runs and exports alone."""
    blobs = dict(zip(net.input_names, example))
    for module_name, bottoms, tops in net._plan:
        layer, inputs = net.layers[module_name], tuple(blobs[b] for b in bottoms)
        batch = torch.export.Dim("batch", min=1)
        specs = tuple({0: batch} if x.dim() and x.shape[0] == TRACE_BATCH else None for x in inputs)
        try:
            out = layer(*inputs)
            torch.export.export(layer, inputs, dynamic_shapes=_per_argument(layer, specs) or None)
        except Exception as err:  # torch.export's errors share no base class
            return net.layer_names[module_name], err
        blobs.update(zip(tops, out if len(tops) > 1 else (out,)))
    return None


def _per_argument(layer: torch.nn.Module, specs: tuple) -> tuple:
    """dynamic_shapes as torch.export matches them to forward's parameters: a forward(*bottoms)
    takes the inputs' specs as one tuple."""
    parameters = inspect.signature(layer.forward).parameters.values()
    return (specs,) if specs and any(p.kind is p.VAR_POSITIONAL for p in parameters) else specs


def export_program(net: CaffeNet) -> torch.export.ExportedProgram:
    """The net's forward as a program whose inputs' batch dimension is dynamic (min 1).
    Raises CaffeCompatError naming the layer when one fixes the batch size or branches on
    values (a DummyData, a Reshape with an explicit batch) or
    reads files (a data layer whose source is there; one whose source is absent is an input)."""
    for module_name, _, _ in net._plan:
        node = net.graph.layer(net.layer_names[module_name])
        if node.type in NOT_EXPORTABLE:
            raise CaffeCompatError(f"layer '{node.name}' ({node.type}) of {net.graph.describe()}: no torch.export "
                                   f"program can hold it ({NOT_EXPORTABLE[node.type]})")
    net.eval()
    batched, rois = _batched(net), _roi_inputs(net)
    example = _example(net, batched, rois)
    try:
        with torch.no_grad(), _quiet():
            return torch.export.export(net, example, dynamic_shapes=_dynamic_shapes(batched, rois))
    except CaffeCompatError as err:  # a layer's export form refusing, by name
        raise CaffeCompatError(f"{net.graph.describe()}: {err}") from None
    except Exception as err:  # torch.export's errors share no base class
        with torch.no_grad(), _quiet():
            refusing = _layer_refusing(net, example)
        if refusing is None:
            raise CaffeCompatError(f"{net.graph.describe()}: torch.export cannot trace it with a dynamic batch "
                                   f"size ({_first_line(err)})") from None
        name, layer_err = refusing
        raise CaffeCompatError(f"layer '{name}' ({net.graph.layer(name).type}) of {net.graph.describe()}: "
                               f"torch.export cannot trace it with a dynamic batch size "
                               f"({_first_line(layer_err)})") from None


def write_program(net: CaffeNet, out: PathLike, preprocess: Optional[Mapping[str, str]] = None) -> None:
    """`convert NET (WEIGHTS | --random-init) -o model.pt2`."""
    program = export_program(net)
    extra: Dict[str, str] = {PREPROCESS_FILE: json.dumps(dict(preprocess or {}), sort_keys=True)}
    with atomic_file(out) as handle, _quiet():
        torch.export.save(program, handle, extra_files=extra)


def model_to_program(model_path: PathLike, out: PathLike) -> None:
    """`convert MODEL -o model.pt2`: a model file written by convert or train, in its saved phase."""
    net = load_model(model_path)
    write_program(net, out, net.preprocess)
