"""Which diffs Caffe's backward writes: Net::Init's need_backward rule (net.cpp), run on
the net as Caffe runs it, with the Split layers InsertSplits adds where a blob is read
more than once (or read and weighted as a loss). No torch.

After Init, Net::Backward calls a layer's Backward only where layer_need_backward_, with
bottom_need_backward_ as its propagate_down; a diff no Backward writes keeps its zeros.
So a blob's diff is what the layers reading it sent back (a Split sums its tops'),
whenever the one layer reading it (or its Split) propagates down to it; a loss top that
nothing reads holds its loss weight. A blob rewritten in place shares one diff among its
values: backward runs last through the first layer that propagates to it, so the diff
holds that value's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Mapping, Sequence, Tuple

from .graph import Graph

Value = Tuple[str, int]  # (layer, top index): one value a blob takes (in-place layers give a blob several)

# AllowForceBackward: bottoms force_backward does not reach. Caffe's LossLayer keeps it
# from its labels (bottom 1); these layers say otherwise.
_UNFORCED_BOTTOMS = {"EuclideanLoss": (), "ContrastiveLoss": (2,), "LSTM": (1,), "RNN": (1,), "LSTMUnit": (2,)}


def _unforced_bottoms(layer_type: str) -> Tuple[int, ...]:
    if layer_type in _UNFORCED_BOTTOMS:
        return _UNFORCED_BOTTOMS[layer_type]
    return (1,) if layer_type.endswith("Loss") else ()


@dataclass
class _CaffeLayer:
    """A layer of the net as Caffe builds it (the graph's, or an inserted Split)."""

    type: str
    bottoms: List[str]
    tops: List[str]
    loss_weights: Sequence[float]
    param_lr: Sequence[float]
    propagate_down: Sequence[bool]


@dataclass(frozen=True)
class NeedBackward:
    """Net::Init's verdict for a net's layers (by Caffe layer name)."""

    propagates: Mapping[str, Tuple[bool, ...]]  # per bottom: does the layer's Backward write its diff
    receives: FrozenSet[Value]  # values whose readers write their diff
    read: FrozenSet[Value]  # values some layer reads
    diff_values: Mapping[str, Value]  # blob -> the value its diff holds after backward

    def stopped(self, layer: str) -> FrozenSet[int]:
        """The bottoms of `layer` Caffe's backward sends nothing to."""
        return frozenset(i for i, flag in enumerate(self.propagates[layer]) if not flag)


def _split_blob(blob: str, value: Value, k: int) -> str:
    return f"{blob}_{value[0]}_{value[1]}_split_{k}"  # InsertSplits' SplitBlobName


def _with_splits(graph: Graph, param_lr: Mapping[str, Sequence[float]]):
    """The net after InsertSplits; which value each (layer, bottom index) reads; the index
    there of each graph layer, and of the Split of each value read more than once."""
    last: Dict[str, Value] = {}
    source: Dict[Tuple[str, int], Value] = {}
    readers: Dict[Value, int] = {}
    split_weight: Dict[Value, float] = {}
    for node in graph.layers:
        for i, blob in enumerate(node.bottoms):
            source[(node.name, i)] = last[blob]
            readers[last[blob]] = readers.get(last[blob], 0) + 1
        for j, blob in enumerate(node.tops):
            last[blob] = (node.name, j)
        # A top weighted as a loss counts as one more reader (only loss_weight as written:
        # the default weight of a *Loss layer is added after the splits).
        for j, weight in enumerate(list(node.param.loss_weight)[:len(node.tops)]):
            split_weight[(node.name, j)] = weight
            if weight:
                readers[(node.name, j)] = readers.get((node.name, j), 0) + 1
    layers: List[_CaffeLayer] = []
    index: Dict[str, int] = {}
    splits: Dict[Value, int] = {}
    taken: Dict[Value, int] = {}
    for node in graph.layers:
        bottoms = []
        for i, blob in enumerate(node.bottoms):
            value = source[(node.name, i)]
            if readers[value] > 1:
                bottoms.append(_split_blob(blob, value, taken.get(value, 0)))
                taken[value] = taken.get(value, 0) + 1
            else:
                bottoms.append(blob)
        index[node.name] = len(layers)
        layers.append(_CaffeLayer(node.type, bottoms, list(node.tops), node.loss_weights,
                                  param_lr.get(node.name, ()), list(node.param.propagate_down)))
        for j, blob in enumerate(node.tops):
            count = readers.get((node.name, j), 0)
            if count <= 1:
                continue
            weight = split_weight.get((node.name, j), 0.0)
            splits[(node.name, j)] = len(layers)
            layers.append(_CaffeLayer("Split", [blob], [_split_blob(blob, (node.name, j), k) for k in range(count)],
                                      [weight] + [0.0] * (count - 1), (), ()))
            if weight:  # the loss is the Split's first top
                taken[(node.name, j)] = 1
    return layers, source, index, splits


def _init_flags(layers: Sequence[_CaffeLayer], force_backward: bool) -> List[Tuple[bool, ...]]:
    """Per layer, per bottom: layer_need_backward_ and bottom_need_backward_, as Net::Init
    leaves them (Net::Backward's propagate_down)."""
    blob_need: Dict[str, bool] = {}
    need: List[bool] = []
    bottom_need: List[List[bool]] = []
    for layer in layers:
        flags = [blob_need.get(b, False) for b in layer.bottoms]
        needed = any(flags) or any(lr != 0 for lr in layer.param_lr)
        if layer.propagate_down:
            flags = [bool(f) for f in layer.propagate_down]
        for j, top in enumerate(layer.tops):
            if not (j < len(layer.bottoms) and layer.bottoms[j] == top):  # not in place: a new blob
                blob_need[top] = False
        need.append(needed)
        bottom_need.append(flags)
        if needed:  # every top of a layer that needs backward needs it
            blob_need.update((top, True) for top in layer.tops)
    # Backwards through the net: a layer none of whose tops reaches a loss, or whose
    # readers all decline a diff, computes nothing.
    under_loss, skipped = set(), set()
    for k in reversed(range(len(layers))):
        layer = layers[k]
        contributes = any(w for w in layer.loss_weights) or any(t in under_loss for t in layer.tops)
        if not contributes or (need[k] and all(t in skipped for t in layer.tops)):
            need[k] = False
            bottom_need[k] = [False] * len(layer.bottoms)
        if contributes:
            under_loss.update(layer.bottoms)
        skipped.update(b for b, flag in zip(layer.bottoms, bottom_need[k]) if not flag)
    if force_backward:
        for k, layer in enumerate(layers):
            need[k] = True
            unforced = _unforced_bottoms(layer.type)
            bottom_need[k] = [f or i not in unforced for i, f in enumerate(bottom_need[k])]
    return [tuple(needed and f for f in flags) for needed, flags in zip(need, bottom_need)]


def need_backward(graph: Graph, param_lr: Mapping[str, Sequence[float]], force_backward: bool) -> NeedBackward:
    """Caffe's rule for `graph`; `param_lr` gives each layer's lr_mult per parameter blob
    (a layer without an entry has none)."""
    layers, source, index, splits = _with_splits(graph, param_lr)
    propagates = _init_flags(layers, force_backward)
    receives = set()
    for (layer, i), value in source.items():
        if propagates[splits[value]][0] if value in splits else propagates[index[layer]][i]:
            receives.add(value)
    diff_values: Dict[str, Value] = {}
    for node in graph.layers:
        for j, blob in enumerate(node.tops):
            if blob not in diff_values or diff_values[blob] not in receives and (node.name, j) in receives:
                diff_values[blob] = (node.name, j)
    return NeedBackward({name: propagates[k] for name, k in index.items()}, frozenset(receives),
                        frozenset(source.values()), diff_values)
