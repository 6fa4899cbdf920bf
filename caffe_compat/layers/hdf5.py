"""HDF5Data (batches read from the HDF5 files a list names, one dataset per top) and
HDF5Output (its two bottoms written to an HDF5 file as datasets "data" and "label").
Both need h5py, the optional extra `caffe-compat[hdf5]`."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from ..errors import CaffeCompatError, quote
from ..io.atomic import atomic_path
from ..io.files import MAX_LIST_BYTES, read_regular_file
from .registry import CaffeLayer, Converted, LayerContext, register


def _h5py(where: str):
    try:
        import h5py
    except ImportError:
        raise CaffeCompatError(f"{where}: HDF5 layers need h5py (pip install 'caffe-compat[hdf5]')") from None
    return h5py


def _read_file_list(source: str, where: str) -> List[str]:
    """Caffe's list: whitespace-separated paths, relative to the working directory."""
    try:
        names = read_regular_file(source, MAX_LIST_BYTES).decode("utf-8", "replace").split()
    except OSError as err:
        raise CaffeCompatError(f"{where}: cannot read the HDF5 file list {quote(source)} ({err.strerror})") from None
    if not names:
        raise CaffeCompatError(f"{where}: the HDF5 file list {quote(source)} names no files")
    return names


def _load(path: str, datasets: Sequence[str], where: str) -> List[np.ndarray]:
    """The named datasets of one file as float32 (Caffe reads every HDF5 type into its
    Dtype), with the same number of rows."""
    h5py = _h5py(where)
    try:
        with h5py.File(path, "r") as f:
            arrays = []
            for name in datasets:
                if name not in f:
                    raise CaffeCompatError(f"{where}: {path} has no dataset '{name}' (one per top)")
                arrays.append(np.asarray(f[name], dtype=np.float32))
    except OSError as err:
        raise CaffeCompatError(f"{where}: cannot read HDF5 file {path}: {err}") from None
    for name, array in zip(datasets, arrays):
        if array.ndim < 1 or array.shape[0] != arrays[0].shape[0]:
            raise CaffeCompatError(f"{where}: {path}: dataset '{name}' {array.shape} must have the "
                                   f"{arrays[0].shape[0]} rows of '{datasets[0]}'")
    return arrays


class HDF5Data(CaffeLayer):
    """Caffe's HDF5DataLayer: batch_size rows per forward pass, row after row and file
    after file in list order, wrapping around; with `shuffle`, files and the rows within
    each file in a random order (torch's generator, not Caffe's). The tops take
    gradients while `tops_take_gradients`, as Caffe computes diffs for them under
    force_backward."""

    tops_take_gradients = True

    def __init__(self, where: str, files: Sequence[str], datasets: Sequence[str], batch_size: int, shuffle: bool):
        super().__init__()
        self.where = where
        self.files = list(files)
        self.datasets = list(datasets)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # follows .to(device)
        self.file_order = self._order(len(self.files))
        self.file_index = 0
        self._open(self.file_order[0])

    def _order(self, count: int) -> List[int]:
        return torch.randperm(count).tolist() if self.shuffle else list(range(count))

    def _open(self, file: int) -> None:
        self.arrays = _load(self.files[file], self.datasets, self.where)
        self.row_order = self._order(self.arrays[0].shape[0])
        self.row = 0

    def top_shapes(self):
        return [(self.batch_size,) + a.shape[1:] for a in self.arrays]

    def _next(self) -> None:
        self.row += 1
        if self.row < len(self.row_order):
            return
        if len(self.files) > 1:
            self.file_index += 1
            if self.file_index == len(self.files):
                self.file_index = 0
                if self.shuffle:
                    self.file_order = self._order(len(self.files))
            self._open(self.file_order[self.file_index])
        else:
            self.row = 0
            if self.shuffle:
                self.row_order = self._order(len(self.row_order))

    def forward(self):
        rows: List[List[np.ndarray]] = [[] for _ in self.datasets]
        for _ in range(self.batch_size):
            for top, array in zip(rows, self.arrays):
                top.append(array[self.row_order[self.row]])
            self._next()
        grad = self.tops_take_gradients and torch.is_grad_enabled()
        tops = tuple(torch.from_numpy(np.stack(r)).to(self.anchor).requires_grad_(grad) for r in rows)
        return tops[0] if len(tops) == 1 else tops


@register("HDF5Data")
def build_hdf5_data(ctx: LayerContext) -> Converted:
    if ctx.bottoms:
        raise ctx.error("takes no bottoms")
    if not ctx.tops:
        raise ctx.error("expects at least 1 top (one per dataset)")
    if ctx.param.HasField("transform_param"):
        raise ctx.error("HDF5Data does not transform data: remove transform_param")
    param = ctx.param.hdf5_data_param
    if param.batch_size <= 0:
        raise ctx.error("hdf5_data_param.batch_size must be positive")
    where = f"layer '{ctx.name}' (HDF5Data)"
    module = HDF5Data(where, _read_file_list(param.source, where), ctx.tops, param.batch_size, param.shuffle)
    return ctx.wire(module, top_shapes=module.top_shapes())


def _legacy_4d(array: np.ndarray, where: str) -> np.ndarray:
    """Caffe saves the blobs as num x channels x height x width."""
    if array.ndim > 4:
        raise CaffeCompatError(f"{where}: bottoms must have at most 4 axes, got shape {array.shape}")
    return array.reshape(array.shape + (1,) * (4 - array.ndim))


class HDF5Output(CaffeLayer):
    """Writes its bottoms (data, label) to `file_name` at every forward pass, replacing
    the file; no tops, no gradient."""

    def __init__(self, where: str, file_name: str):
        super().__init__()
        self.where = where
        self.file_name = file_name

    def forward(self, data, label, *_):
        h5py = _h5py(self.where)
        arrays = [_legacy_4d(t.detach().cpu().float().numpy(), self.where) for t in (data, label)]
        with atomic_path(self.file_name) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("data", data=arrays[0])
                f.create_dataset("label", data=arrays[1])
        return ()


@register("HDF5Output")
def build_hdf5_output(ctx: LayerContext) -> Converted:
    if len(ctx.bottoms) < 2:
        raise ctx.error(f"expects bottoms data and label, got {len(ctx.bottoms)}")
    if ctx.tops:
        raise ctx.error(f"has no tops, got {len(ctx.tops)}")
    data, label = ctx.bottom_shapes[:2]
    if not data or not label or data[0] != label[0]:
        raise ctx.error(f"data {tuple(data)} and label {tuple(label)} must have the same first dimension")
    for name, shape in zip(ctx.bottoms[:2], ctx.bottom_shapes[:2]):
        if len(shape) > 4:
            raise ctx.error(f"bottom '{name}' must have at most 4 axes, got shape {tuple(shape)}")
    file_name = ctx.param.hdf5_output_param.file_name
    if not file_name:
        raise ctx.error("hdf5_output_param.file_name must be given")
    return ctx.wire(HDF5Output(f"layer '{ctx.name}' (HDF5Output)", file_name), top_shapes=[])
