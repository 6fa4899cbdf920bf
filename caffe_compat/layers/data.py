"""Caffe's data layers: `Data` (an LMDB of Datum records) and `ImageData` (a list file of
images), with `transform_param` applied exactly as Caffe's DataTransformer does.

Each layer is a module without bottoms that returns the next batch on every call: a
background thread reads records in order and a small pool of threads decodes and
transforms them, so `prefetch` batches are ready before the net asks. The read position
and the random state are resumable: `reader_state()` / `load_reader_state()`.

Paths (`source`, `mean_file`, `root_folder`) resolve from the working directory, as in
Caffe. Random crops and mirrors come from a seeded numpy generator per layer (Caffe's own
random stream cannot be reproduced); everything deterministic (sequential reads, centre
crops, means, scale) equals Caffe's numbers exactly.

Batches for metric learning from image lists: `set_sampler(net, spec)` (or the CLI's
`--sampler`) replaces the list order of ImageData layers by
  "pairs"   batch_size/2 pairs of same-class images (the paper's layout), or
  "pk:P,K"  P classes x K images per batch (P*K == batch_size);
Caffe's schema has no field for this, hence an option outside the prototxt.

Several processes (`shard_data_layers`): global batch g covers records
[g*W*N, (g+1)*W*N) of the key order (W processes, N = batch_size); process r takes the
r-th block of N, so the processes together read what one process with batch W*N reads.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import queue
import threading
import traceback
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError
from ..io.datum import datum_to_array, parse_datum
from ..io.files import read_binaryproto
from .registry import CaffeLayer, LayerContext, register

LMDB_BACKEND = 1
_DEPRECATED_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _describe(path: str) -> str:
    """A path as the user wrote it, plus where a relative one was looked for."""
    if os.path.isabs(path):
        return f"'{path}'"
    return f"'{path}' (relative to the working directory {os.getcwd()})"


# ---------------------------------------------------------------------------------------
# DataTransformer

class Transformer:
    """Caffe's DataTransformer: crop, mirror, mean, scale on one C x H x W image."""

    def __init__(self, param, phase: str, where: str):
        self.where = where
        self.phase = phase
        self.scale = np.float32(param.scale)
        self.mirror = bool(param.mirror)  # Caffe mirrors at random in any phase when asked
        self.crop_size = int(param.crop_size)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise CaffeCompatError(f"{where}: transform_param sets both force_color and force_gray")
        self.mean_file: Optional[np.ndarray] = None
        self.mean_values: Optional[np.ndarray] = None
        if param.HasField("mean_file"):
            if len(param.mean_value):
                raise CaffeCompatError(f"{where}: transform_param cannot have both mean_file and mean_value")
            if not os.path.exists(param.mean_file):
                raise CaffeCompatError(f"{where}: transform_param.mean_file {_describe(param.mean_file)} "
                                       f"does not exist")
            mean = read_binaryproto(param.mean_file).astype(np.float32)
            self.mean_file = mean.reshape(mean.shape[-3:]) if mean.ndim >= 3 else mean.reshape(1, *mean.shape[-2:])
            # Mirrored crops read a mirrored copy: contiguous rows subtract several times faster.
            self.mean_file_mirrored = np.ascontiguousarray(self.mean_file[:, :, ::-1])
        elif len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=np.float32)

    def output_shape(self, shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        c, h, w = shape
        return (c, self.crop_size, self.crop_size) if self.crop_size else (c, h, w)

    def check(self, shape: Tuple[int, ...], where: str) -> None:
        """Caffe's CHECKs on one input shape, as errors naming the record."""
        c, h, w = shape
        if self.crop_size and (h < self.crop_size or w < self.crop_size):
            raise CaffeCompatError(f"{where}: image {h}x{w} is smaller than crop_size {self.crop_size}")
        if self.mean_file is not None and self.mean_file.shape != (c, h, w):
            raise CaffeCompatError(f"{where}: mean_file has shape {self.mean_file.shape}, the image "
                                   f"{(c, h, w)}: they must be equal")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise CaffeCompatError(f"{self.where}: {len(self.mean_values)} mean_value entries for {c} "
                                   f"channels; give 1 or {c}")

    def draw(self, rng: np.random.Generator, shape: Tuple[int, ...]) -> Tuple[int, int, bool]:
        """(h_off, w_off, mirror) for one image, in Caffe's order: mirror, then the crop."""
        _, h, w = shape
        mirror = bool(self.mirror and rng.integers(2))
        if not self.crop_size:
            return 0, 0, mirror
        if self.phase == "TRAIN":
            return int(rng.integers(h - self.crop_size + 1)), int(rng.integers(w - self.crop_size + 1)), mirror
        return (h - self.crop_size) // 2, (w - self.crop_size) // 2, mirror

    def apply(self, image: np.ndarray, h_off: int, w_off: int, mirror: bool, out: np.ndarray) -> None:
        """out = (image - mean) * scale over the crop, mirrored, all in float32 as Caffe."""
        _, out_h, out_w = out.shape
        width = image.shape[2]
        rows, cols = slice(h_off, h_off + out_h), slice(w_off, w_off + out_w)
        pixels = image[:, rows, cols]
        if mirror:
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        if self.mean_file is not None:
            if mirror:  # the same columns, counted from the mirrored copy's left edge
                mean = self.mean_file_mirrored[:, rows, width - w_off - out_w:width - w_off]
            else:
                mean = self.mean_file[:, rows, cols]
        elif self.mean_values is not None:
            mean = self.mean_values.reshape(-1, 1, 1)
        else:
            mean = None
        if mean is None:
            np.copyto(out, pixels, casting="unsafe")
        else:
            np.subtract(pixels, mean, out=out, dtype=np.float32)
        np.multiply(out, self.scale, out=out)


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
# Prefetching machinery shared by both layers

class _Stop(Exception):
    pass


class PrefetchingDataLayer(CaffeLayer):
    """Base of the data layers: a producer thread fills a queue of ready batches.

    The state handed out is the one after the last batch the net consumed (not the
    producer's, which runs ahead), so a resumed run reads exactly the next batch."""

    def __init__(self, name: str, batch_size: int, transformer: Transformer,
                 input_shape: Tuple[int, int, int], output_labels: bool, prefetch: int):
        super().__init__()
        self.name = name
        self.batch_size = batch_size
        self.transformer = transformer
        self.input_shape = tuple(input_shape)
        self.output_shape = transformer.output_shape(self.input_shape)
        self.output_labels = output_labels
        self.prefetch = max(1, prefetch)
        self.threads = default_threads()
        self.rank, self.world_size = 0, 1
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._state = {"cursor": self._initial_cursor(), "rng": None}
        self.reseed(torch.initial_seed())

    # what subclasses provide
    def _initial_cursor(self) -> dict:
        raise NotImplementedError

    def _items(self, cursor: dict, rng: np.random.Generator, count: int, records) -> List[Tuple[object, int]]:
        """The next `count` items (a loader argument and a label), advancing `cursor`."""
        raise NotImplementedError

    def _load(self, item) -> Tuple[np.ndarray, str]:
        """The item's C x H x W array and a description naming it for errors."""
        raise NotImplementedError

    def _records(self, cursor: dict):
        """Whatever `_items` reads from (an open cursor), created in the producer thread."""
        return None

    # configuration
    def reseed(self, seed: int) -> None:
        """Seed the layer's random stream (crop offsets, mirrors, shuffles, sampling)."""
        sequence = np.random.SeedSequence([int(seed) & (2 ** 63 - 1), zlib.crc32(self.name.encode())])
        self._restart({"cursor": self._state["cursor"],
                       "rng": np.random.Generator(np.random.PCG64(sequence)).bit_generator.state})

    def shard(self, rank: int, world_size: int) -> None:
        """Read the rank-th block of every global batch of world_size * batch_size records."""
        self.rank, self.world_size = int(rank), int(world_size)
        self._restart(self._state)

    def reader_state(self) -> dict:
        """The read position and random state after the last consumed batch (plain data)."""
        return copy.deepcopy(self._state)

    def load_reader_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"cursor", "rng"}:
            raise CaffeCompatError(f"layer '{self.name}': not a reader state of this layer")
        self._restart(copy.deepcopy(state))

    # running
    def forward(self):
        if self._thread is None:
            self._start()
        while True:
            try:
                batch = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"layer '{self.name}': the prefetch thread stopped") from None
        if isinstance(batch, BaseException):
            self._thread = None
            raise batch
        data, labels, state = batch
        self._state = state
        device = self._device_anchor.device
        data = data.to(device, non_blocking=True)
        if not self.output_labels:
            return data
        return data, labels.to(device, non_blocking=True)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        pin = self._device_anchor.device.type == "cuda"
        # The thread holds the layer only weakly, so it ends once the layer is collected.
        self._thread = threading.Thread(target=_produce, name=f"caffe-data-{self.name}",
                                        args=(weakref.ref(self), copy.deepcopy(self._state), self._stop,
                                              self._queue, pin), daemon=True)
        self._thread.start()

    def _restart(self, state: dict) -> None:
        self.close()
        self._state = state

    def close(self) -> None:
        """Stop the producer (it restarts at the next forward, from the consumed state)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def _batch(self, cursor: dict, rng: np.random.Generator, records, pool: ThreadPoolExecutor, pin: bool):
        """(data, labels, state after) of the next batch, advancing cursor and rng."""
        items = self._items(cursor, rng, self.batch_size, records)
        data = torch.empty((self.batch_size,) + self.output_shape, dtype=torch.float32, pin_memory=pin)
        labels = torch.tensor([label for _, label in items], dtype=torch.float32)
        out = data.numpy()
        draws = self._draws(rng, len(items))
        jobs = [pool.submit(self._fill, item, draw, out[i]) for i, ((item, _), draw) in enumerate(zip(items, draws))]
        for job in jobs:
            job.result()
        return data, labels, {"cursor": copy.deepcopy(cursor), "rng": rng.bit_generator.state}

    def _draws(self, rng: np.random.Generator, count: int) -> List[Tuple[int, int, bool]]:
        # Drawn in the producer, in record order, so results do not depend on thread timing.
        return [self.transformer.draw(rng, self.input_shape) for _ in range(count)]

    def _fill(self, item, draw: Tuple[int, int, bool], out: np.ndarray) -> None:
        image, where = self._load(item)
        if tuple(image.shape) != self.input_shape:
            raise CaffeCompatError(f"{where}: shape {tuple(image.shape)} differs from the first record's "
                                   f"{self.input_shape}; all records of a batch must have one shape")
        self.transformer.apply(image, *draw, out)

    def top_shapes(self) -> List[Tuple[int, ...]]:
        shapes = [(self.batch_size,) + self.output_shape]
        return shapes + [(self.batch_size,)] if self.output_labels else shapes

    # pickling / copying: the producer thread stays behind
    def __getstate__(self):
        self.close()
        state = self.__dict__.copy()
        for key in ("_thread", "_queue", "_stop"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._thread, self._queue, self._stop = None, None, threading.Event()


def _produce(layer_ref, state: dict, stop: threading.Event, out: queue.Queue, pin: bool) -> None:
    """The producer thread: batches into `out` until stopped or the layer is collected.
    Errors go to the consumer, which raises them."""
    def running() -> bool:
        return not stop.is_set() and layer_ref() is not None

    def put(value) -> None:
        while running():
            try:
                out.put(value, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stop

    try:
        layer = layer_ref()
        if layer is None:
            return
        cursor = state["cursor"]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = state["rng"]
        records = layer._records(cursor)
        pool = ThreadPoolExecutor(max_workers=layer.threads, thread_name_prefix=f"caffe-decode-{layer.name}")
        del layer
        with pool:
            while not stop.is_set():
                layer = layer_ref()
                if layer is None:
                    return
                batch = layer._batch(cursor, rng, records, pool, pin)
                del layer
                put(batch)
    except _Stop:
        return
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)  # keep the lines, drop the layer the frames hold
        try:
            put(err)
        except _Stop:
            return


# ---------------------------------------------------------------------------------------
# Data: an LMDB of Datum records

class LmdbDataLayer(PrefetchingDataLayer):
    """Caffe's `Data` layer over an LMDB: records in key order, wrapping at the end."""

    def __init__(self, name: str, data_param, transform_param, phase: str, output_labels: bool):
        where = f"layer '{name}' (Data)"
        self.source = data_param.source
        self._where = where
        self._path = _check_lmdb(self.source, data_param, where)
        self._force = True if transform_param.force_color else False if transform_param.force_gray else None
        with _ENVIRONMENTS.use(self._path, where) as env, env.begin() as txn:
            self.entries = txn.stat()["entries"]
            if not self.entries:
                raise CaffeCompatError(f"{where}: data_param.source {_describe(self.source)}: the LMDB holds "
                                       f"no records")
            key, value = next(iter(txn.cursor()))
        transformer = Transformer(transform_param, phase, where)
        first, record = self._load((key, parse_datum(value, self._record_name(key))))
        transformer.check(tuple(first.shape), record)
        if not data_param.batch_size:
            raise CaffeCompatError(f"{where}: data_param.batch_size must be positive")
        super().__init__(name, int(data_param.batch_size), transformer, tuple(first.shape),
                         output_labels, int(data_param.prefetch))

    def _initial_cursor(self) -> dict:
        return {"position": 0}

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
        return f"{self._where}: {self.source}: record {key.decode('utf-8', 'replace')!r}"

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
        raise CaffeCompatError(f"{where}: data_param.source {_describe(source)}: no such LMDB")
    if not looks_lmdb:
        raise CaffeCompatError(f"{where}: data_param.source {_describe(source)} is not an LMDB "
                               f"(a directory holding data.mdb)")
    return os.path.realpath(source)


