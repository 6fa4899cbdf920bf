"""The converted model: one self-contained file holding the net definition (prototxt
text, with its dialect and phase) and the weights by Caffe layer name. It is a plain
dict of strings and tensors, so `torch.load(path, weights_only=True)` reads it and no
pickled code travels with it."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from google.protobuf import text_format

from .. import __version__
from ..errors import CaffeCompatError
from ..graph import build_graph
from ..io.atomic import atomic_path
from ..io.files import NetFile, with_weights, write_caffemodel
from ..io.schema import messages
from ..net import CaffeNet

FORMAT = "caffe-compat-model"
PathLike = Union[str, Path]


def save_model(net: CaffeNet, path: PathLike, dialect: str) -> None:
    payload = {
        "format": FORMAT,
        "format_version": 1,
        "caffe_compat_version": __version__,
        "dialect": dialect,
        "phase": net.phase,
        "net_prototxt": text_format.MessageToString(net.graph.net),
        "weights": {name: [torch.from_numpy(a) for a in arrays] for name, arrays in net.caffe_weights().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model(path: PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CaffeCompatError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise CaffeCompatError(f"{path}: not a caffe-compat model ({err.__class__.__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CaffeCompatError(f"{path}: not a caffe-compat model (written by 'caffe-compat convert' or 'train')")
    return payload


def model_net_file(payload: dict, path: PathLike) -> NetFile:
    net = messages(payload["dialect"]).NetParameter()
    text_format.Parse(payload["net_prototxt"], net)
    return NetFile(net, payload["dialect"], Path(path))


def model_weights(payload: dict) -> Dict[str, List[np.ndarray]]:
    return {name: [t.numpy() for t in tensors] for name, tensors in payload["weights"].items()}


def load(path: PathLike, phase: Optional[str] = None) -> CaffeNet:
    """The `CaffeNet` a model file holds, in its saved phase unless `phase` is given."""
    payload = read_model(path)
    net_file = model_net_file(payload, path)
    graph = build_graph(net_file.net, phase or payload["phase"], payload["dialect"])
    return CaffeNet(graph, model_weights(payload))


def model_to_caffemodel(model_path: PathLike, out: PathLike) -> None:
    """Write a model's weights back as a caffemodel, in the dialect it came from."""
    payload = read_model(model_path)
    net_file = model_net_file(payload, model_path)
    write_caffemodel(with_weights(net_file.net, model_weights(payload)), out)
