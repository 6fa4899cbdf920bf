"""Caffe's `Datum` records (the values of its LMDB databases) to arrays."""
from __future__ import annotations

import io
from typing import Tuple

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import CaffeCompatError
from .schema import messages


def parse_datum(data: bytes, where: str):
    datum = messages("bvlc").Datum()
    try:
        datum.ParseFromString(data)
    except DecodeError as err:
        raise CaffeCompatError(f"{where}: not a Caffe Datum record: {err}") from None
    return datum


def datum_to_array(datum, where: str) -> Tuple[np.ndarray, int]:
    """(C x H x W array, label). uint8 `data` stays uint8, `float_data` gives float32;
    encoded datums (JPEG/PNG bytes) are decoded with Pillow to BGR, as Caffe's OpenCV does."""
    shape = (datum.channels, datum.height, datum.width)
    if datum.encoded:
        try:
            from PIL import Image
        except ImportError:
            raise CaffeCompatError(f"{where}: encoded Datum needs Pillow (pip install 'caffe-compat[images]')") from None
        try:
            image = Image.open(io.BytesIO(datum.data))
            image = image.convert("RGB" if datum.channels != 1 else "L")
        except Exception as err:  # Pillow raises several types for damaged images
            raise CaffeCompatError(f"{where}: encoded image cannot be decoded: {err}") from None
        pixels = np.asarray(image, dtype=np.uint8)
        array = pixels[None] if pixels.ndim == 2 else pixels[:, :, ::-1].transpose(2, 0, 1)
        return np.ascontiguousarray(array), datum.label
    if len(datum.data):
        array = np.frombuffer(datum.data, dtype=np.uint8)
    elif len(datum.float_data):
        array = np.asarray(datum.float_data, dtype=np.float32)
    else:
        raise CaffeCompatError(f"{where}: Datum holds no data")
    if array.size != int(np.prod(shape)):
        raise CaffeCompatError(f"{where}: Datum holds {array.size} values but declares shape {shape}")
    return array.reshape(shape), datum.label
