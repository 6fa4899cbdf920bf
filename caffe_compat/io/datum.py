"""Caffe's `Datum` records (the values of its LMDB databases) to arrays."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Tuple

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import CaffeCompatError
from .atomic import atomic_folder
from .blobs import shaped
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
    return shaped(array, shape, f"{where}: Datum"), datum.label


def array_to_datum(array: np.ndarray, label: int):
    """A Datum of a C x H x W uint8 (`data`) or float (`float_data`) array."""
    datum = messages("bvlc").Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2],
                                   label=int(label))
    if array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(np.asarray(array, dtype=np.float32).ravel().tolist())
    return datum


def write_datum_lmdb(path, records: Iterable[Tuple[np.ndarray, int]], commit_every: int = 1000,
                     initial_map_size: int = 1 << 28) -> int:
    """Write (C x H x W array, label) records under keys 00000000, 00000001, ... (the key
    order Caffe's Data layer reads in). The folder must not exist yet; it is built beside
    its place and renamed there when complete (io/atomic.py), so a failed or killed write
    leaves no partial LMDB. Returns the count."""
    import lmdb

    path = Path(path)
    if path.exists():
        raise CaffeCompatError(f"{path}: already exists; remove it first (records would mix)")
    with atomic_folder(path, failures=(lmdb.Error,)) as building:
        return fill_datum_lmdb(building, records, commit_every, initial_map_size)


def fill_datum_lmdb(path, records: Iterable[Tuple[np.ndarray, int]], commit_every: int = 1000,
                    initial_map_size: int = 1 << 28) -> int:
    """`write_datum_lmdb` in place, for a caller that builds the whole folder around it
    atomically; raises lmdb.Error and OSError as they come."""
    import lmdb

    # The map starts small and doubles when full: some platforms allocate all of it up front.
    env = lmdb.open(str(path), map_size=initial_map_size)
    count = 0
    pending = []
    try:
        for array, label in records:
            pending.append((f"{count:08d}".encode(), array_to_datum(array, label).SerializeToString()))
            count += 1
            if len(pending) == commit_every:
                _commit(env, pending)
                pending = []
        _commit(env, pending)
    finally:
        env.close()
    return count


def _commit(env, pending) -> None:
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in pending:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
