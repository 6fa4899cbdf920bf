"""Caffemodels read from their wire format, so that the weights are never decoded by
protobuf: the file is mapped, the blobs' packed data fields become numpy views over the
mapping, and protobuf parses only what remains (the layer definitions and blob shapes).

NetParameter.layer (100) holds LayerParameter, whose blobs are field 7; the V1
NetParameter.layers (2) holds V1LayerParameter, whose blobs are field 6. In a BlobProto,
data (5) and diff (6) are packed floats, double_data (8) and double_diff (9) packed
doubles; shape (7) and the legacy num/channels/height/width (1-4) are kept for protobuf.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import numpy as np

NET_LAYER, NET_V1_LAYERS = 100, 2
BLOBS_FIELD = {NET_LAYER: 7, NET_V1_LAYERS: 6}
_DATA, _DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_MAX_GROUP_DEPTH = 64


class WireError(ValueError):
    """The bytes are no valid protobuf message; the reader adds the file's name."""


@dataclass
class BlobValues:
    """Where a blob's values lie in the file: (start, end) byte ranges of float32 `data`
    and float64 `double_data` (several when the field was written in pieces)."""

    floats: List[Tuple[int, int]] = field(default_factory=list)
    doubles: List[Tuple[int, int]] = field(default_factory=list)

    def array(self, buffer) -> np.ndarray:
        """The values, flat: a view over `buffer` when stored in one piece, as they always are."""
        ranges, dtype = (self.doubles, "<f8") if self.doubles else (self.floats, "<f4")
        views = [np.frombuffer(buffer, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=start)
                 for start, end in ranges]
        if len(views) == 1:
            return views[0]
        joined = np.concatenate(views) if views else np.zeros(0, dtype)
        joined.flags.writeable = False  # read-only like the views, whichever way the file was written
        return joined


@dataclass
class SplitNet:
    """A serialized NetParameter without its blobs' values, and those values' places:
    `values[100][i][j]` is blob j of layer i (`layers[i]` for field 2, the V1 layers)."""

    definitions: bytes
    values: dict


def map_file(path) -> mmap.mmap:
    """The file, mapped read-only: arrays over it are read-only views (copy one to change it)."""
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


_COPY_CHUNK = 1 << 24  # bytes of the source copied between two releases of its pages
_PAGE = mmap.PAGESIZE


def _mapping_of(array: np.ndarray):
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base  # np.frombuffer keeps a memoryview
    return base if isinstance(base, mmap.mmap) else None


