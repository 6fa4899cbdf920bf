"""`caffe-compat extract`: run a net in its TEST phase over a dataset (an LMDB of
Datum records or a Caffe image list) and save one blob per image, with labels."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from .errors import CaffeCompatError
from .graph import build_graph, layer_included
from .io.atomic import atomic_path
from .io.files import NetFile
from .net import CaffeNet

PathLike = Union[str, Path]
DATA_TYPES = ("Data", "ImageData")


def _data_layer(net, phase: str):
    for layer in net.layer:
        if layer.type in DATA_TYPES and layer_included(layer, phase):
            return layer
    raise CaffeCompatError(f"net '{net.name}' has no Data or ImageData layer in its {phase} phase to feed from")


def _batch_size(layer) -> int:
    return layer.data_param.batch_size if layer.type == "Data" else layer.image_data_param.batch_size


def count_records(source: Path) -> int:
    if source.is_dir():
        try:
            import lmdb
        except ImportError:
            raise CaffeCompatError("reading LMDB needs the lmdb package (pip install 'caffe-compat[lmdb]')") from None
        try:
            with lmdb.open(str(source), readonly=True, lock=False) as env:
                return env.stat()["entries"]
        except lmdb.Error as err:
            raise CaffeCompatError(f"{source}: not a readable LMDB: {err}") from None
    if not source.is_file():
        raise CaffeCompatError(f"{source}: no such LMDB folder or image list")
    return sum(1 for line in source.read_text().splitlines() if line.strip())


def list_paths(source: Path, root_folder: str = ""):
    return [root_folder + line.rsplit(None, 1)[0] for line in source.read_text().splitlines() if line.strip()]


def point_at(net, data: Path, batch_size: Optional[int], phase: str = "TEST"):
    """A copy of `net` whose data layer reads `data` (LMDB folder -> Data, file -> ImageData)
    in order, without shuffling, with the layer's own transform_param."""
    net = type(net).FromString(net.SerializeToString())
    layer = _data_layer(net, phase)
    old_batch = _batch_size(layer)
    if data.is_dir():
        if layer.type != "Data":
            layer.ClearField("image_data_param")
            layer.type = "Data"
        layer.data_param.source = str(data)
        layer.data_param.backend = layer.data_param.LMDB
        layer.data_param.batch_size = batch_size or old_batch
    else:
        if layer.type != "ImageData":
            layer.ClearField("data_param")
            layer.type = "ImageData"
        layer.image_data_param.source = str(data)
        layer.image_data_param.shuffle = False
        layer.image_data_param.batch_size = batch_size or old_batch
    return net, layer


def extract_features(net_file: NetFile, weights, data: PathLike, blob: str = "fc_embedding",
                     device: str = "cpu", batch_size: Optional[int] = None,
                     progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """{'embeddings': n x d float32, 'labels': n, 'paths' (image lists)} in dataset order."""
    data = Path(data)
    total = count_records(data)
    if total == 0:
        raise CaffeCompatError(f"{data}: holds no records")
    net_param, layer = point_at(net_file.net, data, batch_size)
    batch = _batch_size(layer)
    label_top = layer.top[1] if len(layer.top) > 1 else None
    net = CaffeNet(build_graph(net_param, "TEST", net_file.dialect), weights).to(device).eval()
    if blob not in net.blob_shapes:
        raise CaffeCompatError(f"net '{net_param.name}' has no blob '{blob}' "
                               f"(blobs: {', '.join(list(net.blob_shapes)[:12])}, ...)")
    wanted = [blob] + ([label_top] if label_top else [])
    embeddings, labels = [], []
    batches = math.ceil(total / batch)
    with torch.inference_mode():
        for i in range(batches):
            out = net(blobs=wanted)
            embeddings.append(out[blob].float().reshape(out[blob].shape[0], -1).cpu().numpy())
            if label_top:
                labels.append(out[label_top].cpu().numpy().reshape(-1))
            if progress:
                progress(i + 1, batches)
    # The data layer wraps around at the end, as Caffe's does: drop the repeats.
    result = {"embeddings": np.concatenate(embeddings)[:total].astype(np.float32)}
    if labels:
        result["labels"] = np.concatenate(labels)[:total]
    if layer.type == "ImageData":
        result["paths"] = np.array(list_paths(data, layer.image_data_param.root_folder))
    return result


def save_features(features: dict, out: PathLike) -> None:
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **features)


def print_progress(done: int, total: int) -> None:
    end = "\n" if done == total or not sys.stderr.isatty() else "\r"
    if sys.stderr.isatty() or done == total or done % 50 == 0:
        print(f"batch {done}/{total}", end=end, file=sys.stderr, flush=True)
