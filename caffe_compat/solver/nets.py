"""The nets a solver prototxt names: the TRAIN net and one TEST net per test_iter, built
with the solver's train_state / test_state, the TEST nets sharing the TRAIN weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

from ..errors import CaffeCompatError
from ..graph import build_graph
from ..io.files import NetFile, read_prototxt
from ..memory import check_blob_memory
from ..net import CaffeNet


def net_source(param, where: str) -> Tuple[str, object]:
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


def test_sources(param, train: Tuple[str, NetFile], where: str) -> List[Tuple[str, NetFile]]:
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


def build_net(net_file: NetFile, phase: str, override, where: str, device) -> CaffeNet:
    level, stages = _state_of(net_file, override)
    graph = build_graph(net_file.net, phase, net_file.dialect, level, stages)
    if graph.inputs:
        raise CaffeCompatError(f"{where}: the {phase} net reads Input blobs ({', '.join(graph.inputs)}); "
                               f"training needs data layers (Data or ImageData) instead")
    net = CaffeNet(graph)
    # Before the first batch allocates them: a batch_size too large is one line, not a MemoryError.
    check_blob_memory(net.blob_shapes, f"{where}: the {phase} net", gradients=phase == "TRAIN", device=device)
    return net


def share_weights(target: CaffeNet, source: CaffeNet) -> None:
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

