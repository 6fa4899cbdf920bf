"""Prefetching: a producer thread reads records in order and a small pool of threads
decodes and transforms them, so `prefetch` batches are ready before the net asks. The
read position and the random state are resumable: `reader_state()` / `load_reader_state()`.
"""
from __future__ import annotations

import copy
import os
import queue
import threading
import traceback
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import CaffeCompatError
from .transform import Transformer


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _Stop(Exception):
    pass


class PrefetchingDataLayer(nn.Module):
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
    def record_count(self) -> int:
        """The records of one pass over the source."""
        raise NotImplementedError

    def _initial_cursor(self) -> dict:
        raise NotImplementedError

    def _items(self, cursor: dict, rng: np.random.Generator, count: int, records) -> List[Tuple[object, int]]:
        """The next `count` items (a loader argument and a label), advancing `cursor`."""
        raise NotImplementedError

    def _load(self, item) -> Tuple[np.ndarray, str]:
        """The item's C x H x W array and a description naming it for errors."""
        raise NotImplementedError

    def _check_cursor(self, cursor: dict, what: str) -> None:
        """Raise CaffeCompatError(what...) unless `cursor` is a position this layer can read from."""
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

    def load_reader_state(self, state: dict, where: str = "reader state") -> None:
        """Continue from `state` (what reader_state returned), checked first: a bad one
        would fail only later, in the producer thread."""
        what = f"{where}: data layer '{self.name}'"
        if not isinstance(state, dict) or set(state) != {"cursor", "rng"}:
            raise CaffeCompatError(f"{what}: not a reader state of this layer")
        cursor = state["cursor"]
        expected = self._initial_cursor()
        if not isinstance(cursor, dict) or set(cursor) != set(expected):
            raise CaffeCompatError(f"{what}: its read position is not one of this layer "
                                   f"(keys {', '.join(sorted(expected))})")
        self._check_cursor(cursor, what)
        try:
            np.random.Generator(np.random.PCG64()).bit_generator.state = state["rng"]
        except (TypeError, ValueError, KeyError, OverflowError):
            raise CaffeCompatError(f"{what}: its random state is not a PCG64 generator's") from None
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
# over a whole net

def data_layers(net) -> List[Tuple[str, PrefetchingDataLayer]]:
    """(Caffe layer name, module) of every data layer of a CaffeNet."""
    return [(net.layer_names[m], module) for m, module in net.layers.items()
            if isinstance(module, PrefetchingDataLayer)]


def reader_states(net) -> Dict[str, dict]:
    return {name: module.reader_state() for name, module in data_layers(net)}


def load_reader_states(net, states: Dict[str, dict], where: str = "reader states") -> None:
    layers = dict(data_layers(net))
    if not isinstance(states, dict) or sorted(states) != sorted(layers):
        names = sorted(states) if isinstance(states, dict) else []
        raise CaffeCompatError(f"{where}: reader states for data layers ({', '.join(map(str, names))}), the net "
                               f"has ({', '.join(sorted(layers))})")
    for name, state in states.items():
        layers[name].load_reader_state(state, where)


def seed_data_layers(net, seed: int) -> None:
    for _, module in data_layers(net):
        module.reseed(seed)


def shard_data_layers(net, rank: int, world_size: int) -> None:
    for _, module in data_layers(net):
        module.shard(rank, world_size)


def close_data_layers(net) -> None:
    for _, module in data_layers(net):
        module.close()

