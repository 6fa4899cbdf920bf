"""From files to a `CaffeNet`: the readers, the graph and the net in one call."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

from .deploy import feed_absent_sources
from .graph import build_graph
from .io.files import NetFile, read_prototxt, read_with_weights, weights_of
from .net import CaffeNet

PathLike = Union[str, Path]


def load_net(prototxt: Union[PathLike, NetFile], weights: Optional[PathLike] = None, phase: str = "TEST",
             dialect: Optional[str] = None, stages: Sequence[str] = (), level: int = 0,
             input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
             allow_missing_weights: bool = False, max_memory: Union[None, int, str] = None,
             compile: bool = False, fold: bool = True):
    """The net of `phase`, with the weights of a caffemodel (or its fillers' values).

    Data and ImageData layers whose source is absent become inputs (a warning says so;
    see `deploy.feed_absent_sources`), shaped as they imply or by `input_shapes`
    ({blob: shape}). Weights that leave layers with parameters unset are an error unless
    `allow_missing_weights`; `max_memory` ('8G', or bytes) bounds the parameters' size.
    `compile=True` returns the net wrapped in torch.compile (`compiled.CompiledNet`);
    `fold=False` keeps BatchNorm, Scale and the like out of the convolutions' weights in
    the inference path (see `inference`)."""
    net_file = prototxt if isinstance(prototxt, NetFile) else read_prototxt(prototxt, dialect)
    blobs = None
    if weights is not None:
        net_file, weights_file = read_with_weights(net_file, weights, dialect)
        blobs = weights_of(weights_file)
    net_param, notes = feed_absent_sources(net_file.net, phase.upper(), level, stages, input_shapes)
    for note in notes:
        warnings.warn(f"{net_file.path}: {note}", stacklevel=2)
    graph = build_graph(net_param, phase, net_file.dialect, level, stages, source=str(net_file.path))
    net = CaffeNet(graph, blobs, input_shapes, weights_source=None if weights is None else str(weights),
                   allow_missing_weights=allow_missing_weights, max_memory=max_memory, fold=fold)
    if compile:
        from .compiled import compile_net

        return compile_net(net)
    return net
