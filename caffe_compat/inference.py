"""The inference fast path of `CaffeNet`: the net as one straight-line Python function.

Used by `CaffeNet.forward` in eval mode without autograd when only the outputs are
asked for; `compare`, training and any call asking for other blobs run layer by layer
(`CaffeNet.run`) and see each layer's own blobs. The function is generated from the
layer plan, so a forward pays no per-layer bookkeeping, and each value is deleted after
its last reader. On the way:

- folding: a chain of per-channel affine layers (BatchNorm with its stored statistics,
  Scale, Bias, the forks' BN in inference) whose intermediate blobs nothing else reads
  is folded into the Convolution before it (weights times a, bias times a plus c,
  computed in float64), or, after any other layer, applied as one multiply-add; only
  with `fold` (the default);
- a ReLU whose bottom is a fresh tensor that nothing else reads runs in place;
- with `fold` too, a 2-D convolution torch would run on its slow path calls oneDNN
  instead (`Convolution.avoids_slow_path`): also a change of rounding.

Without `fold` the function's outputs equal the per-layer path's to the bit.

A program reads unfolded parameters and the layers it calls as they are at each call;
the values it folded it computes once, again when the version counter of any blob they
come from moves (an in-place change: an optimizer step, `load_caffe_weights`,
`load_state_dict`), when the inputs' shapes, dtypes or devices change, and after
`train()`, `eval()` and `.to()` (CaffeNet drops it). A blob replaced by assignment
(`layer.weight = nn.Parameter(...)`) is not seen until `net.eval()` is called again.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers.activation import ReLU
from .layers.convolution import Convolution
from .layers.eltwise import Eltwise
from .layers.inner_product import InnerProduct
from .layers.normalization import Bias, Scale
from .layers.pooling import AvePooling, MaxPooling

# Layers whose tops are always new tensors, never views of a bottom (nor the caller's
# input): a ReLU may overwrite such a top when nothing else reads it.
_FRESH_TOPS = (Eltwise, InnerProduct, MaxPooling, AvePooling)


def _channels_last(fold: bool, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the program runs its 4-d values channels-last: on CPU, with `fold` (the
    convolutions then round differently), where an input is an image batch."""
    return fold and any(x.dim() == 4 and x.device.type == "cpu" for x in inputs)


def _inputs_key(inputs: Sequence[torch.Tensor], any_batch: bool) -> Tuple:
    return tuple((x.shape[1:] if any_batch and x.dim() else x.shape, x.dtype, x.device) for x in inputs)


class InferenceProgram:
    """The generated function, and what it was built from: the fold setting, the inputs'
    shapes (but the batch, for a program that torch.compile runs), dtypes and devices, and
    the version of every blob it folded (of every blob, for torch.compile, which freezes
    them all)."""

    def __init__(self, function: Callable, fold: bool, inputs: Sequence[torch.Tensor],
                 sources: Sequence[torch.Tensor], any_batch: bool = False):
        self.function = function
        self.fold = fold
        self.any_batch = any_batch
        self.inputs = _inputs_key(inputs, any_batch)
        self.sources = list(sources)
        self.versions = [t._version for t in self.sources]

    def fits(self, fold: bool, inputs: Sequence[torch.Tensor]) -> bool:
        return (fold == self.fold and _inputs_key(inputs, self.any_batch) == self.inputs
                and [t._version for t in self.sources] == self.versions)


class _Program:
    """Straight-line source being written: values are local variables, tensors the
    function needs are its globals."""

    def __init__(self, for_compile: bool):
        self.lines: List[str] = []
        self.globals: Dict[str, object] = {"torch": torch}
        self.for_compile = for_compile

    def constant(self, value, hint: str) -> str:
        name = f"{hint}{len(self.globals)}"
        if self.for_compile and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            # inductor's freezing folds parameters into the code, and prepacks convolution weights
            value = nn.Parameter(value, requires_grad=False)
        self.globals[name] = value
        return name

    def compile(self, arguments: Sequence[str], results: Sequence[str], prologue: Sequence[str] = (),
                result_suffix: str = "") -> Callable:
        source = [f"def inference({', '.join(arguments)}):", *("    " + line for line in [*prologue, *self.lines]),
                  f"    return ({''.join(r + result_suffix + ', ' for r in results)})"]
        code = compile("\n".join(source), "<caffe-compat inference>", "exec")
        exec(code, self.globals)  # noqa: S102  (source generated above from the net's plan)
        return self.globals["inference"]


