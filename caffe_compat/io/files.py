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
from . import atomic
from .blobs import array_to_blob, blob_to_array
from .schema import detect_binary_dialect, detect_text_dialect, messages, unknown_fields
from .upgrade import upgrade_net

PathLike = Union[str, Path]


@dataclass
class NetFile:
    """A net read from a file, upgraded to the current format."""

    net: object  # NetParameter of `dialect`
    dialect: str
    path: Path
    upgraded: bool = False
    unknown: List[str] = field(default_factory=list)


def _read_bytes(path: PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise CaffeCompatError(f"{path}: no such file ({what})")
    if path.is_dir():
        raise CaffeCompatError(f"{path}: is a directory, expected a {what}")
    data = path.read_bytes()
    if not data:
        raise CaffeCompatError(f"{path}: empty file, expected a {what}")
    return data


def _looks_binary(data: bytes) -> bool:
    head = data[:4096]
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the 4096-byte boundary is still text.
        return err.start < len(head) - 4
    return False


def _parse_text(path: Path, data: bytes, message, what: str):
    if _looks_binary(data):
        raise CaffeCompatError(f"{path}: looks like a binary file, expected a text {what}"
                               + (" (is it a caffemodel? pass it as the weights)" if what == "prototxt" else ""))
    try:
        text_format.Parse(data.decode("utf-8"), message)
    except text_format.ParseError as err:
        raise CaffeCompatError(f"{path}: not a valid {what}: {err}") from None
    return message


def _warn_unknown(path: Path, unknown: List[str]) -> None:
    if unknown:
        warnings.warn(f"{path}: fields this schema does not know were kept but ignored: "
                      + "; ".join(unknown), stacklevel=4)


def read_prototxt(path: PathLike, dialect: Optional[str] = None) -> NetFile:
    path = Path(path)
    return _prototxt_from(path, _read_bytes(path, "prototxt"), dialect)


def _prototxt_from(path: Path, data: bytes, dialect: Optional[str]) -> NetFile:
    if dialect is None and not _looks_binary(data):
        dialect = detect_text_dialect(data.decode("utf-8", errors="replace"))
    net = _parse_text(path, data, messages(dialect or "bvlc").NetParameter(), "prototxt")
    upgraded = upgrade_net(net)
    return NetFile(net, dialect or "bvlc", path, upgraded)


def read_caffemodel(path: PathLike, dialect: Optional[str] = None) -> NetFile:
    path = Path(path)
    return _caffemodel_from(path, _read_bytes(path, "caffemodel"), dialect)


def _caffemodel_from(path: Path, data: bytes, dialect: Optional[str]) -> NetFile:
    if not _looks_binary(data) and data.lstrip()[:1].isalpha():
        raise CaffeCompatError(f"{path}: looks like a text prototxt, expected a binary caffemodel")
    try:
        dialect = dialect or detect_binary_dialect(data)
        net = messages(dialect).NetParameter()
        net.ParseFromString(data)
    except DecodeError as err:
        raise CaffeCompatError(f"{path}: not a valid caffemodel (truncated or not a Caffe NetParameter): {err}") from None
    unknown = unknown_fields(net)
    _warn_unknown(path, unknown)
    upgraded = upgrade_net(net)
    return NetFile(net, dialect, path, upgraded, unknown)


def read_net(path: PathLike, dialect: Optional[str] = None) -> NetFile:
    """A prototxt or a caffemodel, told apart by content (the file is read once)."""
    path = Path(path)
    data = _read_bytes(path, "net file")
    return (_caffemodel_from if _looks_binary(data) else _prototxt_from)(path, data, dialect)


def weights_of(net_file: NetFile) -> Dict[str, List[np.ndarray]]:
    """Blobs by layer name, in the order the layer keeps them."""
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
    data = _read_bytes(path, "solver prototxt")
    return _parse_text(path, data, messages("bvlc").SolverParameter(), "solver prototxt")


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