class _Environments:
    """Open LMDBs, shared: py-lmdb refuses to open one environment twice in a process, so
    each is opened once, used by every layer reading it, and closed when the last lets go."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: Dict[str, list] = {}  # path -> [environment, users]

    @contextlib.contextmanager
    def use(self, path: str, where: str):
        import lmdb

        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                try:
                    env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=256)
                except lmdb.Error as err:
                    raise CaffeCompatError(f"{where}: cannot open the LMDB {path}: {err}") from None
                entry = self._open[path] = [env, 0]
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._open[path]
                    entry[0].close()


_ENVIRONMENTS = _Environments()


def _lmdb_records(path: str, start: int, where: str) -> Iterator[Tuple[bytes, bytes]]:
    """(key, value) in key order from the start-th record, wrapping around forever; the
    environment stays open while the generator lives."""
    with _ENVIRONMENTS.use(path, where) as env, env.begin(buffers=False) as txn:
        cursor = txn.cursor()
        cursor.first()
        for _ in range(start):
            cursor.next()
        while True:
            yield cursor.key(), cursor.value()
            if not cursor.next():
                cursor.first()


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
        self._pk: Optional[Tuple[int, int]] = None
        self._classes: Dict[int, np.ndarray] = {}
        if not param.batch_size:
            raise CaffeCompatError(f"{where}: image_data_param.batch_size must be positive")
        transformer = Transformer(transform_param, phase, where)
        first, record = self._load(0)
        transformer.check(tuple(first.shape), record)
        super().__init__(name, int(param.batch_size), transformer, tuple(first.shape), output_labels, prefetch)

    def _initial_cursor(self) -> dict:
        return {"position": 0, "order": None, "started": False}

    def set_sampler(self, spec: str) -> None:
        """Batch order: 'sequential' (Caffe's), 'pairs' or 'pk:P,K'; see the module docstring."""
        spec = spec.strip().lower()
        if spec == "sequential":
            self.sampler, self._pk = spec, None
        else:
            if spec == "pairs":
                if self.batch_size % 2:
                    raise CaffeCompatError(f"{self._where}: the pairs sampler needs an even batch_size, "
                                           f"got {self.batch_size}")
                classes, per_class = self.batch_size // 2, 2
            elif spec.startswith("pk:"):
                try:
                    classes, per_class = (int(v) for v in spec[3:].split(","))
                except ValueError:
                    raise CaffeCompatError(f"sampler '{spec}': expected pk:P,K with two integers") from None
                if classes < 1 or per_class < 1 or classes * per_class != self.batch_size:
                    raise CaffeCompatError(f"{self._where}: sampler pk:{classes},{per_class} gives "
                                           f"{classes * per_class} images per batch, batch_size is {self.batch_size}")
            else:
                raise CaffeCompatError(f"unknown sampler '{spec}': expected sequential, pairs or pk:P,K")
            labels = np.asarray([label for _, label in self.lines])
            self._classes = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
            if len(self._classes) < 2:
                raise CaffeCompatError(f"{self._where}: {self.source} has {len(self._classes)} class(es); "
                                       f"the {spec} sampler needs at least 2")
            self.sampler, self._pk = spec, (classes, per_class)
        self._restart(self._state)

    def _items(self, cursor, rng, count, records):
        if self.sampler != "sequential":
            return [(index, self.lines[index][1]) for index in self._sample(rng)]
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

    def _sample(self, rng: np.random.Generator) -> List[int]:
        classes, per_class = self._pk
        names = np.asarray(sorted(self._classes))
        chosen = rng.choice(names, size=classes, replace=len(names) < classes)
        indices = []
        for label in chosen:
            members = self._classes[int(label)]
            indices.extend(rng.choice(members, size=per_class, replace=len(members) < per_class).tolist())
        return indices

    def _load(self, index: int) -> Tuple[np.ndarray, str]:
        name, _ = self.lines[index]
        path = self.root_folder + name  # Caffe concatenates: root_folder needs its trailing '/'
        where = f"{self._where}: {self.source} entry {index + 1}: image {_describe(path)}"
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            hint = (" (root_folder is prepended as written: does it need a trailing '/'?)"
                    if self.root_folder and not self.root_folder.endswith("/") else "")
            raise CaffeCompatError(f"{where}: cannot read: {err.strerror or err}{hint}") from None
        image = decode_image(data, self.is_color, where)
        if self.new_size[0]:
            image = resize_linear(image, *self.new_size)
        return image, where


def _read_list(source: str, where: str) -> List[Tuple[str, int]]:
    if not source:
        raise CaffeCompatError(f"{where}: image_data_param.source is empty")
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as err:
        raise CaffeCompatError(f"{where}: image_data_param.source {_describe(source)}: "
                               f"{err.strerror or err}") from None
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
            raise CaffeCompatError(f"{where}: {source} line {number}: expected 'path label', got {line!r}") from None
        if not name:
            raise CaffeCompatError(f"{where}: {source} line {number}: expected 'path label', got {line!r}")
    if not lines:
        raise CaffeCompatError(f"{where}: image_data_param.source {_describe(source)} lists no images")
    return lines


# ---------------------------------------------------------------------------------------
# builders

def _check_common(ctx: LayerContext, param, field: str) -> None:
    if ctx.bottoms:
        raise ctx.error("a data layer takes no bottoms")
    if len(ctx.tops) not in (1, 2):
        raise ctx.error(f"expects 1 or 2 tops (data, label), got {len(ctx.tops)}")
    stale = [f for f in _DEPRECATED_FIELDS if param.HasField(f)]
    if stale:
        raise ctx.error(f"{field}.{', '.join(stale)} is deprecated; move it to transform_param")


@register("Data")
def build_data(ctx: LayerContext):
    _check_common(ctx, ctx.param.data_param, "data_param")
    module = LmdbDataLayer(ctx.name, ctx.param.data_param, ctx.param.transform_param, ctx.phase,
                           output_labels=len(ctx.tops) == 2)
    return ctx.wire(module, top_shapes=module.top_shapes())


@register("ImageData")
def build_image_data(ctx: LayerContext):
    _check_common(ctx, ctx.param.image_data_param, "image_data_param")
    # Caffe's prefetching layers all take their queue depth from data_param.prefetch.
    module = ImageListLayer(ctx.name, ctx.param.image_data_param, ctx.param.transform_param, ctx.phase,
                            output_labels=len(ctx.tops) == 2, prefetch=int(ctx.param.data_param.prefetch))
    return ctx.wire(module, top_shapes=module.top_shapes())


# ---------------------------------------------------------------------------------------
# helpers over a whole net

def data_layers(net) -> List[Tuple[str, PrefetchingDataLayer]]:
    """(Caffe layer name, module) of every data layer of a CaffeNet."""
    return [(net.layer_names[m], module) for m, module in net.layers.items()
            if isinstance(module, PrefetchingDataLayer)]


def reader_states(net) -> Dict[str, dict]:
    return {name: module.reader_state() for name, module in data_layers(net)}


def load_reader_states(net, states: Dict[str, dict]) -> None:
    layers = dict(data_layers(net))
    for name, state in states.items():
        if name not in layers:
            raise CaffeCompatError(f"the saved reader state names data layer '{name}', which the net lacks")
        layers[name].load_reader_state(state)


def seed_data_layers(net, seed: int) -> None:
    for _, module in data_layers(net):
        module.reseed(seed)


def shard_data_layers(net, rank: int, world_size: int) -> None:
    for _, module in data_layers(net):
        module.shard(rank, world_size)


def set_sampler(net, spec: str) -> int:
    """Use a batch sampler ("sequential", "pairs", "pk:P,K") in every ImageData layer of
    the net; returns how many layers took it."""
    layers = [m for _, m in data_layers(net) if isinstance(m, ImageListLayer)]
    for module in layers:
        module.set_sampler(spec)
    return len(layers)


def close_data_layers(net) -> None:
    for _, module in data_layers(net):
        module.close()


__all__ = ["Transformer", "PrefetchingDataLayer", "LmdbDataLayer", "ImageListLayer", "decode_image",
           "resize_linear", "data_layers", "reader_states", "load_reader_states", "seed_data_layers",
           "shard_data_layers", "set_sampler", "close_data_layers", "default_threads"]
