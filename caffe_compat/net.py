"""`CaffeNet`: a Caffe net for one phase as a PyTorch module, built from the graph
through the layer registry."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .deploy import DATA_LAYER_TYPES
from .errors import CaffeCompatError
from .graph import Graph, LayerNode, check_weights_fit, param_owners
from .io.wire import copy_out
from .memory import available_memory, format_size, parse_size
from .inference import InferenceProgram, build_program
from .need_backward import NeedBackward
from .layers.registry import Converted, LayerContext, builder_for, caffe_blobs

Shape = Tuple[int, ...]


def safe_name(name: str, taken: Iterable[str]) -> str:
    """A valid, unused module name for a Caffe layer name ('inception_3a/1x1' -> 'inception_3a_1x1')."""
    base = re.sub(r"\W", "_", name) or "layer"
    if base[0].isdigit():
        base = "_" + base
    candidate, n = base, 1
    # nn.ModuleDict refuses a key that names one of its attributes ('train', 'double', 'keys').
    while candidate in taken or hasattr(nn.ModuleDict, candidate):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def infer_top_shapes(module: nn.Module, bottom_shapes: Sequence[Shape]) -> List[Shape]:
    """Run the module on meta tensors: shapes without computing anything."""
    state = {k: v.to("meta") for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    inputs = tuple(torch.empty(s, device="meta") for s in bottom_shapes)
    out = torch.func.functional_call(module, state, inputs)
    if out is None:
        return []
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [tuple(o.shape) for o in outs]


def _check_and_copy(node_name: str, node_type: str, module: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    targets = caffe_blobs(module)
    if len(arrays) != len(targets):
        raise CaffeCompatError(f"layer '{node_name}' ({node_type}): the weights have {len(arrays)} blobs, "
                               f"the layer needs {len(targets)}")
    for i, (target, array) in enumerate(zip(targets, arrays)):
        want = tuple(target.shape)
        have = tuple(array.shape)
        # Legacy blobs are 4-D with leading 1s where the current shape has fewer axes.
        legacy_ok = len(have) == 4 and len(want) < 4 and have == (1,) * (4 - len(want)) + want
        if have != want and not legacy_ok:
            raise CaffeCompatError(f"layer '{node_name}' ({node_type}): blob {i} has shape {have} in the "
                                   f"weights but the net needs {want}")
        values = np.asarray(array).reshape(want)
        with torch.no_grad():
            if target.device.type == "cpu" and target.dtype in (torch.float32, torch.float64) \
                    and target.is_contiguous():  # a channels-last one (training) takes torch's copy
                # straight into the parameter: the arrays may be read-only views of the mapped file
                copy_out(values, target.detach().numpy())  # in chunks, releasing the file's pages
            else:
                target.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).to(target.dtype))


@dataclass
class _Step:
    """One layer between the sizing pass and the building pass."""

    node: LayerNode
    ctx: LayerContext
    converted: Converted
    module_name: str
    on_meta: bool  # built on the meta device: sized, but holding no memory yet


def _tensors(module: nn.Module) -> List[torch.Tensor]:
    seen, result = set(), []
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            result.append(tensor)
    return result


def _check_param_specs(node: LayerNode, blob_count: int) -> None:
    if len(node.param_specs) > blob_count:
        raise CaffeCompatError(f"layer '{node.name}' ({node.type}): {len(node.param_specs)} param "
                               f"specification(s) for {blob_count} parameter blob(s) (Caffe: too many "
                               f"params specified for layer)")


def _stopped_bottoms(ctx: LayerContext, node: LayerNode) -> FrozenSet[int]:
    """Indices of the bottoms that `propagate_down: false` keeps from receiving a gradient
    (given as Caffe wants it: not at all, or once per bottom; a blob given twice as a
    bottom can be stopped at one of them)."""
    flags = list(node.param.propagate_down)
    if flags and len(flags) != len(node.bottoms):
        raise ctx.error(f"propagate_down is given {len(flags)} time(s) for {len(node.bottoms)} bottom(s); "
                        "Caffe wants it once per bottom or not at all")
    return frozenset(i for i, flag in enumerate(flags) if not flag)


def module_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take (or will take, on the meta device)."""
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def _blobs_are_its_whole_state(module: nn.Module) -> bool:
    """Whether loading the Caffe blobs sets every value the module holds, so the meta
    build can be materialised empty and filled from the weights, skipping the fillers."""
    blobs = {id(t) for t in caffe_blobs(module)}
    if any(t.numel() and id(t) not in blobs for t in _tensors(module)):
        return False
    for sub in module.modules():
        for name, value in vars(sub).items():
            values = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in values):
                return False  # a plain tensor attribute, which to_empty would not reach
    return True


