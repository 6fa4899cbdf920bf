"""Figures as a paper shows them: the training curve, Recall@K curves (with the paper's
published curve beside ours on its datasets), and retrieval examples split into
successes and failures. Drawn with matplotlib's object API (no pyplot, no global
backend), written atomically."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import CaffeCompatError, quote
from ..io.atomic import atomic_path
from ..io.files import MAX_IMAGE_BYTES, read_regular_file
from .metrics import check_embeddings, nearest_neighbours
from .published import PUBLISHED

PathLike = Union[str, Path]
# Caffe's `average_loss` window is the solver's choice; 20 is a common one (the paper's solver uses 1).
SMOOTHING_WINDOW = 20


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CaffeCompatError("figures need matplotlib: pip install 'caffe-compat[plots]'") from None
    return Figure


def require_matplotlib() -> None:
    _figure_class()


def _save(figure, path: PathLike) -> None:
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=suffix, dpi=130, bbox_inches="tight")


# ------------------------------------------------------------------ training curve
def read_training_log(log_csv: PathLike) -> dict:
    """{'iteration', 'loss', 'lr', 'smoothed' (or None)} as arrays, from the CSV that
    `train --log` writes: a header naming iteration, loss and lr, optionally a smoothed
    loss column (any column whose name starts with 'smoothed'), in any order."""
    log_csv = Path(log_csv)
    if log_csv.exists() and not log_csv.is_file():  # a folder, a device or a pipe (which may never end)
        raise CaffeCompatError(f"{log_csv}: not a regular file, expected the training log CSV")
    try:
        with open(log_csv, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CaffeCompatError(f"{log_csv}: cannot read the training log: {err}") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    missing = [name for name in ("iteration", "loss", "lr") if name not in header]
    if missing:
        raise CaffeCompatError(f"{log_csv}: expected a header with iteration, loss and lr, found "
                               f"{quote(','.join(header))}")
    smoothed = next((i for i, name in enumerate(header) if name.startswith("smoothed")), None)
    columns = {name: header.index(name) for name in ("iteration", "loss", "lr")}
    if smoothed is not None:
        columns["smoothed"] = smoothed
    values = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CaffeCompatError(f"{log_csv}:{line}: expected {len(header)} values, found {quote(','.join(row))}")
        try:
            values.append([float(row[i]) for i in columns.values()])
        except ValueError:
            raise CaffeCompatError(f"{log_csv}:{line}: expected numbers, found {quote(','.join(row))}") from None
    if not values:
        raise CaffeCompatError(f"{log_csv}: no rows after the header")
    table = np.array(values)
    out = {name: table[:, i] for i, name in enumerate(columns)}
    out.setdefault("smoothed", None)
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of the last `window` values at each point (fewer at the start), as
    Caffe's solver smooths the loss it displays."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_curve(log_csv: PathLike, path: PathLike, title: Optional[str] = None) -> None:
    """Raw and smoothed loss against iteration, the learning rate on a second axis."""
    from matplotlib.ticker import MaxNLocator

    log = read_training_log(log_csv)
    iterations = log["iteration"]
    smoothed = log["smoothed"]
    smoothed_label = "smoothed loss"
    if smoothed is None or np.allclose(smoothed, log["loss"]):
        window = max(1, min(SMOOTHING_WINDOW, len(iterations) // 5))
        smoothed = moving_average(log["loss"], window)
        smoothed_label = f"loss, mean of the last {window}"
    figure = _figure_class()(figsize=(7, 4))
    axes = figure.add_subplot()
    raw, = axes.plot(iterations, log["loss"], color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
    mean, = axes.plot(iterations, smoothed, color="tab:blue", linewidth=1.8, label=smoothed_label)
    axes.set_xlabel("iteration")
    axes.set_ylabel("training loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(iterations[0], max(iterations[-1], iterations[0] + 1))
    axes.grid(True, alpha=0.3)
    if (log["loss"] > 0).all() and log["loss"].max() / log["loss"].min() > 100:
        axes.set_yscale("log")
    rate_axes = axes.twinx()
    rate, = rate_axes.step(iterations, log["lr"], where="post", color="tab:orange", linewidth=1.2,
                           label="learning rate")
    rate_axes.set_ylabel("learning rate", color="tab:orange")
    rate_axes.tick_params(axis="y", colors="tab:orange")
    rate_axes.yaxis.set_major_formatter(_distinct_formatter())
    axes.legend(handles=[raw, mean, rate], loc="upper right", fontsize=8, framealpha=0.9)
    axes.set_title(title or f"training loss: {Path(log_csv).name}", fontsize=10)
    _save(figure, path)


def distinct_labels(values) -> list:
    """Tick labels with as few significant digits as keep them apart (at least 3): a slowly
    decaying learning rate would otherwise read 0.001, 0.001, 0.001."""
    labels = []
    for digits in range(3, 17):
        labels = [f"{value:.{digits}g}" for value in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def _distinct_formatter():
    from matplotlib.ticker import Formatter

    class DistinctTicks(Formatter):
        def __call__(self, value, pos=None):
            return f"{value:.3g}"

        def format_ticks(self, values):
            return distinct_labels(values)

    return DistinctTicks()


# ------------------------------------------------------------------ Recall@K
def published_recall(dataset: str) -> dict:
    """The paper's Recall@K for the lifted structured embedding on one of its datasets,
    with where the numbers come from. The paper draws them as curves; the values are those
    later papers read off them (published.PUBLISHED, which says which is which)."""
    if dataset not in PUBLISHED:
        raise CaffeCompatError(f"dataset {dataset!r}: the paper reports cub, cars and sop")
    entry = PUBLISHED[dataset]
    return {"recall": {str(k): v / 100 for k, v in zip(entry["recall_k"], entry["recall"])},
            "source": "Oh Song et al., CVPR 2016, lifted structured, as later papers quote it"}


def recall_curve(curves: Mapping[str, Mapping[str, float]], path: PathLike, title: str = "Recall@K",
                 published: Optional[Mapping[str, dict]] = None, paired: bool = False) -> None:
    """Recall@K (%) against K on a log axis, one line per entry of `curves`
    ({label: {K: recall fraction}}); `published` ({label: published_recall(...)}) adds
    dashed black lines for numbers from the literature. `paired`: the curves come in
    (before, after) pairs, drawn in one colour, dotted then solid."""
    figure = _figure_class()(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    ks = sorted({int(k) for recall in curves.values() for k in recall})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    annotate = len(curves) + len(published or {}) <= 2
    for i, (label, recall) in enumerate(curves.items()):
        x = sorted(int(k) for k in recall)
        y = [100 * recall[str(k)] for k in x]
        style = ":" if paired and i % 2 == 0 else "-"
        axes.plot(x, y, style, marker="o", color=colours[(i // 2 if paired else i) % len(colours)], label=label)
        if annotate:
            for k, value in zip(x, y):
                axes.annotate(f"{value:.1f}", (k, value), textcoords="offset points", xytext=(0, 6),
                              ha="center", fontsize=8)
    for label, entry in (published or {}).items():
        x = sorted(int(k) for k in entry["recall"])
        ks = sorted(set(ks) | set(x))
        axes.plot(x, [100 * entry["recall"][str(k)] for k in x], "--", marker="s", color="black",
                  label=f"{label}: {entry['source']}")
    axes.set_xscale("log", base=2 if max(ks) <= 64 else 10)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.minorticks_off()
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    # The axis starts below the lowest point of every line, the published ones included.
    series = list(curves.values()) + [entry["recall"] for entry in (published or {}).values()]
    low = min(min(100 * v for v in recall.values()) for recall in series)
    axes.set_ylim(max(0, 10 * np.floor(low / 10) - 5), 102)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    axes.set_title(title, fontsize=10)
    _save(figure, path)


# ------------------------------------------------------------------ retrieval
def _image(item, where: str) -> np.ndarray:
    """An H x W (x 3) uint8 array from a path, a PIL image or an array."""
    if isinstance(item, (str, Path)):
        try:
            from PIL import Image
        except ImportError:
            raise CaffeCompatError("reading images needs Pillow: pip install 'caffe-compat[images]'") from None
        try:
            data = read_regular_file(item, MAX_IMAGE_BYTES)  # a FIFO would block, /dev/zero fill the memory
        except FileNotFoundError:
            raise CaffeCompatError(f"{item}: image not found ({where})") from None
        except OSError as err:
            raise CaffeCompatError(f"{item}: not a readable image ({where}): {err.strerror or err}") from None
        try:
            with Image.open(io.BytesIO(data)) as opened:
                return np.asarray(opened.convert("RGB"))
        except OSError as err:
            raise CaffeCompatError(f"{item}: not a readable image ({where}): {err}") from None
    if hasattr(item, "convert"):  # a PIL image
        return np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray) and item.ndim in (2, 3):
        return np.asarray(item, dtype=np.uint8)
    raise CaffeCompatError(f"{where}: expected an image path, a PIL image or a uint8 array, "
                           f"got {type(item).__name__}")


def split_queries(labels: np.ndarray, neighbours: np.ndarray, count: int):
    """(successes, failures): up to `count` query indices each whose nearest neighbour
    has / has not the query's class, spread evenly over the queries of each kind."""
    right = labels[neighbours[:, 0]] == labels
    picked = []
    for wanted in (True, False):
        found = np.flatnonzero(right == wanted)
        if len(found) > count:
            found = found[np.linspace(0, len(found) - 1, count).round().astype(np.int64)]
        picked.append(found)
    return picked[0], picked[1]