def copy_out(source: np.ndarray, out: np.ndarray) -> None:
    """out[...] = source, value for value in C order (`out`: contiguous, as many values,
    any shape and float dtype). Where `source` is a view over a file mapped by map_file,
    the pages copied are unmapped as the copy goes, so the file's pages and the copy are
    never resident together; the view stays valid (it reads back from the file)."""
    if not out.flags.c_contiguous or out.size != source.size:
        raise ValueError(f"copy_out needs a contiguous output of {source.size} values, not {out.shape}")
    flat_out, flat_source = out.reshape(-1), source.reshape(-1)
    mapping = _mapping_of(source)
    release = mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED")
    origin = np.frombuffer(mapping, np.uint8).ctypes.data if release else 0
    step = max(1, _COPY_CHUNK // flat_source.itemsize)
    for start in range(0, flat_source.size, step):
        chunk = flat_source[start:start + step]
        flat_out[start:start + step] = chunk
        if release:
            first = (chunk.ctypes.data - origin) // _PAGE * _PAGE
            end = min(-(-(chunk.ctypes.data - origin + chunk.nbytes) // _PAGE) * _PAGE, len(mapping))
            mapping.madvise(mmap.MADV_DONTNEED, first, end - first)


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint(buffer, pos: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise WireError(f"a varint runs past the end of its message at byte {pos}")
        if shift > 63:
            raise WireError(f"a varint longer than 10 bytes at byte {pos}")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def fields(buffer, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(number, wire type, value start, value end, field start) of each field in
    buffer[start:end]; a length-delimited value spans its payload."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buffer, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {field_start}")
        value_start, pos = _skip_value(buffer, pos, end, number, wire_type, 0)
        yield number, wire_type, value_start, pos, field_start


def _skip_value(buffer, pos: int, end: int, number: int, wire_type: int, depth: int) -> Tuple[int, int]:
    """(value start, value end) of the value at `pos` of a field of `wire_type`."""
    if wire_type == _VARINT:
        value_start, value_end = pos, _varint(buffer, pos, end)[1]
    elif wire_type in (_FIXED64, _FIXED32):
        value_start, value_end = pos, pos + (8 if wire_type == _FIXED64 else 4)
    elif wire_type == _LENGTH:
        length, value_start = _varint(buffer, pos, end)
        value_end = value_start + length
    elif wire_type == _START_GROUP:
        value_start, value_end = pos, _skip_group(buffer, pos, end, number, depth + 1)
    else:
        raise WireError(f"field {number} has wire type {wire_type} at byte {pos}")
    if value_end > end:
        raise WireError(f"field {number} runs past the end of its message at byte {end} (truncated file?)")
    return value_start, value_end


def _skip_group(buffer, pos: int, end: int, number: int, depth: int) -> int:
    # Groups are no part of Caffe's schema, but protobuf keeps them as unknown fields.
    if depth > _MAX_GROUP_DEPTH:
        raise WireError(f"groups nested deeper than {_MAX_GROUP_DEPTH} at byte {pos}")
    while pos < end:
        key, pos = _varint(buffer, pos, end)
        if key & 7 == _END_GROUP:
            if key >> 3 != number:
                raise WireError(f"group {number} closed by field {key >> 3} at byte {pos}")
            return pos
        pos = _skip_value(buffer, pos, end, key >> 3, key & 7, depth)[1]
    raise WireError(f"group {number} is never closed")


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload` (wire type 2), as protobuf writes it."""
    return encode_varint(number << 3 | _LENGTH) + encode_varint(len(payload)) + payload


def split_net(buffer) -> SplitNet:
    """Walk a serialized NetParameter; raises WireError where it is malformed."""
    parts, values = [], {NET_LAYER: [], NET_V1_LAYERS: []}
    for number, wire_type, start, end, field_start in fields(buffer, 0, len(buffer)):
        if number in values and wire_type == _LENGTH:
            layer, blobs = _split_layer(buffer, start, end, BLOBS_FIELD[number])
            parts.append(length_delimited(number, layer))
            values[number].append(blobs)
        else:
            parts.append(buffer[field_start:end])
    return SplitNet(b"".join(parts), values)


def _split_layer(buffer, start: int, end: int, blobs_field: int) -> Tuple[bytes, List[BlobValues]]:
    parts, blobs = [], []
    for number, wire_type, value_start, value_end, field_start in fields(buffer, start, end):
        if number == blobs_field and wire_type == _LENGTH:
            blob, values = _split_blob(buffer, value_start, value_end)
            parts.append(length_delimited(number, blob))
            blobs.append(values)
        else:
            parts.append(buffer[field_start:value_end])
    return b"".join(parts), blobs


def _split_blob(buffer, start: int, end: int) -> Tuple[bytes, BlobValues]:
    parts, values = [], BlobValues()
    for number, wire_type, value_start, value_end, field_start in fields(buffer, start, end):
        if number in (_DATA, _DIFF) and wire_type in (_LENGTH, _FIXED32):
            _check_packed(number, value_end - value_start, 4, field_start)
            if number == _DATA:
                values.floats.append((value_start, value_end))
        elif number in (_DOUBLE_DATA, _DOUBLE_DIFF) and wire_type in (_LENGTH, _FIXED64):
            _check_packed(number, value_end - value_start, 8, field_start)
            if number == _DOUBLE_DATA:
                values.doubles.append((value_start, value_end))
        else:
            parts.append(buffer[field_start:value_end])  # shape, legacy dims, unknown fields
    return b"".join(parts), values


def _check_packed(number: int, length: int, size: int, field_start: int) -> None:
    if length % size:
        raise WireError(f"blob field {number} at byte {field_start} holds {length} bytes, "
                        f"not a whole number of {size}-byte values")
