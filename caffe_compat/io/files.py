"""Reading and writing Caffe's files: prototxt (text) and caffemodel (binary) nets,
solver prototxts and binaryproto blobs. Every failure names the file."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from ..errors import CaffeCompatError
from . import atomic, wire
from .blobs import array_to_blob, blob_shape, blob_to_array, shaped
from .dialects.detect import binary_fits, choose_binary, detect_text_dialect, unknown_names
from .schema import check_strings, messages, unknown_fields
from .text import decode_text, looks_binary, parse_text
from .upgrade import upgrade_net

PathLike = Union[str, Path]


@dataclass
class NetFile:
    """A net read from a file, upgraded to the current format. For a caffemodel, the
    layers' BlobProtos keep their shapes only: the values are in `weights`, read-only
    arrays over the mapped file (read them with `weights_of`)."""

    net: object  # NetParameter of `dialect`
    dialect: str
    path: Path
    upgraded: bool = False
    unknown: List[str] = field(default_factory=list)
    weights: Optional[Dict[str, List[np.ndarray]]] = None


def _check_file(path: Path, what: str) -> None:
    try:
        if not path.exists():
            raise CaffeCompatError(f"{path}: no such file ({what})")
        if path.is_dir():
            raise CaffeCompatError(f"{path}: is a directory, expected a {what}")
        size = path.stat().st_size
    except OSError as err:  # e.g. a folder on the way that may not be searched
        raise CaffeCompatError(f"{path}: cannot be read ({err.strerror}), expected a {what}") from None
    if not size:
        raise CaffeCompatError(f"{path}: empty file, expected a {what}")


def _read_bytes(path: Path, what: str, limit: int = -1) -> bytes:
    _check_file(path, what)
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError as err:
        raise CaffeCompatError(f"{path}: cannot be read ({err.strerror}), expected a {what}") from None


def _warn_unknown(path: Path, unknown: List[str]) -> None:
    if unknown:
        warnings.warn(f"{path}: fields this schema does not know were kept but ignored: "
                      + "; ".join(unknown), stacklevel=4)


def read_prototxt(path: PathLike, dialect: Optional[str] = None) -> NetFile:
    path = Path(path)
    return _prototxt_from(path, _read_bytes(path, "prototxt"), dialect)


def _prototxt_from(path: Path, data: bytes, dialect: Optional[str], lenient: bool = False) -> NetFile:
    text = decode_text(path, data, "prototxt")
    dialect = dialect or detect_text_dialect(text)
    unknown = [f"field name '{name}' (not in dialect {dialect}: skipped)"
               for name in sorted(unknown_names(text, dialect))] if lenient else []
    net = parse_text(path, text, messages(dialect).NetParameter(), "prototxt", allow_unknown=bool(unknown))
    upgraded = upgrade_net(net)
    return NetFile(net, dialect, path, upgraded, unknown)


def read_caffemodel(path: PathLike, dialect: Optional[str] = None, prototxt: Optional[NetFile] = None) -> NetFile:
    """The net and its weights; the weights are views over the mapped file, never decoded by protobuf.

    `dialect` decides; else the caffemodel's own field numbers, checked against
    `prototxt` (the net it goes with) when given, whose dialect wins a tie."""
    path = Path(path)
    _check_file(path, "caffemodel")
    try:
        buffer = wire.map_file(path)
    except OSError as err:
        raise CaffeCompatError(f"{path}: cannot be read ({err.strerror}), expected a caffemodel") from None
    head = buffer[:4096]
    if not looks_binary(head) and head.lstrip()[:1].isalpha():
        raise CaffeCompatError(f"{path}: looks like a text prototxt, expected a binary caffemodel")
    invalid = f"{path}: not a valid caffemodel (truncated or not a Caffe NetParameter)"
    try:
        split = wire.split_net(buffer)
    except wire.WireError as err:
        raise CaffeCompatError(f"{invalid}: {err}") from None
    try:
        if not dialect:
            expected = (prototxt.dialect, str(prototxt.path)) if prototxt is not None else None
            dialect, note = choose_binary(binary_fits(split.definitions), str(path), expected)
            if note:
                warnings.warn(note, stacklevel=2)
        net = messages(dialect).NetParameter()
        net.ParseFromString(split.definitions)
    except DecodeError as err:
        raise CaffeCompatError(f"{invalid}: {err}") from None
    check_strings(net, str(path))
    unknown = unknown_fields(net)
    _warn_unknown(path, unknown)
    weights = _weights_over(path, net, split, buffer)
    upgraded = upgrade_net(net)
    return NetFile(net, dialect, path, upgraded, unknown, weights)


def _weights_over(path: Path, net, split: wire.SplitNet, buffer) -> Dict[str, List[np.ndarray]]:
    weights = {}
    for layers, values in ((net.layer, split.values[wire.NET_LAYER]), (net.layers, split.values[wire.NET_V1_LAYERS])):
        # protobuf keeps every occurrence of a repeated message field, in order: layer i is values[i].
        for layer, blobs in zip(layers, values):
            if blobs:
                weights[layer.name] = [shaped(v.array(buffer), blob_shape(b), f"{path}: layer '{layer.name}' blob {i}")
                                       for i, (b, v) in enumerate(zip(layer.blobs, blobs))]
    return weights


def read_net(path: PathLike, dialect: Optional[str] = None, lenient: bool = False) -> NetFile:
    """A prototxt or a caffemodel, told apart by content. `lenient` (for showing a net, not
    running it) reads a prototxt whose field names no dialect has, skipping and listing them."""
    path = Path(path)
    if looks_binary(_read_bytes(path, "net file", 4096)):
        return read_caffemodel(path, dialect)
    return _prototxt_from(path, _read_bytes(path, "net file"), dialect, lenient)


def weights_of(net_file: NetFile) -> Dict[str, List[np.ndarray]]:
    """Blobs by layer name, in the order the layer keeps them."""
    if net_file.weights is not None:
        return {name: list(arrays) for name, arrays in net_file.weights.items()}
    weights = {}
    for layer in net_file.net.layer:
        if len(layer.blobs):
            weights[layer.name] = [blob_to_array(b, f"{net_file.path}: layer '{layer.name}' blob {i}")
                                   for i, b in enumerate(layer.blobs)]
    return weights


def write_prototxt(net, path: PathLike) -> None:
    atomic.write_text(path, text_format.MessageToString(net))


def write_caffemodel(net, path: PathLike) -> None:
    atomic.write_bytes(path, net.SerializeToString())


def read_solver(path: PathLike):
    """A SolverParameter (the BVLC schema: solvers carry no dialect-specific fields)."""
    path = Path(path)
    text = decode_text(path, _read_bytes(path, "solver prototxt"), "solver prototxt")
    return parse_text(path, text, messages("bvlc").SolverParameter(), "solver prototxt")


def read_binaryproto(path: PathLike) -> np.ndarray:
    """A mean file: one BlobProto, as an array (legacy dims give 4-D)."""
    path = Path(path)
    data = _read_bytes(path, "binaryproto")
    blob = messages("bvlc").BlobProto()
    try:
        blob.ParseFromString(data)
    except DecodeError as err:
        raise CaffeCompatError(f"{path}: not a valid binaryproto (BlobProto): {err}") from None
    if not len(blob.data) and not len(blob.double_data):
        raise CaffeCompatError(f"{path}: binaryproto holds no data")
    return blob_to_array(blob, str(path))


def with_weights(net, weights: Dict[str, List[np.ndarray]]):
    """A copy of `net` whose layers carry `weights` (by layer name) as their blobs."""
    result = type(net)()
    result.CopyFrom(net)
    for layer in result.layer:
        del layer.blobs[:]
        for array in weights.get(layer.name, ()):
            array_to_blob(array, layer.blobs.add())
    return result
