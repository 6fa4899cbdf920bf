"""The net for one phase: the layers Caffe would instantiate, in order, with their
blob wiring, in-place tops, shared parameters and loss weights, validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import CaffeCompatError

PHASES = ("TRAIN", "TEST")


@dataclass
class ParamSpec:
    name: str
    lr_mult: float
    decay_mult: float


@dataclass
class LayerNode:
    name: str
    type: str
    param: object  # LayerParameter
    bottoms: List[str]
    tops: List[str]
    loss_weights: List[float]
    param_specs: List[ParamSpec]


@dataclass
class Graph:
    name: str
    phase: str
    dialect: str
    layers: List[LayerNode]
    inputs: Dict[str, Optional[Tuple[int, ...]]]  # blobs fed by Input layers, with their declared shapes
    outputs: List[str]  # blobs no later layer consumes (Caffe's net outputs)
    net: object = field(repr=False, default=None)  # the NetParameter it came from
    source: Optional[str] = None  # the file it came from, for messages naming it

    def describe(self) -> str:
        """The net as messages name it: its file where known."""
        return f"'{self.source}'" if self.source else f"net '{self.name}'"

    def layer(self, name: str) -> LayerNode:
        for node in self.layers:
            if node.name == name:
                return node
        raise CaffeCompatError(f"net '{self.name}' has no layer '{name}'")


def _state_meets_rule(rule, phase: str, level: int, stages: Sequence[str]) -> bool:
    if rule.HasField("phase") and PHASES[rule.phase] != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(stage not in stages for stage in rule.stage):
        return False
    if any(stage in stages for stage in rule.not_stage):
        return False
    return True


def layer_included(layer, phase: str, level: int = 0, stages: Sequence[str] = ()) -> bool:
    """Caffe's FilterNet: include rules (any may match) or exclude rules (none may match)."""
    if len(layer.include) and len(layer.exclude):
        raise CaffeCompatError(f"layer '{layer.name}': specifies both include and exclude rules")
    if len(layer.include):
        return any(_state_meets_rule(r, phase, level, stages) for r in layer.include)
    return not any(_state_meets_rule(r, phase, level, stages) for r in layer.exclude)


def _loss_weights(layer) -> List[float]:
    if len(layer.loss_weight):
        if len(layer.loss_weight) != len(layer.top):
            raise CaffeCompatError(f"layer '{layer.name}': {len(layer.loss_weight)} loss_weight values "
                                   f"for {len(layer.top)} tops")
        return list(layer.loss_weight)
    # Caffe gives the first top of a *Loss layer weight 1, every other top 0.
    return [1.0 if i == 0 and layer.type.endswith("Loss") else 0.0 for i in range(len(layer.top))]


