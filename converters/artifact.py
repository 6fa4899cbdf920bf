"""The converted model: one self-contained file holding the net definition (prototxt
text, with its dialect and phase), the weights by Caffe layer name, the preprocessing
the net expects, and sha256 checksums of the net text and the weights.

Two containers hold the same content:
- `.pt` (any name but .safetensors): a plain dict of strings and tensors, so
  `torch.load(path, weights_only=True)` reads it and no pickled code travels with it;
- `.safetensors`: the tensors keyed '<layer>/<index>', everything else in the header's
  metadata (strings; the layer list and the preprocessing as JSON).

Both are validated on load: every key present with its type, the checksums matching,
the net text parsing; anything else is one CaffeCompatError naming the file and key.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from google.protobuf import text_format

from .. import __version__
from ..errors import CaffeCompatError, quote, shortened
from ..graph import build_graph
from ..io.atomic import atomic_file, write_bytes
from ..io.files import NetFile, with_weights, write_caffemodel
from ..io.schema import DIALECTS, messages
from ..io.text import parse_json, parse_text, screen_text
from ..net import CaffeNet
from .preprocess import PreprocessOverrides, with_overrides

FORMAT = "caffe-compat-model"
FORMAT_VERSION = 2  # 2: checksums and preprocessing
SAFETENSORS_SUFFIX = ".safetensors"
PHASES = ("TRAIN", "TEST")
WEIGHT_DTYPES = (np.dtype("float32"), np.dtype("float64"))  # a caffemodel's data and double_data
PathLike = Union[str, Path]
Weights = Dict[str, List[np.ndarray]]


def weights_sha256(weights: Mapping[str, Sequence[np.ndarray]]) -> str:
    """Over layer names (sorted), and each blob's dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode("utf-8") + b"\0")
        for array in weights[name]:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode("ascii") + b"\0")
            digest.update(array.data)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _as_built(net: CaffeNet):
    """The net's definition with its inputs at the shapes it was built for (an
    --input-shape over a prototxt's own dims must survive the round trip through a file)."""
    definition = type(net.graph.net)()
    definition.CopyFrom(net.graph.net)
    for layer in definition.layer:
        if layer.type == "Input" and all(top in net.blob_shapes for top in layer.top):
            del layer.input_param.shape[:]
            for top in layer.top:
                layer.input_param.shape.add().dim.extend(net.blob_shapes[top])
    if len(definition.input) and all(name in net.blob_shapes for name in definition.input):
        del definition.input_dim[:]
        del definition.input_shape[:]
        for name in definition.input:
            definition.input_shape.add().dim.extend(net.blob_shapes[name])
    return definition


def model_payload(net: CaffeNet, dialect: str, preprocess: Optional[Mapping[str, str]] = None) -> dict:
    net_text = text_format.MessageToString(_as_built(net))
    weights = net.caffe_weights()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "caffe_compat_version": __version__,
        "dialect": dialect,
        "phase": net.phase,
        "net_prototxt": net_text,
        "net_sha256": text_sha256(net_text),
        "preprocess": dict(preprocess or {}),
        "weights": weights,
        "weights_sha256": weights_sha256(weights),
    }


def save_model(net: CaffeNet, path: PathLike, dialect: str, preprocess: Optional[Mapping[str, str]] = None) -> None:
    """Write `net` as a model file: safetensors for a '.safetensors' path, else `.pt`."""
    write_payload(model_payload(net, dialect, preprocess), path)


def rewrite_model(source: PathLike, out: PathLike, overrides: Optional[PreprocessOverrides] = None) -> dict:
    """A model file written again, into `out`'s container, with `overrides` over its
    recorded preprocessing. Returns the payload written."""
    payload = read_model(source)
    net_file = model_net_file(payload, source)  # the net text must parse before it is passed on
    payload = {**payload, "preprocess": with_overrides(payload["preprocess"], overrides, net_file.net.name)}
    write_payload(payload, out)
    return payload


