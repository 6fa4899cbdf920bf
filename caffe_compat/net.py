"""`CaffeNet`: a Caffe net for one phase as a PyTorch module, built from the graph
through the layer registry."""
from __future__ import annotations

import re
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import layers  # noqa: F401  (importing the package registers the built-in types)
from .errors import CaffeCompatError
from .graph import Graph, param_owners
from .layers.registry import Converted, LayerContext, builder_for, caffe_blobs

Shape = Tuple[int, ...]


def safe_name(name: str, taken: Iterable[str]) -> str:
    """A valid, unused module name for a Caffe layer name ('inception_3a/1x1' -> 'inception_3a_1x1')."""
    base = re.sub(r"\W", "_", name) or "layer"
    if base[0].isdigit():
        base = "_" + base
    candidate, n = base, 1
    while candidate in taken:
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
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)).reshape(want).to(target.dtype))


class CaffeNet(nn.Module):
    """A Caffe net as a module.

    `forward(*inputs, **named_inputs)` takes the Input blobs (in declaration order, or by
    blob name) and returns a dict of the net's outputs by blob name; `blobs=[...]` adds
    any other blob. `.train()` / `.eval()` select Caffe's TRAIN / TEST behaviour.
    """

    def __init__(self, graph: Graph, weights: Optional[Mapping[str, Sequence[np.ndarray]]] = None,
                 input_shapes: Optional[Mapping[str, Shape]] = None):
        super().__init__()
        self.graph = graph
        self.phase = graph.phase
        self.layers = nn.ModuleDict()
        self.layer_names: Dict[str, str] = {}  # module name -> Caffe layer name
        self.module_names: Dict[str, str] = {}  # Caffe layer name -> module name
        self.input_names: List[str] = list(graph.inputs)
        self.blob_shapes: Dict[str, Shape] = {}
        for name, shape in graph.inputs.items():
            shape = (input_shapes or {}).get(name, shape)
            if shape is None:
                raise CaffeCompatError(f"net '{graph.name}': input '{name}' declares no shape; give one "
                                       f"(input_shapes={{'{name}': (N, C, H, W)}})")
            self.blob_shapes[name] = tuple(shape)
        self._plan: List[Tuple[str, List[str], List[str]]] = []
        self.loss_terms: List[Tuple[str, float]] = []
        for node in graph.layers:
            if node.type == "Input":
                continue
            self._add_layer(node)
        self.output_names: List[str] = [b for b in graph.outputs if b in self.blob_shapes]
        self._release = self._release_plan()
        self._share_params()
        self.param_multipliers = self._multipliers()
        if weights is not None:
            self.load_caffe_weights(weights)
        self.train(graph.phase == "TRAIN")

    # building
    def _add_layer(self, node) -> None:
        shapes = [self.blob_shapes[b] for b in node.bottoms]
        ctx = LayerContext(node.name, node.type, node.param, list(node.bottoms), list(node.tops),
                           shapes, self.phase, list(node.loss_weights))
        converted = builder_for(node.name, node.type)(ctx)
        if not isinstance(converted, Converted):
            raise TypeError(f"the builder of '{node.type}' returned {type(converted).__name__}, not Converted")
        module_name = safe_name(node.name, self.layers.keys())
        self.layers[module_name] = converted.module
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
            self.blob_shapes[top] = tuple(shape)
        for top, weight in zip(node.tops, node.loss_weights):
            if weight:
                self.loss_terms.append((top, float(weight)))
        self._plan.append((module_name, list(converted.bottoms), list(converted.tops)))

    def _share_params(self) -> None:
        for (layer, index), (owner, owner_index) in param_owners(self.graph).items():
            module = self.layers[self.module_names[layer]]
            owner_module = self.layers[self.module_names[owner]]
            names = getattr(module, "blob_names", ())
            if index >= len(names):
                raise CaffeCompatError(f"layer '{layer}': names param {index} for sharing but has "
                                       f"{len(names)} parameter blob(s)")
            attr = names[index]
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
    def load_caffe_weights(self, weights: Mapping[str, Sequence[np.ndarray]]) -> None:
        """Copy blobs by layer name, as Caffe's CopyTrainedLayersFrom: unknown layers are skipped."""
        skipped = [name for name in weights if name not in self.module_names]
        if skipped:
            warnings.warn(f"weights for layers not in the {self.phase} net were skipped: {', '.join(skipped)}",
                          stacklevel=2)
        for name, arrays in weights.items():
            module_name = self.module_names.get(name)
            if module_name is None:
                continue
            node = self.graph.layer(name)
            _check_and_copy(name, node.type, self.layers[module_name], arrays)

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
            keep: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Execute every layer; `blobs` maps names to tensors and ends holding every blob's
        final value, or only those in `keep` when given. `first_versions`, when given,
        receives each blob's first value (what Caffe's diff of an in-place blob refers to)."""
        release = self._release if keep is not None else None
        for step, (module_name, bottoms, tops) in enumerate(self._plan):
            out = self.layers[module_name](*[blobs[b] for b in bottoms])
            if len(tops) == 1:
                out = (out,)
            for top, value in zip(tops, out):
                if first_versions is not None and top not in first_versions:
                    first_versions[top] = value
                blobs[top] = value
            if release is not None:
                for blob in release[step]:
                    if blob not in keep:
                        del blobs[blob]
        return blobs

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor):
        if isinstance(inputs, torch.fx.Proxy):  # fx's symbolic_trace hands *inputs (and **named) over as proxies
            inputs, named, blobs = tuple(inputs[i] for i in range(len(self.input_names))), {}, None
        else:
            blobs = named.pop("blobs", None)
        wanted = list(self.output_names) + [b for b in (blobs or ()) if b not in self.output_names]
        unknown = [b for b in wanted if b not in self.blob_shapes]
        if unknown:
            raise CaffeCompatError(f"net '{self.graph.name}' has no blob(s) {', '.join(unknown)}")
        values = self.run(self._bind(inputs, named), keep=frozenset(wanted))
        return {name: values[name] for name in wanted}

    def loss(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the loss tops, as Caffe's net reports and differentiates it."""
        if not self.loss_terms:
            raise CaffeCompatError(f"net '{self.graph.name}' has no loss layer")
        return sum(weight * outputs[top].sum() for top, weight in self.loss_terms)