def _fold_chain(chain: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (a, c) of applying each (a_i, c_i) in turn, in float64."""
    a, c = None, None
    for scale, shift in chain:
        scale, shift = scale.detach().double().reshape(-1), shift.detach().double().reshape(-1)
        a, c = (scale, shift) if a is None else (a * scale, c * scale + shift)
    return a, c


def _convolution(program: _Program, conv: Convolution, chain, shape: Sequence[int], x: str, fold: bool,
                 channels_last: bool) -> str:
    """The expression of a 2-D convolution with the per-channel affine `chain` after it folded in."""
    g = conv.geometry
    # Unfolded, the parameters themselves: the function then follows their values.
    weight, bias = conv.weight, conv.bias
    if chain:
        a, c = _fold_chain(([(torch.ones_like(bias), bias)] if bias is not None else []) + list(chain))
        bias = c.to(weight.dtype)
        weight = (weight.detach().double() * a.reshape(-1, 1, 1, 1)).to(weight.dtype)
    if channels_last:  # else torch lays the weights out so on every call
        weight = weight.detach().contiguous(memory_format=torch.channels_last)
    w, b = program.constant(weight, "weight"), program.constant(bias, "bias")
    if fold and not program.for_compile and weight.device.type == "cpu" and conv.avoids_slow_path(shape):
        return f"torch.ops.aten.mkldnn_convolution({x}, {w}, {b}, {list(g.pad)}, {list(g.stride)}, " \
               f"{list(g.dilation)}, {g.group})"
    return f"torch.conv2d({x}, {w}, {b}, {list(g.stride)}, {list(g.pad)}, {list(g.dilation)}, {g.group})"


def build_program(net: nn.Module, inputs: Sequence[torch.Tensor], for_compile: bool = False) -> InferenceProgram:
    """The net's inference as one function of its inputs (in `net.input_names` order)
    returning its outputs (in `net.output_names` order). `for_compile`: a function for
    torch.compile with inductor's freezing (`compiled.CompiledNet`): any batch size, its
    tensors parameters, and torch.conv2d throughout (inductor picks the kernels)."""
    plan = net._plan
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    # Each value a blob takes is numbered; in-place layers give a blob several values.
    current: Dict[str, int] = {}
    shapes: Dict[int, Tuple[int, ...]] = {}
    for name, x in zip(net.input_names, inputs):
        current[name] = len(current)
        shapes[current[name]] = tuple(x.shape)
    count = len(current)
    steps: List[Tuple[List[int], List[int]]] = []
    readers: Dict[int, List[int]] = {}
    for index, (_, bottoms, tops) in enumerate(plan):
        ins = [current[b] for b in bottoms]
        for value in ins:
            readers.setdefault(value, []).append(index)
        outs = []
        for top in tops:
            current[top] = count
            built = net.blob_shapes[top]
            shapes[count] = (batch, *built[1:]) if batch is not None and built else tuple(built)
            outs.append(count)
            count += 1
        steps.append((ins, outs))
    results = [current[name] for name in net.output_names]
    kept = set(results) | set(range(len(net.input_names)))

    def sole_reader(value: int) -> Optional[int]:
        found = readers.get(value, [])
        return found[0] if len(found) == 1 and value not in kept else None

    def affine_of(index: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        module = net.layers[plan[index][0]]
        ins, outs = steps[index]
        if len(ins) != 1 or len(outs) != 1 or not hasattr(module, "per_channel_affine"):
            return None
        return module.per_channel_affine(len(shapes[ins[0]]))

    def affine_chain(value: int) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], int]:
        """The foldable per-channel affine layers reading `value` one after another, and
        the value the last of them makes."""
        chain = []
        while net.fold:
            reader = sole_reader(value)
            affine = None if reader is None else affine_of(reader)
            if affine is None:
                break
            chain.append(affine)
            value = steps[reader][1][0]
            absorbed.add(reader)
        return chain, value

    def continues_chain(value: int) -> bool:
        reader = sole_reader(value)
        return reader is not None and affine_of(reader) is not None

    program = _Program(for_compile)
    layout_channels_last = _channels_last(net.fold, inputs)
    folded: List[nn.Module] = []
    absorbed: set = set()
    fresh: set = set()
    names = {value: f"v{value}" for value in range(count)}
    last_read: Dict[int, int] = {}
    for index, (ins, _) in enumerate(steps):
        for value in ins:
            last_read[value] = index
    for index, (ins, outs) in enumerate(steps):
        if index in absorbed:
            continue
        module_name = plan[index][0]
        module = net.layers[module_name]
        args = ", ".join(names[v] for v in ins)
        affine = affine_of(index) if net.fold else None
        if (isinstance(module, Convolution) and not module.transposed and module.geometry.axis == 1
                and len(module.geometry.kernel) == 2 and len(ins) == 1 and len(shapes[ins[0]]) == 4):
            chain, made = affine_chain(outs[0])
            if chain or layout_channels_last:
                folded.append(module)
            expression = _convolution(program, module, chain, shapes[ins[0]], args, net.fold, layout_channels_last)
            program.lines.append(f"{names[made]} = {expression}")
            fresh.add(made)
            outs = [made]
        elif affine is not None and (not isinstance(module, (Scale, Bias)) or continues_chain(outs[0])):
            # BatchNorm & co. as one multiply-add (Scale or Bias alone keep their own op)
            absorbed.add(index)
            chain, made = affine_chain(outs[0])
            a, c = _fold_chain([affine] + chain)
            trailing = (1,) * (len(shapes[ins[0]]) - 2)
            dtype = affine[0].dtype
            scale = program.constant(a.to(dtype).reshape(-1, *trailing), "scale")
            shift = program.constant(c.to(dtype).reshape(-1, *trailing), "shift")
            program.lines.append(f"{names[made]} = torch.addcmul({shift}, {args}, {scale})")
            fresh.add(made)
            outs = [made]
        elif isinstance(module, ReLU) and len(ins) == 1 and ins[0] in fresh and sole_reader(ins[0]) == index:
            # in place: nothing else reads the bottom, and no other value shares its memory
            if module.negative_slope == 0:
                program.lines.append(f"{names[outs[0]]} = torch.relu_({args})")
            else:
                program.lines.append(f"{names[outs[0]]} = torch._C._nn.leaky_relu_({args}, "
                                     f"{module.negative_slope!r})")
            fresh.add(outs[0])
        else:
            callee = program.constant(module, module_name + "_")
            targets = names[outs[0]] if len(outs) == 1 else ", ".join(names[v] for v in outs) + ", *_"
            program.lines.append(f"{targets} = {callee}({args})")
            if isinstance(module, _FRESH_TOPS):
                fresh.update(outs)
        # Values read for the last time here, or never read, go now: the allocator reuses them.
        dead = [names[v] for v in ins if last_read.get(v) == index and v not in kept]
        dead += [names[v] for v in outs if v not in last_read and v not in kept]
        if dead:
            program.lines.append(f"del {', '.join(dead)}")
    arguments = [names[v] for v in range(len(net.input_names))]
    if layout_channels_last:
        # One layout from the first layer to the last: oneDNN's convolutions run channels-last
        # without reordering, and pooling, LRN and concatenation keep the layout they are
        # given, so no layer converts; the caller gets NCHW back.
        prologue = [f"{name} = {name}.contiguous(memory_format=torch.channels_last)"
                    for name, x in zip(arguments, inputs) if x.dim() == 4]
        function = program.compile(arguments, [names[v] for v in results], prologue, ".contiguous()")
    else:
        function = program.compile(arguments, [names[v] for v in results])
    folded += [net.layers[plan[index][0]] for index in sorted(absorbed)]
    if for_compile:
        folded = [net]
    sources = {id(t): t for module in folded for t in list(module.parameters()) + list(module.buffers())}
    return InferenceProgram(function, net.fold, inputs, list(sources.values()), any_batch=for_compile)
