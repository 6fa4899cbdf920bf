"""`caffe-compat evaluate`: features file in, paper metrics, JSON and figures out.

A features file is an .npz with `embeddings` (n x d float32), `labels` (n), and
optionally `paths` (n image paths, relative to the file's folder unless absolute) and
`assignments` (n cluster ids, e.g. a clustering computed elsewhere). Figures
(figures.py) need matplotlib (`pip install 'caffe-compat[plots]'`), and Pillow to read
the images of the retrieval figure.
"""
from __future__ import annotations

import json
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import CaffeCompatError
from ..io.atomic import write_text
from ..io.run_inputs import RunInputs
from .metrics import DEFAULT_RECALL_K, check_embeddings, evaluate

PathLike = Union[str, Path]
RECALL_FIGURE = "recall_at_k.png"
RETRIEVAL_FIGURE = "retrieval.png"
LOSS_FIGURE = "training_loss.png"
# What numpy and zipfile raise on a damaged archive or array header.
_DAMAGED = (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, SyntaxError, UnicodeDecodeError,
            MemoryError, OverflowError, zipfile.BadZipFile, zlib.error, NotImplementedError)


@dataclass(frozen=True)
class Features:
    embeddings: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,)
    paths: Optional[np.ndarray]  # (n,) str
    assignments: Optional[np.ndarray]  # (n,)


def load_features(path: PathLike) -> Features:
    path = Path(path)
    if not path.is_file():
        raise CaffeCompatError(f"{path}: features file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except _DAMAGED as err:
        raise CaffeCompatError(f"{path}: not a readable .npz archive: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CaffeCompatError(f"{path}: expected an .npz archive of named arrays, found a single array")
    with archive:
        keys = set(archive.files)
        for key in ("embeddings", "labels"):
            if key not in keys:
                raise CaffeCompatError(f"{path}: missing key '{key}' (keys present: {', '.join(sorted(keys)) or 'none'})")

        def read(key):
            try:
                return archive[key]
            except ValueError as err:
                if "pickle" in str(err):  # object arrays are refused without pickle
                    raise CaffeCompatError(f"{path}: key '{key}' cannot be read without pickle ({err}); "
                                           f"store it as a plain numeric or string array") from None
                raise CaffeCompatError(f"{path}: key '{key}' is damaged: {err}") from None
            except _DAMAGED as err:
                raise CaffeCompatError(f"{path}: key '{key}' is damaged: {type(err).__name__}: {err}") from None

        try:
            embeddings, labels = check_embeddings(read("embeddings"), read("labels"))
        except CaffeCompatError as err:
            raise CaffeCompatError(f"{path}: {err}") from None
        n = len(embeddings)
        paths = read("paths") if "paths" in keys else None
        assignments = read("assignments") if "assignments" in keys else None
    if paths is not None:
        if paths.shape != (n,) or paths.dtype.kind not in "US":
            raise CaffeCompatError(f"{path}: 'paths' must be {n} strings, got {paths.dtype} of shape {paths.shape}")
        paths = paths.astype(str)
    if assignments is not None and assignments.shape != (n,):
        raise CaffeCompatError(f"{path}: 'assignments' must hold {n} cluster ids, got shape {assignments.shape}")
    return Features(embeddings, labels, paths, assignments)


def format_table(result: dict) -> str:
    """The metrics as the paper's tables print them, in percent."""
    rows = [(f"Recall@{k}", value) for k, value in result["recall"].items()]
    rows += [("NMI", result["nmi"]), ("F1", result["f1"]), ("RI", result["ri"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  {'%':>6}"]
    lines += [f"{name:<{width}}  {100 * value:6.2f}" for name, value in rows]
    lines.append(f"{result['n']} items, {result['classes']} classes")
    return "\n".join(lines)


def _refuse_figures_over_inputs(figure_dir: Path, features_path: Path, paths, train_log) -> None:
    """No figure may replace what the run reads: the features, the images they list, the log."""
    inputs = RunInputs()
    inputs.add(features_path, "the features")
    if train_log is not None:
        inputs.add(train_log, "the training log")
    if paths is not None:
        inputs.add_images([str(p if Path(p).is_absolute() else features_path.parent / p) for p in paths],
                          f"an image listed in {features_path}")
    for name in (RECALL_FIGURE, RETRIEVAL_FIGURE, LOSS_FIGURE):
        inputs.check_output(figure_dir / name)


def run_evaluate(features_path: PathLike, recall_k: Optional[Sequence[int]] = None, use_assignments: bool = False,
                 json_path: Optional[PathLike] = None, figure_dir: Optional[PathLike] = None,
                 device="cpu", train_log: Optional[PathLike] = None, dataset: Optional[str] = None) -> dict:
    """Everything `caffe-compat evaluate` does; prints nothing, returns the metrics.

    With `use_assignments` the file's own `assignments` are scored instead of running
    k-means. `figure_dir` receives recall_at_k.png (with the paper's published curve
    when `dataset` is one of its cub, cars, sop), retrieval.png when the file lists
    image `paths`, and training_loss.png from `train_log` (the CSV `train --log` wrote)."""
    from . import figures

    features_path = Path(features_path)
    published = None
    if figure_dir is not None:
        figures.require_matplotlib()  # fail before the long part
        if dataset is not None:
            published = {"paper": figures.published_recall(dataset)}
    features = load_features(features_path)
    if figure_dir is not None:
        _refuse_figures_over_inputs(Path(figure_dir), features_path, features.paths, train_log)
    if use_assignments and features.assignments is None:
        raise CaffeCompatError(f"{features_path}: missing key 'assignments' (needed by --use-assignments)")
    result = evaluate(features.embeddings, features.labels,
                      DEFAULT_RECALL_K if recall_k is None else recall_k,
                      assignments=features.assignments if use_assignments else None, device=device,
                      progress=True)
    if json_path is not None:
        write_text(json_path, json.dumps(result, indent=2) + "\n")
    if figure_dir is not None:
        figure_dir = Path(figure_dir)
        figures.recall_curve({f"ours ({features_path.name})": result["recall"]}, figure_dir / RECALL_FIGURE,
                             title=f"Recall@K: {features_path.name}, {result['n']} items, "
                                   f"{result['classes']} classes", published=published)
        if train_log is not None:
            figures.loss_curve(train_log, figure_dir / LOSS_FIGURE, title=f"training: {Path(train_log).name}")
        if features.paths is not None:
            images = [p if Path(p).is_absolute() else features_path.parent / p for p in features.paths]
            figures.retrieval_figure(features.embeddings, features.labels, images, figure_dir / RETRIEVAL_FIGURE,
                                     title=f"Retrieval: {features_path.name}", device=device)
        else:
            warnings.warn(f"{features_path}: no image paths ('paths' key), so no {RETRIEVAL_FIGURE}; features "
                          f"extracted from an image list have them", stacklevel=2)
    return result