def build_graph(net, phase: str = "TEST", dialect: str = "bvlc", level: int = 0,
                stages: Sequence[str] = (), source: Optional[str] = None) -> Graph:
    phase = phase.upper()
    if phase not in PHASES:
        raise CaffeCompatError(f"unknown phase '{phase}' (expected TRAIN or TEST)")
    if len(net.layers) or len(net.input):
        raise CaffeCompatError(f"net '{net.name}': legacy definitions must be upgraded before building a graph")
    producers: Dict[str, str] = {}
    later: Dict[str, str] = {}
    included = [layer for layer in net.layer if layer_included(layer, phase, level, stages)]
    for layer in included:
        for top in layer.top:
            later.setdefault(top, layer.name)

    nodes: List[LayerNode] = []
    inputs: Dict[str, Tuple[int, ...]] = {}
    consumed: Dict[str, bool] = {}
    for layer in included:
        name = layer.name
        if not layer.type:
            raise CaffeCompatError(f"layer '{name}': has no type")
        for bottom in layer.bottom:
            if bottom not in producers:
                if bottom in later:
                    raise CaffeCompatError(f"layer '{name}': bottom '{bottom}' is produced only by a later layer "
                                           f"'{later[bottom]}' (a cycle, or layers out of order)")
                raise CaffeCompatError(f"layer '{name}': bottom '{bottom}' is produced by no layer "
                                       f"of the {phase} net")
            consumed[bottom] = True
        for top in layer.top:
            if top in producers and top not in layer.bottom:
                raise CaffeCompatError(f"layer '{name}': top '{top}' is already produced by layer "
                                       f"'{producers[top]}' (only in-place layers may reuse a blob name)")
            producers[top] = name
            consumed[top] = False
        if layer.type == "Input":
            shapes = layer.input_param.shape
            if len(shapes) not in (0, 1, len(layer.top)):
                raise CaffeCompatError(f"layer '{name}': {len(shapes)} input shapes for {len(layer.top)} tops")
            for i, top in enumerate(layer.top):
                # No shape: Caffe leaves the blob to be shaped by whoever feeds it.
                inputs[top] = tuple(int(d) for d in shapes[min(i, len(shapes) - 1)].dim) if len(shapes) else None
        specs = [ParamSpec(p.name, p.lr_mult, p.decay_mult) for p in layer.param]
        nodes.append(LayerNode(name, layer.type, layer, list(layer.bottom), list(layer.top),
                               _loss_weights(layer), specs))
    names = [n.name for n in nodes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise CaffeCompatError(f"net '{net.name}': duplicate layer names {duplicated}")
    outputs = [blob for blob, used in consumed.items() if not used]
    return Graph(net.name, phase, dialect, nodes, inputs, outputs, net, source)


def param_owners(graph: Graph) -> Dict[Tuple[str, int], Tuple[str, int]]:
    """(layer, blob index) -> the (layer, blob index) owning a shared parameter, for
    every blob that names a param shared with an earlier layer."""
    owners: Dict[str, Tuple[str, int]] = {}
    shared: Dict[Tuple[str, int], Tuple[str, int]] = {}
    for node in graph.layers:
        for i, spec in enumerate(node.param_specs):
            if not spec.name:
                continue
            if spec.name in owners:
                shared[(node.name, i)] = owners[spec.name]
            else:
                owners[spec.name] = (node.name, i)
    return shared


def _names_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights_fit(graph: Graph, blob_counts: Mapping[str, int], weight_layers: Sequence[str],
                      source: Optional[str] = None, allow_missing: bool = False) -> List[str]:
    """Whether weights holding blobs for `weight_layers` fit the net whose layers have
    `blob_counts` parameter blobs; returns the notes to show (one line each).

    Caffe's CopyTrainedLayersFrom matches layers by name and skips the rest. Here weights
    that set nothing are an error, and so are layers left unset unless `allow_missing`
    (then a note with their count); a blob shared with a layer that gets weights is set.
    Layers only in the weights are a note, as in Caffe."""
    source = f"'{source}'" if source else "the weights"
    net = graph.describe()
    owners = param_owners(graph)
    group = {(layer, i): owners.get((layer, i), (layer, i))
             for layer, count in blob_counts.items() for i in range(count)}
    covered = {group[(layer, i)] for layer in weight_layers if layer in blob_counts
               for i in range(blob_counts[layer])}
    with_params = [layer for layer, count in blob_counts.items() if count]
    missing = [layer for layer in with_params
               if any(group[(layer, i)] not in covered for i in range(blob_counts[layer]))]
    if with_params and len(missing) == len(with_params):
        held = list(weight_layers) or ["no layer with blobs"]
        raise CaffeCompatError(f"{source} shares no layer with {net} ({graph.phase} net): the net's layers with "
                               f"parameters are {_names_list(with_params, 4)}; the weights hold "
                               f"{_names_list(held, 4)}")
    if missing and not allow_missing:
        raise CaffeCompatError(f"{source} has no weights for {len(missing)} of the {len(with_params)} layers "
                               f"with parameters of {net} ({graph.phase} net): {_names_list(missing)} "
                               f"(--allow-missing-weights / allow_missing_weights=True keeps their fillers)")
    notes = []
    if missing:
        notes.append(f"{source}: {len(missing)} layer(s) of {net} get no weights and keep their filler "
                     f"values: {_names_list(missing)}")
    skipped = [name for name in weight_layers if name not in blob_counts]
    if skipped:
        notes.append(f"{source}: {len(skipped)} layer(s) not in the {graph.phase} net were skipped, as Caffe "
                     f"does: {_names_list(skipped)}")
    return notes