def retrieval_figure(embeddings, labels, images: Sequence, path: PathLike, k: int = 5, rows: int = 4,
                     title: str = "Retrieval", class_names: Optional[Mapping] = None, device="cpu") -> dict:
    """The paper's retrieval figure: queries whose nearest neighbour is right
    (successes) above those whose nearest neighbour is wrong (failures); each row a
    query and its k nearest items, framed green (same class) or red, with the class
    and the Euclidean distance under each. Returns {'successes': n, 'failures': n}."""
    x, y = check_embeddings(embeddings, labels)
    n = len(x)
    if len(images) != n:
        raise CaffeCompatError(f"images: {len(images)} images for {n} embeddings")
    k = min(k, n - 1)
    if k < 1:
        raise CaffeCompatError("retrieval figure: needs at least 2 items")
    order = nearest_neighbours(x, np.arange(n), k, device)
    successes, failures = split_queries(y, order, rows)

    def name_of(label) -> str:
        if class_names and label in class_names:
            return str(class_names[label])
        return str(int(label)) if float(label).is_integer() else str(label)
    sections = [(name, found) for name, found in (
        (f"successes: the nearest neighbour is of the query's class ({len(successes)} shown)", successes),
        (f"failures: the nearest neighbour is of another class ({len(failures)} shown)", failures)) if len(found)]
    pictures = {item: _image(images[item], f"item {item}")
                for _, queries in sections for query in queries for item in [query, *order[query]]}
    aspect = float(np.median([p.shape[0] / p.shape[1] for p in pictures.values()]))
    # Inches: a cell is 1.3 wide, a row its image plus 0.4 of caption; 0.35 per heading.
    row, heading_height, title_height = 1.3 * min(max(aspect, 0.5), 2.0) + 0.4, 0.35, 0.45
    heights = [title_height] + [heading_height + row * len(found) for _, found in sections]
    figure = _figure_class()(figsize=(1.3 * (k + 1), sum(heights)))
    parts = figure.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    parts[0].text(0.5, 0.5, title, ha="center", va="center", fontsize=11)
    for part, height, (heading, queries) in zip(parts[1:], heights[1:], sections):
        part.text(0.01, 1 - 0.5 * heading_height / height, heading, ha="left", va="center", fontsize=9)
        grid = part.subplots(len(queries), k + 1, squeeze=False)
        part.subplots_adjust(left=0.01, right=0.99, top=1 - heading_height / height, bottom=0.4 / height,
                             hspace=0.4 / (row - 0.4), wspace=0.08)
        for row, query in enumerate(queries):
            for column, item in enumerate([query, *order[query]]):
                axes = grid[row, column]
                picture = pictures[item]
                axes.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
                axes.set_xticks([])
                axes.set_yticks([])
                if column == 0:
                    colour, caption = "0.4", f"query\nclass {name_of(y[item])}"
                else:
                    colour = "tab:green" if y[item] == y[query] else "tab:red"
                    caption = f"class {name_of(y[item])}\nd={float(np.linalg.norm(x[item] - x[query])):.2f}"
                for spine in axes.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
                axes.set_xlabel(caption, fontsize=7, labelpad=2)
    _save(figure, path)
    return {"successes": len(successes), "failures": len(failures)}
