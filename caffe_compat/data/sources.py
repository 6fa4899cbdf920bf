"""Record sources: Caffe's `Data` layer over an LMDB of Datum records and its `ImageData`
layer over a list file of images, as prefetching modules.

Paths (`source`, `mean_file`, `root_folder`) resolve from the working directory, as in
Caffe. Random crops and mirrors come from a seeded numpy generator per layer (Caffe's own
random stream cannot be reproduced); everything deterministic (sequential reads, centre
crops, means, scale) equals Caffe's numbers exactly.

Several processes (`shard`): global batch g covers records [g*W*N, (g+1)*W*N) of the key
order (W processes, N = batch_size); process r takes the r-th block of N, so the
processes together read what one process with batch W*N reads.
"""
from __future__ import annotations

import io
import os
import weakref
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError, quote
from ..io.datum import datum_to_array, parse_datum
from ..io.files import MAX_IMAGE_BYTES, MAX_LIST_BYTES, read_regular_file
from ..io.lmdb_reader import SNAPSHOTS
from .prefetch import PrefetchingDataLayer, data_layers
from .samplers import BatchSampler, parse_sampler
from .transform import Transformer, describe_path

LMDB_BACKEND = 1


def decode_image(data: bytes, color: Optional[bool], where: str) -> np.ndarray:
    """Encoded image bytes to uint8 C x H x W, BGR as OpenCV decodes: color True -> 3
    channels, False -> 1, None -> as stored (grey stays grey)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # Pillow raises many types for damaged files
        raise CaffeCompatError(f"{where}: cannot decode the image: {err}") from None
    grey = image.mode in ("1", "L", "LA", "I", "I;16", "F") if color is None else not color
    pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8)
    return pixels[None] if grey else np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR geometry (half-pixel centres, no antialiasing), rounded to uint8."""
    if image.shape[1:] == (height, width):
        return image
    values = torch.tensor(image, dtype=torch.float32)[None]
    resized = torch.nn.functional.interpolate(values, size=(height, width), mode="bilinear",
                                              align_corners=False, antialias=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------
# Data: an LMDB of Datum records

class LmdbDataLayer(PrefetchingDataLayer):
    """Caffe's `Data` layer over an LMDB: records in key order, wrapping at the end."""

    def __init__(self, name: str, data_param, transform_param, phase: str, output_labels: bool):
        where = f"layer '{name}' (Data)"
        self.source = data_param.source
        self._where = where
        self._path = _check_lmdb(self.source, data_param, where)
        self._hold_snapshot()
        self._force = True if transform_param.force_color else False if transform_param.force_gray else None
        key, value = self._first_record()
        transformer = Transformer(transform_param, phase, where)
        first, record = self._load((key, parse_datum(value, self._record_name(key))))
        transformer.check(tuple(first.shape), record)
        if not data_param.batch_size:
            raise CaffeCompatError(f"{where}: data_param.batch_size must be positive")
        super().__init__(name, int(data_param.batch_size), transformer, tuple(first.shape),
                         output_labels, int(data_param.prefetch))

    def _hold_snapshot(self) -> None:
        """Keep the LMDB's snapshot while the layer lives: every batch, after any restart,
        reads the records its first batch read."""
        snapshot = SNAPSHOTS.acquire(self._path, self._where)
        weakref.finalize(self, SNAPSHOTS.release, snapshot)
        self.entries = snapshot.entries

    def _first_record(self) -> Tuple[bytes, bytes]:
        """(key, value) of the snapshot's first record."""
        import lmdb

        with SNAPSHOTS.use(self._path, self._where) as snapshot, snapshot.lock:
            try:
                record = next(iter(snapshot.txn.cursor()), None)
            except lmdb.Error as err:
                raise _damaged(self._path, self._where, None, err) from None
        if not self.entries or record is None:
            raise CaffeCompatError(f"{self._where}: data_param.source {describe_path(self.source)}: the LMDB "
                                   f"holds no records")
        return record

    def __setstate__(self, state):
        super().__setstate__(state)
        self._hold_snapshot()  # a copy holds the snapshot too

    def record_count(self) -> int:
        return self.entries

    def _initial_cursor(self) -> dict:
        return {"position": 0}

    def _check_cursor(self, cursor: dict, what: str) -> None:
        if not _is_index(cursor["position"], self.entries):
            raise CaffeCompatError(f"{what}: read position {quote(cursor['position'])} outside the LMDB's "
                                   f"{self.entries} records")

    def _records(self, cursor: dict) -> Iterator[Tuple[bytes, bytes]]:
        return _lmdb_records(self._path, cursor["position"] % self.entries, self._where)

    def _items(self, cursor, rng, count, records):
        # This rank's block of the global batch; the other ranks' records are skipped.
        for _ in range(self.rank * count):
            next(records)
        values = [next(records) for _ in range(count)]
        for _ in range((self.world_size - 1 - self.rank) * count):
            next(records)
        cursor["position"] = (cursor["position"] + self.world_size * count) % self.entries
        items = []
        for key, value in values:
            datum = parse_datum(value, self._record_name(key))
            items.append(((key, datum), int(datum.label)))
        return items

    def _record_name(self, key: bytes) -> str:
        return f"{self._where}: {self.source}: record {_key_text(key)}"

    def _load(self, item) -> Tuple[np.ndarray, str]:
        key, datum = item
        where = self._record_name(key)
        if datum.encoded and self._force is not None:
            return decode_image(datum.data, self._force, where), where
        return datum_to_array(datum, where)[0], where


def _check_lmdb(source: str, data_param, where: str) -> str:
    """The LMDB's real path, after the checks Caffe would fail on."""
    if not source:
        raise CaffeCompatError(f"{where}: data_param.source is empty")
    looks_lmdb = os.path.isfile(os.path.join(source, "data.mdb"))
    if data_param.backend != LMDB_BACKEND:
        hint = " (this source is an LMDB: add `backend: LMDB` to data_param)" if looks_lmdb else ""
        raise CaffeCompatError(f"{where}: data_param.backend is LEVELDB (Caffe's default when unset); only "
                               f"LMDB is supported{hint}")
    if not os.path.exists(source):
        raise CaffeCompatError(f"{where}: data_param.source {describe_path(source)}: no such LMDB")
    if not looks_lmdb:
        raise CaffeCompatError(f"{where}: data_param.source {describe_path(source)} is not an LMDB "
                               f"(a directory holding data.mdb)")
    return os.path.realpath(source)


def _lmdb_records(path: str, start: int, where: str) -> Iterator[Tuple[bytes, bytes]]:
    """(key, value) in key order from the start-th record, wrapping around forever; the
    snapshot stays open while the generator lives."""
    import lmdb

    key = None
    try:
        with SNAPSHOTS.use(path, where) as snapshot:
            with snapshot.lock:
                cursor = snapshot.txn.cursor()
                cursor.first()  # LMDB reads each record as the cursor moves: a damaged one fails here
                for _ in range(start):
                    key = cursor.key()
                    cursor.next()
            while True:
                with snapshot.lock:
                    key = cursor.key()
                    record = key, cursor.value()
                    if not cursor.next():
                        key = None
                        cursor.first()
                yield record
    except lmdb.Error as err:
        raise _damaged(path, where, key, err) from None


def _damaged(path: str, where: str, key: Optional[bytes], err: Exception) -> CaffeCompatError:
    """LMDB's own error (a corrupt page and the like), naming the folder and the key."""
    after = "its first record" if key is None else f"the record after key {_key_text(key)}"
    return CaffeCompatError(f"{where}: the LMDB {path} is damaged at {after}: {err}")


def _key_text(key: bytes) -> str:
    return repr(key.decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------
# ImageData: a list file of images

class ImageListLayer(PrefetchingDataLayer):
    """Caffe's `ImageData` layer: lines `path label`, read in order (shuffled per epoch
    with `shuffle`), resized to new_height x new_width, colour or grey."""

    def __init__(self, name: str, param, transform_param, phase: str, output_labels: bool, prefetch: int = 4):
        where = f"layer '{name}' (ImageData)"
        self._where = where
        self.source = param.source
        self.root_folder = param.root_folder
        self.is_color = bool(param.is_color)
        self.new_size = (int(param.new_height), int(param.new_width))
        if (self.new_size[0] == 0) != (self.new_size[1] == 0):
            raise CaffeCompatError(f"{where}: image_data_param needs new_height and new_width together")
        self.shuffle = bool(param.shuffle)
        self.rand_skip = int(param.rand_skip)
        self.lines = _read_list(self.source, where)
        self.sampler = "sequential"
        self._batch_sampler: Optional[BatchSampler] = None
        if not param.batch_size:
            raise CaffeCompatError(f"{where}: image_data_param.batch_size must be positive")
        transformer = Transformer(transform_param, phase, where)
        first, record = self._load(0)
        transformer.check(tuple(first.shape), record)
        super().__init__(name, int(param.batch_size), transformer, tuple(first.shape), output_labels, prefetch)

    def record_count(self) -> int:
        return len(self.lines)

    def _initial_cursor(self) -> dict:
        return {"position": 0, "order": None, "started": False}

    def _check_cursor(self, cursor: dict, what: str) -> None:
        count = len(self.lines)
        if not _is_index(cursor["position"], count):
            raise CaffeCompatError(f"{what}: read position {quote(cursor['position'])} outside the list's {count} images")
        order = cursor["order"]
        if order is not None and (not isinstance(order, list) or not all(isinstance(i, int) for i in order)
                                  or sorted(order) != list(range(count))):
            raise CaffeCompatError(f"{what}: its shuffled order is not an order of the list's {count} images")
        if not isinstance(cursor["started"], bool):
            raise CaffeCompatError(f"{what}: 'started' is not true or false")

    def set_sampler(self, spec: str) -> None:
        """Batch order: 'sequential' (Caffe's), 'pairs' or 'pk:P,K' (see caffe_compat.data.samplers)."""
        shape = parse_sampler(spec, self.batch_size, self._where)
        self.sampler = spec.strip().lower()
        self._batch_sampler = None if shape is None else BatchSampler(
            *shape, [label for _, label in self.lines], f"{self._where}: {self.source}", self.sampler)
        self._restart(self._state)

    def _items(self, cursor, rng, count, records):
        if self._batch_sampler is not None:
            return [(index, self.lines[index][1]) for index in self._batch_sampler.draw(rng)]
        if not cursor["started"]:
            cursor["started"] = True
            if self.shuffle:
                cursor["order"] = rng.permutation(len(self.lines)).tolist()
            if self.rand_skip:
                cursor["position"] = int(rng.integers(self.rand_skip)) % len(self.lines)
        indices = []
        for _ in range(self.world_size * count):
            order = cursor["order"]
            indices.append(order[cursor["position"]] if order is not None else cursor["position"])
            cursor["position"] += 1
            if cursor["position"] >= len(self.lines):
                cursor["position"] = 0
                if self.shuffle:
                    cursor["order"] = rng.permutation(len(self.lines)).tolist()
        mine = indices[self.rank * count:(self.rank + 1) * count]
        return [(index, self.lines[index][1]) for index in mine]

    def _load(self, index: int) -> Tuple[np.ndarray, str]:
        name, _ = self.lines[index]
        path = self.root_folder + name  # Caffe concatenates: root_folder needs its trailing '/'
        where = f"{self._where}: {self.source} entry {index + 1}: image {describe_path(path)}"
        try:
            data = read_regular_file(path, MAX_IMAGE_BYTES)
        except OSError as err:
            hint = (" (root_folder is prepended as written: does it need a trailing '/'?)"
                    if self.root_folder and not self.root_folder.endswith("/") else "")
            raise CaffeCompatError(f"{where}: cannot read: {err.strerror or err}{hint}") from None
        image = decode_image(data, self.is_color, where)
        if self.new_size[0]:
            image = resize_linear(image, *self.new_size)
        return image, where


def _is_index(value, count: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


def _read_list(source: str, where: str) -> List[Tuple[str, int]]:
    if not source:
        raise CaffeCompatError(f"{where}: image_data_param.source is empty")
    try:
        text = read_regular_file(source, MAX_LIST_BYTES).decode("utf-8")
    except OSError as err:
        raise CaffeCompatError(f"{where}: image_data_param.source {describe_path(source)}: "
                               f"{err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise CaffeCompatError(f"{where}: image_data_param.source {describe_path(source)}: not UTF-8 text "
                               f"({err.reason} at byte {err.start})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        # Caffe splits at the last space, so file names may contain spaces.
        name, _, label = line.rpartition(" ")
        try:
            lines.append((name, int(label)))
        except ValueError:
            raise CaffeCompatError(f"{where}: {source} line {number}: expected 'path label', got {quote(line)}") from None
        if not name:
            raise CaffeCompatError(f"{where}: {source} line {number}: expected 'path label', got {quote(line)}")
    if not lines:
        raise CaffeCompatError(f"{where}: image_data_param.source {describe_path(source)} lists no images")
    return lines


def set_sampler(net, spec: str) -> int:
    """Use a batch sampler ("sequential", "pairs", "pk:P,K") in every ImageData layer of
    the net; returns how many layers took it."""
    layers = [m for _, m in data_layers(net) if isinstance(m, ImageListLayer)]
    for module in layers:
        module.set_sampler(spec)
    return len(layers)


