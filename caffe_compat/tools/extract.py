"""`caffe-compat extract`: run a net in its TEST phase over a dataset (an LMDB of
Datum records or a Caffe image list) and save one blob per image, with labels.

Image lists: relative paths in the list resolve against `root` when given, else the
list file's own folder (where `prepare` puts them); absolute paths stand as they are.
The prototxt's root_folder is not used: it belongs to the source `data` replaces. The
saved `paths` resolve from the features file: relative to its folder for images
under it, absolute otherwise.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..data import close_data_layers, data_layers
from ..deploy import override_mean
from ..devices import resolve_device
from ..errors import CaffeCompatError
from ..graph import build_graph, layer_included
from ..io.atomic import atomic_file, check_writable
from ..io.files import MAX_LIST_BYTES, NetFile, read_prototxt, read_regular_file, read_with_weights, weights_of
from ..io.run_inputs import RunInputs
from ..memory import check_blob_memory
from ..net import CaffeNet
from .progress import progress

PathLike = Union[str, Path]
DATA_TYPES = ("Data", "ImageData")


def _data_layer(net, phase: str):
    for layer in net.layer:
        if layer.type in DATA_TYPES and layer_included(layer, phase):
            return layer
    raise CaffeCompatError(f"net '{net.name}' has no Data or ImageData layer in its {phase} phase to feed from")


def _batch_size(layer) -> int:
    return layer.data_param.batch_size if layer.type == "Data" else layer.image_data_param.batch_size


def check_data(source: Path) -> None:
    """Fail before any work on a --data that is neither an LMDB folder nor a readable image list."""
    if source.is_dir():
        try:
            import lmdb  # noqa: F401
        except ImportError:
            raise CaffeCompatError("reading LMDB needs the lmdb package (pip install 'caffe-compat[lmdb]')") from None
    elif not source.exists():
        raise CaffeCompatError(f"{source}: no such LMDB folder or image list")
    else:
        list_entries(source)


def list_entries(source: Path):
    """The image paths of a Caffe image list, split from their labels at the last space as
    Caffe's ImageData layer does."""
    try:
        text = read_regular_file(source, MAX_LIST_BYTES).decode("utf-8")
    except OSError as err:
        raise CaffeCompatError(f"{source}: not a readable image list: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise CaffeCompatError(f"{source}: not a readable image list: {err}") from None
    return [line.rstrip().rpartition(" ")[0] for line in text.splitlines() if line.strip()]


def list_root(source: Path, root: Optional[Path] = None) -> str:
    """The root_folder that makes the list's entries resolve as the module docstring says."""
    absolute = [os.path.isabs(entry) for entry in list_entries(source)]
    if all(absolute):
        return ""
    if any(absolute):
        raise CaffeCompatError(f"{source}: mixes absolute and relative image paths (Caffe prepends one "
                               f"root_folder to all); make them all one kind")
    folder = Path(root) if root is not None else source.parent
    if not folder.is_dir():
        raise CaffeCompatError(f"{folder}: --root is not a folder")
    return os.path.abspath(folder) + os.sep


def point_at(net, data: Path, batch_size: Optional[int], phase: str = "TEST", root: Optional[Path] = None):
    """A copy of `net` whose data layer reads `data` (LMDB folder -> Data, file -> ImageData)
    in order, without shuffling, with the layer's own transform_param; an image list's
    paths resolve as the module docstring says."""
    net = type(net).FromString(net.SerializeToString())
    layer = _data_layer(net, phase)
    old_batch = _batch_size(layer)
    if data.is_dir():
        if root is not None:
            raise CaffeCompatError(f"--root applies to image lists; {data} is an LMDB folder")
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
        layer.image_data_param.root_folder = list_root(data, root)
    return net, layer


def _check_mean_file(layer) -> None:
    mean_file = layer.transform_param.mean_file if layer.transform_param.HasField("mean_file") else None
    if mean_file and not os.path.exists(mean_file):
        raise CaffeCompatError(f"layer '{layer.name}': transform_param.mean_file {mean_file} does not exist here; "
                               f"give --mean-file PATH or --mean-value B G R")


def extract_features(net_file: NetFile, weights, data: PathLike, blob: str = "fc_embedding",
                     device: str = "cpu", batch_size: Optional[int] = None, root: Optional[PathLike] = None,
                     mean_file: Optional[PathLike] = None, mean_values: Optional[Sequence[float]] = None,
                     show_progress: bool = False, weights_source: Optional[str] = None,
                     allow_missing_weights: bool = False, max_memory=None,
                     output: Optional[PathLike] = None) -> dict:
    """{'embeddings': n x d float32, 'labels': n, 'paths' (image lists; absolute)} in
    dataset order. `mean_file`/`mean_values` replace the data layer's mean. `output`, the
    file the features will go to, is refused before any work if it would replace a file
    the run reads (the data, its images, a mean file)."""
    device = resolve_device(device)
    if batch_size is not None and batch_size <= 0:
        raise CaffeCompatError(f"--batch-size {batch_size}: must be positive")
    data = Path(data)
    check_data(data)
    net_param, layer = point_at(net_file.net, data, batch_size, root=None if root is None else Path(root))
    override_mean(net_param, mean_file, mean_values)
    _check_mean_file(layer)
    if output is not None:
        inputs = RunInputs()
        inputs.add_net_layers([each for each in net_param.layer if layer_included(each, "TEST")], str(net_file.path))
        inputs.check_output(output)
    batch = _batch_size(layer)
    label_top = layer.top[1] if len(layer.top) > 1 else None
    net = CaffeNet(build_graph(net_param, "TEST", net_file.dialect, source=str(net_file.path)), weights,
                   weights_source=weights_source, allow_missing_weights=allow_missing_weights,
                   max_memory=max_memory).to(device).eval()
    check_blob_memory(net.blob_shapes, f"{net_file.path}: its TEST net", device=device)  # before a batch exists
    # The data layer's count: an LMDB another process is appending to is read as of one commit.
    source = next(module for name, module in data_layers(net) if name == layer.name)
    total = source.record_count()
    if blob not in net.blob_shapes:
        raise CaffeCompatError(f"net '{net_param.name}' has no blob '{blob}' "
                               f"(blobs: {', '.join(list(net.blob_shapes)[:12])}, ...)")
    wanted = [blob] + ([label_top] if label_top else [])
    embeddings, labels = [], []
    bar = progress(total=total, desc="extract", unit="img") if show_progress else None
    try:
        with torch.inference_mode():
            for i in range(math.ceil(total / batch)):
                out = net(blobs=wanted)
                embeddings.append(out[blob].float().reshape(out[blob].shape[0], -1).cpu().numpy())
                if label_top:
                    labels.append(out[label_top].cpu().numpy().reshape(-1))
                if bar is not None:
                    bar.update(min(batch, total - i * batch))
    finally:
        # Stop the prefetching thread now: left running into interpreter shutdown, it can be
        # inside a torch call when torch's thread pool is torn down (std::terminate, SIGABRT).
        close_data_layers(net)
    if bar is not None:
        bar.close()
    # The data layer wraps around at the end, as Caffe's does: drop the repeats.
    result = {"embeddings": np.concatenate(embeddings)[:total].astype(np.float32)}
    if labels:
        labels = np.concatenate(labels)[:total]
        # The label top is a float blob; Caffe's labels are integers (Datum.label, list lines).
        result["labels"] = labels.astype(np.int64) if np.array_equal(labels, np.round(labels)) else labels
    if layer.type == "ImageData":
        root_folder = layer.image_data_param.root_folder
        result["paths"] = np.array([os.path.abspath(root_folder + entry) for entry, _ in source.lines])
    return result


def save_features(features: dict, out: PathLike) -> None:
    """Write `features` as an .npz; image paths are stored relative to its folder where
    they lie under it, else absolute, so they resolve from the file wherever it is read."""
    out = Path(out)
    features = dict(features)
    if "paths" in features:
        folder = os.path.abspath(out.parent)
        features["paths"] = np.array([_from_folder(str(p), folder) for p in features["paths"]])
    with atomic_file(out) as handle:
        np.savez(handle, **features)


def extract_to_file(net: PathLike, weights: PathLike, data: PathLike, output: PathLike, blob: str = "fc_embedding",
                    dialect: Optional[str] = None, device: str = "cpu", batch_size: Optional[int] = None,
                    root: Optional[PathLike] = None, mean_file: Optional[PathLike] = None,
                    mean_values: Optional[Sequence[float]] = None, allow_missing_weights: bool = False,
                    max_memory: Optional[int] = None) -> str:
    """`caffe-compat extract`: the features of `data` through NET and WEIGHTS (files) saved
    into `output`, with progress; returns the line that says what was written."""
    check_writable(output, "-o")
    net_file, weights_file = read_with_weights(read_prototxt(net, dialect), weights, dialect)
    features = extract_features(net_file, weights_of(weights_file), data, blob, device, batch_size, root=root,
                                mean_file=mean_file, mean_values=mean_values, show_progress=True,
                                weights_source=str(weights), allow_missing_weights=allow_missing_weights,
                                max_memory=max_memory, output=output)
    save_features(features, output)
    n, d = features["embeddings"].shape
    return (f"wrote {output}: {n} x {d} '{blob}'"
            + (f", {len(set(features['labels'].tolist()))} classes" if "labels" in features else ""))


def _from_folder(path: str, folder: str) -> str:
    path = os.path.abspath(path)
    relative = os.path.relpath(path, folder)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative
