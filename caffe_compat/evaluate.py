"""`caffe-compat evaluate`: features file in, paper metrics, JSON and figures out.

A features file is an .npz with `embeddings` (n x d float32), `labels` (n), and
optionally `paths` (n image paths, relative to the file's folder unless absolute) and
`assignments` (n cluster ids, e.g. a clustering computed elsewhere). Figures need
matplotlib (`pip install 'caffe-compat[plots]'`), except the retrieval grid, which
is drawn with Pillow (`caffe-compat[images]`).
"""
from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import CaffeCompatError
from .io.atomic import atomic_path, write_text
from .metrics import DEFAULT_RECALL_K, check_embeddings, evaluate, nearest_neighbours

PathLike = Union[str, Path]
RECALL_FIGURE = "recall_at_k.png"
RETRIEVAL_FIGURE = "retrieval.png"
LOSS_FIGURE = "training_loss.png"


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
    except (ValueError, OSError, zipfile.BadZipFile) as err:
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
            except ValueError as err:  # object arrays refused without pickle
                raise CaffeCompatError(f"{path}: key '{key}' cannot be read without pickle ({err}); "
                                       f"store it as a plain numeric or string array") from None

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


def _figure():
    """A matplotlib Figure without pyplot, so no global backend is touched."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CaffeCompatError("figures need matplotlib: pip install 'caffe-compat[plots]'") from None
    return Figure


def _save(figure, path: PathLike) -> None:
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight")


def recall_curve(result: dict, path: PathLike) -> None:
    """Recall@K against K (log scale), as the paper's figures plot it."""
    figure = _figure()(figsize=(5, 3.5))
    axes = figure.add_subplot()
    ks = [int(k) for k in result["recall"]]
    values = [100 * v for v in result["recall"].values()]
    axes.plot(ks, values, marker="o")
    for k, value in zip(ks, values):
        axes.annotate(f"{value:.1f}", (k, value), textcoords="offset points", xytext=(0, 6),
                      ha="center", fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    axes.set_ylim(0, 110)
    axes.grid(True, alpha=0.3)
    axes.set_title(f"Recall@K  (n={result['n']}, {result['classes']} classes)")
    _save(figure, path)


def _thumbnail(image, size: int, where: str):
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except FileNotFoundError:
            raise CaffeCompatError(f"{image}: image not found ({where})") from None
        except OSError as err:
            raise CaffeCompatError(f"{image}: not a readable image ({where}): {err}") from None
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    elif isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        raise CaffeCompatError(f"{where}: expected a path, a PIL image or a uint8 array, got {type(image).__name__}")
    image.thumbnail((size, size))
    return image


def retrieval_grid(embeddings, labels, images_or_paths: Sequence, path: PathLike,
                   queries: Union[int, Sequence[int]] = 8, k: int = 5, device="cpu", tile: int = 128) -> None:
    """One row per query: the query (grey border), then its k nearest items, framed green
    when they share the query's class and red when not. `queries` is a count (spread
    evenly over the items) or a list of indices."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise CaffeCompatError("the retrieval grid needs Pillow: pip install 'caffe-compat[images]'") from None

    x, y = check_embeddings(embeddings, labels)
    n = len(x)
    if len(images_or_paths) != n:
        raise CaffeCompatError(f"images_or_paths: {len(images_or_paths)} images for {n} embeddings")
    if isinstance(queries, (int, np.integer)):
        query_index = np.unique(np.linspace(0, n - 1, min(int(queries), n)).round().astype(np.int64))
    else:
        query_index = np.asarray(queries, dtype=np.int64).reshape(-1)
    if len(query_index) == 0:
        raise CaffeCompatError("queries: no query to show")
    neighbours = nearest_neighbours(x, query_index, k, device)
    border, gap = 6, 4
    cell = tile + 2 * border
    sheet = Image.new("RGB", ((k + 1) * (cell + gap) + gap, len(query_index) * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (query, found) in enumerate(zip(query_index, neighbours)):
        for column, item in enumerate([query, *found]):
            colour = (128, 128, 128) if column == 0 else (0, 160, 0) if y[item] == y[query] else (210, 0, 0)
            left, top = gap + column * (cell + gap), gap + row * (cell + gap)
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
            thumb = _thumbnail(images_or_paths[item], tile, f"item {item}")
            sheet.paste(thumb, (left + border + (tile - thumb.width) // 2, top + border + (tile - thumb.height) // 2))
    suffix = Path(path).suffix.lstrip(".").upper() or "PNG"
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG" if suffix == "JPG" else suffix)


def _read_loss_log(log_csv: Path):
    try:
        with open(log_csv, newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        raise CaffeCompatError(f"{log_csv}: cannot read the training log: {err}") from None
    header = [cell.strip() for cell in rows[0]] if rows else []
    if header != ["iteration", "loss", "lr"]:
        raise CaffeCompatError(f"{log_csv}: expected the header 'iteration,loss,lr', found {','.join(header)!r}")
    values = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            iteration, loss, lr = (float(cell) for cell in row)
        except ValueError:
            raise CaffeCompatError(f"{log_csv}:{line}: expected three numbers, found {','.join(row)!r}") from None
        values.append((iteration, loss, lr))
    if not values:
        raise CaffeCompatError(f"{log_csv}: no rows after the header")
    return np.array(values)


def loss_curve(log_csv: PathLike, path: PathLike) -> None:
    """Training loss against iteration, the learning rate on a second axis."""
    log_csv = Path(log_csv)
    values = _read_loss_log(log_csv)
    figure = _figure()(figsize=(6, 3.5))
    axes = figure.add_subplot()
    axes.plot(values[:, 0], values[:, 1], color="tab:blue", linewidth=1)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss", color="tab:blue")
    axes.grid(True, alpha=0.3)
    rate = axes.twinx()
    rate.step(values[:, 0], values[:, 2], where="post", color="tab:orange", linewidth=1)
    rate.set_ylabel("learning rate", color="tab:orange")
    if (values[:, 2] > 0).all():
        rate.set_yscale("log")
    axes.set_title(log_csv.name)
    _save(figure, path)


def run_evaluate(features_path: PathLike, recall_k: Optional[Sequence[int]] = None, use_assignments: bool = False,
                 json_path: Optional[PathLike] = None, figure_dir: Optional[PathLike] = None,
                 device="cpu", train_log: Optional[PathLike] = None) -> dict:
    """Everything `caffe-compat evaluate` does; prints nothing, returns the metrics.

    With `use_assignments` the file's own `assignments` are scored instead of running
    k-means. `figure_dir` receives recall_at_k.png, retrieval.png when the file lists
    image `paths`, and training_loss.png from `train_log` (the CSV `train --log` wrote)."""
    features_path = Path(features_path)
    if figure_dir is not None:
        _figure()  # fail before the long part when matplotlib is missing
    features = load_features(features_path)
    if use_assignments and features.assignments is None:
        raise CaffeCompatError(f"{features_path}: missing key 'assignments' (needed by --use-assignments)")
    result = evaluate(features.embeddings, features.labels,
                      DEFAULT_RECALL_K if recall_k is None else recall_k,
                      assignments=features.assignments if use_assignments else None, device=device)
    if json_path is not None:
        write_text(json_path, json.dumps(result, indent=2) + "\n")
    if figure_dir is not None:
        figure_dir = Path(figure_dir)
        recall_curve(result, figure_dir / RECALL_FIGURE)
        if train_log is not None:
            loss_curve(train_log, figure_dir / LOSS_FIGURE)
        if features.paths is not None:
            images = [p if Path(p).is_absolute() else features_path.parent / p for p in features.paths]
            retrieval_grid(features.embeddings, features.labels, images, figure_dir / RETRIEVAL_FIGURE,
                           k=min(5, len(images) - 1), device=device)
    return result