def _allocation_error(ctx: LayerContext, err: BaseException) -> CaffeCompatError:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ctx.error(f"cannot allocate its parameters: {message}")


def _build(builder, ctx: LayerContext) -> Converted:
    try:
        converted = builder(ctx)
    except (RuntimeError, MemoryError) as err:  # the allocator refusing a blob, or its size overflowing
        raise _allocation_error(ctx, err) from err
    if not isinstance(converted, Converted):
        raise TypeError(f"the builder of '{ctx.type}' returned {type(converted).__name__}, not Converted")
    return converted


def _checked_shape(graph: Graph, name: str, shape) -> Shape:
    try:
        dims = tuple(shape)
        if all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
            return tuple(int(d) for d in dims)
    except TypeError:
        pass
    raise CaffeCompatError(f"{graph.describe()}: input '{name}' has shape {shape!r}; expected sizes >= 0, "
                           f"such as (1, 3, 227, 227)")


class CaffeNet(nn.Module):
    """A Caffe net as a module.

    `forward(*inputs, **named_inputs)` takes the Input blobs (in declaration order, or by
    blob name) and returns a dict of the net's outputs by blob name; `blobs=[...]` adds
    any other blob. `.train()` / `.eval()` select Caffe's TRAIN / TEST behaviour.

    The net is built in two passes: every layer first on the meta device (shapes and
    sizes, no memory), then, once the net's parameters fit `max_memory` (default: the
    memory available) and the weights fit the net, for real. Layers whose weights are
    given skip their fillers. Weights that leave layers with parameters unset are an
    error unless `allow_missing_weights` (those layers keep their filler values).

    In eval mode without autograd, a call for the outputs alone runs the net as one
    generated function (`inference`), with BatchNorm, Scale and the like folded into the
    convolutions before them unless `fold` is False.
    """

    def __init__(self, graph: Graph, weights: Optional[Mapping[str, Sequence[np.ndarray]]] = None,
                 input_shapes: Optional[Mapping[str, Shape]] = None, *, weights_source: Optional[str] = None,
                 allow_missing_weights: bool = False, max_memory: Union[None, int, str] = None,
                 fold: bool = True):
        super().__init__()
        self.fold = fold
        self._inference: Optional[InferenceProgram] = None
        self.graph = graph
        self.phase = graph.phase
        self.layers = nn.ModuleDict()
        self.layer_names: Dict[str, str] = {}  # module name -> Caffe layer name
        self.module_names: Dict[str, str] = {}  # Caffe layer name -> module name
        self.input_names: List[str] = list(graph.inputs)
        self.blob_shapes: Dict[str, Shape] = {}
        unknown = sorted(set(input_shapes or {}) - set(graph.inputs))
        if unknown:
            raise CaffeCompatError(f"{graph.describe()}: input shape given for {', '.join(unknown)}, which "
                                   f"the {graph.phase} net has no input of (its inputs: "
                                   f"{', '.join(graph.inputs) or 'none'})")
        for name, shape in graph.inputs.items():
            shape = (input_shapes or {}).get(name, shape)
            if shape is None:
                raise CaffeCompatError(f"net '{graph.name}': input '{name}' declares no shape; give one "
                                       f"(input_shapes={{'{name}': (N, C, H, W)}})")
            self.blob_shapes[name] = _checked_shape(graph, name, shape)
        self._plan: List[Tuple[str, List[str], List[str]]] = []
        self._stop_gradient: Dict[str, FrozenSet[int]] = {}  # bottoms with propagate_down: false
        self.loss_terms: List[Tuple[str, float]] = []
        for node in graph.layers:
            if node.type == "Input":
                _check_param_specs(node, 0)
        steps = [self._size_layer(node) for node in graph.layers if node.type != "Input"]
        self._check_memory(steps, max_memory)
        if weights is not None:
            self._check_weights_fit({s.node.name: len(getattr(s.converted.module, "blob_names", ()))
                                     for s in steps}, weights, weights_source, allow_missing_weights)
        for step in steps:
            self._materialise(step, weights is not None and step.node.name in weights)
        self.output_names: List[str] = [b for b in graph.outputs if b in self.blob_shapes]
        self._release = self._release_plan()
        self._share_params()
        self.param_multipliers = self._multipliers()
        if weights is not None:
            self._copy_weights(weights, weights_source)
        self.train(graph.phase == "TRAIN")

    # building
    def _size_layer(self, node: LayerNode) -> _Step:
        """Build the layer on the meta device (data layers, which read their files, and
        builders that need real values are built for real) and record its tops."""
        shapes = [self.blob_shapes[b] for b in node.bottoms]
        ctx = LayerContext(node.name, node.type, node.param, list(node.bottoms), list(node.tops),
                           shapes, self.phase, list(node.loss_weights))
        builder = builder_for(node.name, node.type)
        converted, on_meta = None, False
        if node.type not in DATA_LAYER_TYPES:
            try:
                with torch.device("meta"):
                    converted, on_meta = _build(builder, ctx), True
            except CaffeCompatError:
                raise
            except Exception:  # noqa: BLE001  (a builder that needs real values: sized after its real build)
                converted = None
        if converted is None:
            converted = _build(builder, ctx)
        _check_param_specs(node, len(getattr(converted.module, "blob_names", ())))
        module_name = safe_name(node.name, self.module_names.values())
        self.layer_names[module_name] = node.name
        self.module_names[node.name] = module_name
        top_shapes = converted.top_shapes
        if top_shapes is None:
            try:
                top_shapes = infer_top_shapes(converted.module, [self.blob_shapes[b] for b in converted.bottoms])
            except CaffeCompatError:
                raise
            except Exception as err:  # a module that cannot take these bottoms
                raise CaffeCompatError(f"layer '{node.name}' ({node.type}): cannot run on bottoms "
                                       f"{[self.blob_shapes[b] for b in converted.bottoms]}: {err}") from None
        for top, shape in zip(converted.tops, top_shapes):
            if top in converted.bottoms and tuple(shape) != self.blob_shapes[top]:
                # Caffe refuses in-place Reshape/Flatten; an in-place Convolution silently computes garbage.
                raise ctx.error(f"computes '{top}' in place but changes its shape {self.blob_shapes[top]} -> "
                                f"{tuple(shape)}; give the top another name")
            self.blob_shapes[top] = tuple(shape)
        for top, weight in zip(node.tops, node.loss_weights):
            if weight:
                self.loss_terms.append((top, float(weight)))
        self._plan.append((module_name, list(converted.bottoms), list(converted.tops)))
        # Builders wire the layer's own bottoms in order, so propagate_down's indices hold.
        self._stop_gradient[module_name] = _stopped_bottoms(ctx, node)
        return _Step(node, ctx, converted, module_name, on_meta)

    def _check_memory(self, steps: Sequence[_Step], max_memory: Union[None, int, str]) -> None:
        budget = parse_size(max_memory, "max_memory") if max_memory is not None else available_memory()
        if budget is None:
            return
        total = 0
        for step in steps:
            size = module_bytes(step.converted.module)
            total += size
            if total > budget:
                limit = "the --max-memory / max_memory limit" if max_memory is not None else "the memory available"
                raise CaffeCompatError(
                    f"layer '{step.node.name}' ({step.node.type}): its parameters need {format_size(size)} "
                    f"(the net up to it {format_size(total)}), more than {limit} ({format_size(budget)})")

    def _materialise(self, step: _Step, weights_given: bool) -> None:
        module = step.converted.module
        if step.on_meta:
            if weights_given and _blobs_are_its_whole_state(module):
                try:
                    module = module.to_empty(device="cpu")
                except (RuntimeError, MemoryError) as err:
                    raise _allocation_error(step.ctx, err) from err
            else:
                module = _build(builder_for(step.node.name, step.node.type), step.ctx).module
        self.layers[step.module_name] = module

    def _share_params(self) -> None:
        for (layer, index), (owner, owner_index) in param_owners(self.graph).items():
            module = self.layers[self.module_names[layer]]
            owner_module = self.layers[self.module_names[owner]]
            attr = module.blob_names[index]  # every spec has its blob: checked when sizing
            owner_param = caffe_blobs(owner_module)[owner_index]
            if tuple(getattr(module, attr).shape) != tuple(owner_param.shape):
                raise CaffeCompatError(f"layer '{layer}': shared param {index} has shape "
                                       f"{tuple(getattr(module, attr).shape)}, its owner '{owner}' has "
                                       f"{tuple(owner_param.shape)}")
            delattr(module, attr)
            setattr(module, attr, owner_param)

    def _multipliers(self) -> Dict[str, Tuple[float, float]]:
        """Parameter name -> (lr_mult, decay_mult), from each layer's ParamSpecs (owners win)."""
        result: Dict[str, Tuple[float, float]] = {}
        seen = set()
        for node in self.graph.layers:
            module_name = self.module_names.get(node.name)
            if module_name is None:
                continue
            module = self.layers[module_name]
            for i, attr in enumerate(getattr(module, "blob_names", ())):
                tensor = getattr(module, attr)
                if not isinstance(tensor, nn.Parameter) or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                spec = node.param_specs[i] if i < len(node.param_specs) else None
                result[f"layers.{module_name}.{attr}"] = (spec.lr_mult, spec.decay_mult) if spec else (1.0, 1.0)
        return result

    # weights
    def _check_weights_fit(self, blob_counts: Mapping[str, int], weights: Mapping[str, Sequence[np.ndarray]],
                           source: Optional[str], allow_missing: bool) -> None:
        for note in check_weights_fit(self.graph, blob_counts, list(weights), source, allow_missing):
            warnings.warn(note, stacklevel=3)

    def _copy_weights(self, weights: Mapping[str, Sequence[np.ndarray]], source: Optional[str]) -> None:
        for name, arrays in weights.items():
            module_name = self.module_names.get(name)
            if module_name is not None:
                _check_and_copy(name, self.graph.layer(name).type, self.layers[module_name], arrays)
        layer = self.first_nonfinite_layer()
        if layer is not None:
            where = f" ({source})" if source else ""
            warnings.warn(f"weights of layer '{layer}'{where} hold NaN/inf; outputs will not be finite",
                          stacklevel=3)

    def load_caffe_weights(self, weights: Mapping[str, Sequence[np.ndarray]], source: Optional[str] = None,
                           allow_missing: bool = False) -> None:
        """Copy blobs by layer name, as Caffe's CopyTrainedLayersFrom, after the checks of
        `_check_weights_fit`; `source` names the weights file in messages."""
        blob_counts = {self.layer_names[m]: len(getattr(module, "blob_names", ()))
                       for m, module in self.layers.items()}
        self._check_weights_fit(blob_counts, weights, source, allow_missing)
        self._copy_weights(weights, source)

    def first_nonfinite_layer(self) -> Optional[str]:
        """The first layer, in net order, whose blobs hold NaN or inf; None when all are
        finite. One fused reduction and one device sync: cheap enough for every iteration."""
        owners, blobs = [], []
        for module_name, module in self.layers.items():
            for blob in caffe_blobs(module):
                if blob.numel():
                    owners.append(module_name)
                    blobs.append(blob.detach())
        if not blobs:
            return None
        # The 2-norm: several times faster than the max-norm on CPU. It is NaN or inf
        # wherever a blob holds one, and also past ~1e19 (float32), so a blob it flags is
        # confirmed element by element (that happens only when training has gone wrong).
        suspects = torch.isfinite(torch.stack(torch._foreach_norm(blobs))).logical_not_()
        if not suspects.any().item():
            return None
        for index in suspects.nonzero()[:, 0].tolist():
            if not torch.isfinite(blobs[index]).all().item():
                return self.layer_names[owners[index]]
        return None

    def caffe_weights(self) -> Dict[str, List[np.ndarray]]:
        """Blobs by Caffe layer name, as Caffe would save them."""
        return {self.layer_names[m]: [t.detach().cpu().float().numpy().copy() for t in caffe_blobs(module)]
                for m, module in self.layers.items() if caffe_blobs(module)}

    # running
    def _bind(self, args: Sequence[torch.Tensor], named: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if len(args) == 1 and isinstance(args[0], Mapping):
            named, args = {**args[0], **named}, ()
        if len(args) > len(self.input_names):
            raise CaffeCompatError(f"net '{self.graph.name}' takes {len(self.input_names)} inputs "
                                   f"({', '.join(self.input_names)}), got {len(args)}")
        blobs = dict(zip(self.input_names, args))
        blobs.update(named)
        missing = [n for n in self.input_names if n not in blobs]
        if missing:
            raise CaffeCompatError(f"net '{self.graph.name}': missing input blob(s) {', '.join(missing)}")
        return blobs

    def _release_plan(self) -> List[List[str]]:
        """For each step, the blobs no later step reads: forward drops them there, so the
        allocator can reuse their memory (keeping every blob costs GoogLeNet ~15%)."""
        last_use: Dict[str, int] = {}
        for step, (_, bottoms, tops) in enumerate(self._plan):
            for blob in list(bottoms) + list(tops):
                last_use[blob] = step
        release: List[List[str]] = [[] for _ in self._plan]
        for blob, step in last_use.items():
            release[step].append(blob)
        return release

    def run(self, blobs: Dict[str, torch.Tensor], first_versions: Optional[Dict[str, torch.Tensor]] = None,
            keep: Optional[Sequence[str]] = None, caffe_backward: Optional[NeedBackward] = None
            ) -> Dict[str, torch.Tensor]:
        """Execute every layer; `blobs` maps names to tensors and ends holding every blob's
        final value, or only those in `keep` when given. `first_versions`, when given,
        receives each blob's first value (what Caffe's diff of an in-place blob refers to),
        and the layers read each top through an identity of it, so that a top's .grad is
        what its readers sent back, as Caffe's diff, and not a path inside the layer that
        made it. `caffe_backward` (Caffe's rule for this net) then decides which bottoms
        take a gradient, which tops take one even where the layer's own value does not,
        and which value of an in-place blob `first_versions` holds."""
        release = self._release if keep is not None else None
        for step, (module_name, bottoms, tops) in enumerate(self._plan):
            inputs = [blobs[b] for b in bottoms]
            layer = self.layer_names[module_name]
            stopped = self._stop_gradient[module_name] if caffe_backward is None else caffe_backward.stopped(layer)
            for i in stopped:
                if i < len(inputs):  # a builder may read fewer bottoms than the layer has
                    inputs[i] = inputs[i].detach()
            try:
                out = self.layers[module_name](*inputs)
            except RuntimeError as err:
                raise self._size_error(module_name, bottoms, inputs) or err
            if len(tops) == 1:
                out = (out,)
            for j, (top, value) in enumerate(zip(tops, out)):
                if first_versions is not None:
                    value = _readers_view(value, caffe_backward is not None and (layer, j) in caffe_backward.receives)
                    if caffe_backward is None:
                        first_versions.setdefault(top, value)
                    elif caffe_backward.diff_values[top] == (layer, j):
                        first_versions[top] = value
                blobs[top] = value
            if release is not None:
                for blob in release[step]:
                    if blob not in keep:
                        del blobs[blob]
        return blobs

    def _size_error(self, module_name: str, bottoms: Sequence[str],
                    inputs: Sequence[torch.Tensor]) -> Optional[CaffeCompatError]:
        """A layer that failed on bottoms of another size than the net was built for (an
        InnerProduct's weights fit one input size) is named with the sizes the net expects,
        rather than torch's `mat1 and mat2 shapes cannot be multiplied`; None otherwise."""
        for blob, value in zip(bottoms, inputs):
            built = tuple(self.blob_shapes.get(blob, ()))
            if len(built) == value.dim() and tuple(value.shape[1:]) == built[1:]:
                continue
            expected = ", ".join(f"'{name}' {_dims(('N', *self.blob_shapes[name][1:]))}" for name in self.input_names)
            return CaffeCompatError(
                f"layer '{self.layer_names[module_name]}' of net '{self.graph.name}': bottom '{blob}' is "
                f"{_dims(value.shape)}, but the net was built for {_dims(built)}; it expects inputs {expected} "
                f"or build it for another size (input_shapes=, --input-shape)")
        return None

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor):
        if isinstance(inputs, torch.fx.Proxy):  # fx's symbolic_trace hands *inputs (and **named) over as proxies
            inputs, named, blobs = tuple(inputs[i] for i in range(len(self.input_names))), {}, None
        else:
            blobs = named.pop("blobs", None)
        wanted = list(self.output_names) + [b for b in (blobs or ()) if b not in self.output_names]
        unknown = [b for b in wanted if b not in self.blob_shapes]
        if unknown:
            raise CaffeCompatError(f"net '{self.graph.name}' has no blob(s) {', '.join(unknown)}")
        bound = self._bind(inputs, named)
        if blobs is None and self._takes_fast_path(bound):
            return self._infer(bound)
        values = self.run(bound, keep=frozenset(wanted))
        return {name: values[name] for name in wanted}

    def _takes_fast_path(self, bound: Mapping[str, object]) -> bool:
        """Eval mode, no autograd, the inputs alone, as tensors; not while torch.compile or
        torch.export traces the net (they see the layers, and fuse for themselves)."""
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)
        return (not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not exporting() and bound.keys() == set(self.input_names)
                and all(isinstance(bound[name], torch.Tensor) for name in self.input_names))

    def _infer(self, bound: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = [bound[name] for name in self.input_names]
        if self._inference is None or not self._inference.fits(self.fold, inputs):
            self._inference = build_program(self, inputs)
        try:
            outputs = self._inference.function(*inputs)
        except RuntimeError:
            # Bottoms of another size than the net was built for: the per-layer path names the layer.
            values = self.run(dict(bound), keep=frozenset(self.output_names))
            return {name: values[name] for name in self.output_names}
        return dict(zip(self.output_names, outputs))

    def train(self, mode: bool = True):
        self._inference = None  # layers normalise differently in each mode
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._inference = None  # .to(), .double(), .cuda() may replace or convert any tensor
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # A copy must not run the original's function (it holds the original's modules).
        state = dict(super().__getstate__())
        state["_inference"] = None
        return state

    def loss(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the loss tops, as Caffe's net reports and differentiates it."""
        if not self.loss_terms:
            raise CaffeCompatError(f"net '{self.graph.name}' has no loss layer")
        return sum(weight * outputs[top].sum() for top, weight in self.loss_terms)


def _readers_view(value: torch.Tensor, takes_diff: bool) -> torch.Tensor:
    """The top as the layers reading it see it: a view (no copy), or, where Caffe gives
    it a diff that the layer's own value cannot take (a detached or integer-derived top),
    a fresh leaf with the same data."""
    if takes_diff and not value.requires_grad and value.is_floating_point() and torch.is_grad_enabled():
        return value.detach().requires_grad_()
    return value.view_as(value)


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape) or "a scalar"
