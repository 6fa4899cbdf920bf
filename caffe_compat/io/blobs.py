"""BlobProto <-> numpy, including the legacy 4-D num/channels/height/width dims."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from ..errors import CaffeCompatError
from .wire import length_delimited


_LEGACY_DIMS = ("num", "channels", "height", "width")


def is_legacy(blob) -> bool:
    """Caffe's rule: any of the four legacy dims set means a legacy 4-D blob."""
    return any(blob.HasField(d) for d in _LEGACY_DIMS)


def blob_shape(blob) -> Tuple[int, ...]:
    if is_legacy(blob):
        return tuple(getattr(blob, d) for d in _LEGACY_DIMS)
    return tuple(int(d) for d in blob.shape.dim)  # no dims: a scalar blob


_MAX_COUNT = 2 ** 63 - 1


def element_count(shape: Sequence[int], where: str) -> int:
    """How many values `shape` holds; raises on negative dims or a count past int64."""
    if any(d < 0 for d in shape):
        raise CaffeCompatError(f"{where}: shape {tuple(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > _MAX_COUNT:
        raise CaffeCompatError(f"{where}: shape {tuple(shape)} holds more values than int64 can count")
    return count


def shaped(values: np.ndarray, shape: Tuple[int, ...], where: str) -> np.ndarray:
    """`values` (flat) as an array of `shape`, which must hold exactly as many."""
    count = element_count(shape, where)
    if values.size != count:
        raise CaffeCompatError(f"{where}: holds {values.size} values but its shape {shape} needs {count}")
    return values.reshape(shape)


def blob_to_array(blob, where: str = "blob") -> np.ndarray:
    """The blob's data as a float32 array (float64 when stored as double_data)."""
    if len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64)
    else:
        values = np.asarray(blob.data, dtype=np.float32)
    return shaped(values, blob_shape(blob), where)


def array_to_blob(array: np.ndarray, blob) -> None:
    """Fill `blob` (a BlobProto of either dialect) in the current format: `shape` and float data."""
    array = np.asarray(array)
    blob.Clear()
    blob.shape.dim.extend(int(d) for d in array.shape)
    double = array.dtype == np.float64
    raw = np.ascontiguousarray(array, dtype="<f8" if double else "<f4").tobytes()
    # Packed repeated field written directly: element-wise extend() is slow for large blobs.
    field_number = 8 if double else 5  # BlobProto.double_data / BlobProto.data
    blob.MergeFromString(length_delimited(field_number, raw))
