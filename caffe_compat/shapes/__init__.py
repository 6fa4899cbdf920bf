"""Blob shapes and parameter blob shapes of a net by arithmetic: what the layer builders
compute, without torch and without allocating anything, so that `inspect` works on any
net in little memory. One rule per Caffe type, one module per kind of rule
(tests/test_inspect.py keeps them equal to the built `CaffeNet` on the fixture nets); a
type without a rule leaves the blobs after it unknown (None), and says so in
`NetShapes.notes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import CaffeCompatError
from ..graph import Graph, param_owners
from . import forks, learned, roi, sources_and_losses, ssd, tensors, windows  # noqa: F401  (each registers its rules)
from .base import RULES, LayerView, Shape

__all__ = ["RULES", "NetShapes", "net_shapes"]


@dataclass
class NetShapes:
    blobs: Dict[str, Optional[Shape]]  # every blob; None where unknown
    params: Dict[str, Optional[List[Shape]]]  # layer -> its parameter blob shapes; None where unknown
    notes: List[str] = field(default_factory=list)  # why some shapes are unknown
    shared: Dict[Tuple[str, int], Tuple[str, int]] = field(default_factory=dict)  # from graph.param_owners

    def param_count(self, layer: str) -> Optional[int]:
        blobs = self.params.get(layer)
        return None if blobs is None else sum(math.prod(s) for s in blobs)

    def total_params(self) -> Tuple[int, bool]:
        """The parameter count with shared blobs counted once, and whether it is complete."""
        total, complete = 0, True
        for layer, blobs in self.params.items():
            if blobs is None:
                complete = False
                continue
            total += sum(math.prod(s) for i, s in enumerate(blobs) if (layer, i) not in self.shared)
        return total, complete


def net_shapes(graph: Graph, input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> NetShapes:
    """Every blob's shape and every layer's parameter blob shapes in `graph`.
    `input_shapes` ({blob: shape}) sets the shapes of inputs and of the tops of layers
    without bottoms (data layers), as `load_net`'s does."""
    input_shapes = input_shapes or {}
    result = NetShapes({}, {}, shared=param_owners(graph))
    for name, shape in graph.inputs.items():
        shape = input_shapes.get(name, shape)
        result.blobs[name] = None if shape is None else tuple(int(d) for d in shape)
        if shape is None:
            result.notes.append(f"input '{name}' declares no shape")
    for node in graph.layers:
        if node.type == "Input":
            result.params[node.name] = []
            continue
        tops: List[Optional[Shape]] = [None] * len(node.tops)
        params: Optional[List[Shape]] = None
        bottom_shapes = [result.blobs.get(b) for b in node.bottoms]
        shape_rule = RULES.get(node.type)
        if shape_rule is None:
            result.notes.append(f"layer '{node.name}': no shape rule for type '{node.type}'")
        elif all(s is not None for s in bottom_shapes):
            view = LayerView(node.name, node.type, node.param, list(node.bottoms), list(node.tops), bottom_shapes)
            try:
                top_shapes, params = shape_rule(view)
            except CaffeCompatError as err:
                result.notes.append(str(err))
            else:
                tops = [None if s is None else tuple(int(d) for d in s) for s in top_shapes]
                tops += [None] * (len(node.tops) - len(tops))
                params = [tuple(int(d) for d in s) for s in params]
                if not node.bottoms:
                    tops = [tuple(input_shapes[t]) if t in input_shapes else s for t, s in zip(node.tops, tops)]
                if None in tops:
                    result.notes += view.notes
        for top, shape in zip(node.tops, tops):
            result.blobs[top] = shape
        result.params[node.name] = params
    return result
