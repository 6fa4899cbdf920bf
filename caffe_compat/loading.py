"""From files to a `CaffeNet`: the readers, the graph and the net in one call."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

from .graph import build_graph
from .io.files import NetFile, read_caffemodel, read_prototxt, weights_of
from .net import CaffeNet

PathLike = Union[str, Path]


def load_net(prototxt: Union[PathLike, NetFile], weights: Optional[PathLike] = None, phase: str = "TEST",
             dialect: Optional[str] = None, stages: Sequence[str] = (), level: int = 0,
             input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> CaffeNet:
    net_file = prototxt if isinstance(prototxt, NetFile) else read_prototxt(prototxt, dialect)
    blobs = None
    if weights is not None:
        blobs = weights_of(read_caffemodel(weights, dialect))
    graph = build_graph(net_file.net, phase, net_file.dialect, level, stages)
    return CaffeNet(graph, blobs, input_shapes)