def write_payload(payload: dict, path: PathLike) -> None:
    if Path(path).suffix == ".onnx":
        raise CaffeCompatError(f"{path}: convert writes models (.pt, .safetensors) and caffemodels; "
                               f"ONNX is 'caffe-compat export-onnx'")
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        write_bytes(path, _to_safetensors(payload))
        return
    import torch

    payload = {**payload, "weights": {name: [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
                                      for name, arrays in payload["weights"].items()}}
    with atomic_file(path) as handle:
        torch.save(payload, handle)


def _to_safetensors(payload: dict) -> bytes:
    from safetensors.numpy import save

    tensors = {f"{name}/{i}": np.ascontiguousarray(a) for name, arrays in payload["weights"].items()
               for i, a in enumerate(arrays)}
    metadata = {key: value if isinstance(value, str) else json.dumps(value)
                for key, value in payload.items() if key != "weights"}
    metadata["layers"] = json.dumps([[name, len(arrays)] for name, arrays in payload["weights"].items()])
    return save(tensors, metadata=metadata)


# ---------------------------------------------------------------- reading

def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {shortened(text[0])}" if text else err.__class__.__name__


def _read_pt(path: Path) -> object:
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text is many lines and advises weights_only=False, which would run
        # whatever code the file carries: never that. Its one useful clause is kept.
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if named:
            raise CaffeCompatError(f"{path}: not a caffe-compat model: it holds pickled Python objects "
                                   f"({named.group(1)}) beyond tensors and plain data, which caffe-compat refuses "
                                   f"to load") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise CaffeCompatError(f"{path}: not a caffe-compat model, or damaged (not a plain-data pickle"
                               f"{': ' + shortened(reason.group(1).strip()) if reason else ''})") from None
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise CaffeCompatError(f"{path}: not a caffe-compat model, or damaged ({_first_line(err)})") from None
    if isinstance(payload, dict) and isinstance(payload.get("weights"), dict):
        weights = {}
        for name, tensors in payload["weights"].items():
            if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise CaffeCompatError(f"{path}: key 'weights' / {quote(name)}: expected a list of tensors")
            if any(t.layout != torch.strided or t.dtype not in (torch.float32, torch.float64) for t in tensors):
                raise CaffeCompatError(f"{path}: key 'weights' / {quote(name)}: tensors must be dense float32 or "
                                       f"float64")
            weights[name] = [t.numpy() for t in tensors]
        payload = {**payload, "weights": weights}
    return payload


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # the Rust reader raises its own error types
        raise CaffeCompatError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    payload: Dict[str, object] = dict(metadata)
    for key in ("format_version", "preprocess", "layers"):
        if key in payload:
            payload[key] = parse_json(f"{path}: metadata key '{key}'", payload[key])
    layers = payload.pop("layers", None)
    if not isinstance(layers, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                               and isinstance(e[1], int) for e in layers):
        raise CaffeCompatError(f"{path}: metadata key 'layers': expected a list of [layer, blob count]")
    weights = {}
    for name, count in layers:
        keys = [f"{name}/{i}" for i in range(count)]
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise CaffeCompatError(f"{path}: tensor {quote(absent[0])} (listed in 'layers') is missing")
        weights[name] = [tensors.pop(k) for k in keys]
    if tensors:
        raise CaffeCompatError(f"{path}: tensor {quote(next(iter(tensors)))} belongs to no listed layer")
    payload["weights"] = weights
    return payload


_FIELDS = {"format": str, "format_version": int, "caffe_compat_version": str, "dialect": str, "phase": str,
           "net_prototxt": str, "net_sha256": str, "preprocess": dict, "weights": dict, "weights_sha256": str}


def _validate(payload: object, path: Path) -> dict:
    # Type checks before comparisons: a tensor compared with == gives a tensor, not a bool.
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str) or payload["format"] != FORMAT:
        raise CaffeCompatError(f"{path}: not a caffe-compat model (written by 'caffe-compat convert' or 'train')")
    version = payload.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CaffeCompatError(f"{path}: model format version {quote(version)}; this caffe-compat reads version "
                               f"{FORMAT_VERSION} (convert the Caffe files again)")
    for key, kind in _FIELDS.items():
        if key not in payload:
            raise CaffeCompatError(f"{path}: key '{key}' is missing")
        if not isinstance(payload[key], kind) or (kind is int and isinstance(payload[key], bool)):
            raise CaffeCompatError(f"{path}: key '{key}': expected {kind.__name__}, found "
                                   f"{type(payload[key]).__name__}")
    if payload["dialect"] not in DIALECTS:
        raise CaffeCompatError(f"{path}: key 'dialect': {quote(payload['dialect'])} is not a dialect "
                               f"caffe-compat knows (convert --help lists them)")
    if payload["phase"] not in PHASES:
        raise CaffeCompatError(f"{path}: key 'phase': {quote(payload['phase'])} is not one of {', '.join(PHASES)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in payload["preprocess"].items()):
        raise CaffeCompatError(f"{path}: key 'preprocess': expected strings by strings")
    for name, arrays in payload["weights"].items():
        if not isinstance(name, str) or not all(isinstance(a, np.ndarray) and a.dtype in WEIGHT_DTYPES
                                                for a in arrays):
            raise CaffeCompatError(f"{path}: key 'weights' / {quote(name)}: expected float32 or float64 arrays")
    if text_sha256(payload["net_prototxt"]) != payload["net_sha256"]:
        raise CaffeCompatError(f"{path}: the stored net text does not match its checksum (key 'net_sha256'): "
                               f"the file is damaged")
    if weights_sha256(payload["weights"]) != payload["weights_sha256"]:
        raise CaffeCompatError(f"{path}: the stored weights do not match their checksum (key 'weights_sha256'): "
                               f"the file is damaged")
    return payload


def read_model(path: PathLike) -> dict:
    """A model file's content, validated: the keys of `model_payload`, weights as numpy."""
    path = Path(path)
    if not path.is_file():
        raise CaffeCompatError(f"{path}: no such model file")
    payload = _read_safetensors(path) if path.suffix == SAFETENSORS_SUFFIX else _read_pt(path)
    return _validate(payload, path)


def model_net_file(payload: dict, path: PathLike) -> NetFile:
    """The stored net text, screened and parsed as a prototxt file is."""
    where = f"{path}: key 'net_prototxt'"
    text = screen_text(where, payload["net_prototxt"], "net")
    net = parse_text(where, text, messages(payload["dialect"]).NetParameter(), "net")
    return NetFile(net, payload["dialect"], Path(path))


def model_weights(payload: dict) -> Weights:
    return {name: list(arrays) for name, arrays in payload["weights"].items()}


def load(path: PathLike, phase: Optional[str] = None) -> CaffeNet:
    """The `CaffeNet` a model file holds, in its saved phase unless `phase` is given. Its
    `preprocess` attribute holds the recorded preprocessing (`preprocess.*` entries)."""
    payload = read_model(path)
    net_file = model_net_file(payload, path)
    graph = build_graph(net_file.net, phase or payload["phase"], payload["dialect"])
    net = CaffeNet(graph, model_weights(payload))
    net.preprocess = dict(payload["preprocess"])
    return net


def model_to_caffemodel(model_path: PathLike, out: PathLike) -> None:
    """Write a model's weights back as a caffemodel, in the dialect it came from."""
    payload = read_model(model_path)
    net_file = model_net_file(payload, model_path)
    write_caffemodel(with_weights(net_file.net, model_weights(payload)), out)
