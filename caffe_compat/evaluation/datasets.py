"""The paper's three datasets, from their official archives to Caffe inputs.

Splits (Oh Song et al. 2016, sec. 5): CUB-200-2011 classes 1-100 train, 101-200 test;
Cars196 classes 1-98 train, 99-196 test; Stanford Online Products Ebay_train.txt /
Ebay_test.txt. Labels stay the official class ids.

Preprocessing: CUB and Cars images are resized to 256 x 256. Online Products images go
through the paper's `load_cropped_images.m`: the bounding box of the pixels darker
than 250 in grey (MATLAB's rgb2gray), widened by 15 px (16 px right and below, as
MATLAB's imcrop includes the end pixel), the longer side resized to 256 with the
aspect ratio kept (rounded up), and the shorter side padded with white to 256,
centred (the odd pixel after). Resizing is Pillow's bicubic (Keys' a = -0.5,
antialiased when shrinking), as MATLAB's imresize default.

Output, fmt="list": OUT/images/<path in the archive> (JPEG, quality 95) and
OUT/train.txt, OUT/test.txt with `images/<path> <label>` lines for Caffe's ImageData
layer (root_folder: OUT/). fmt="lmdb": OUT/train_lmdb, OUT/test_lmdb of Datum records
(3 x 256 x 256 uint8, BGR, keys %08d in list order), as the paper's
imageset_to_leveldb.cpp writes them. OUT/prepare.json records what was prepared.

Safety: index entries must be relative paths inside the archive (checked, with the
index file and line, before anything is written); OUT is built as a hidden sibling
(io/atomic.py's atomic_folder) and renamed into place when complete, so a killed run
or a full disk leaves no half-built OUT and the next run removes its leftovers. OUT
may be a link to an empty folder (that folder receives the dataset), not a dangling one.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import CaffeCompatError, quote
from ..io.atomic import atomic_folder, folder_target
from ..io.datum import fill_datum_lmdb
from ..io.files import MAX_IMAGE_BYTES, MAX_LIST_BYTES, read_regular_file
from ..io.text import parse_json
from ..tools.progress import progress
from .matfile import read_mat

PathLike = Union[str, Path]
IMAGE_SIZE = 256
CROP_PADDING = 15
WHITE_THRESHOLD = 250  # load_cropped_images.m: find(view < 250)
JPEG_QUALITY = 95
LMDB_COMMIT_EVERY = 1000
DATASETS = ("cub", "cars", "sop")
FORMATS = ("list", "lmdb")
MARKER = "prepare.json"  # written last: a folder holding it is a finished preparation


@dataclass(frozen=True)
class Item:
    image: Path  # the original file
    relative: str  # its path inside the archive's image folder, kept under OUT/images/
    label: int


def _first_existing(source: Path, names: Tuple[str, ...], subfolder: Optional[str] = None) -> Path:
    """The folder holding `names[0]`: `source` itself or its `subfolder` (the archive's
    top folder), else an error naming the missing file."""
    roots = [source] if subfolder is None else [source, source / subfolder]
    for root in roots:
        if (root / names[0]).exists() and not (root / names[0]).is_file():
            raise CaffeCompatError(f"{root / names[0]}: cannot read: not a regular file")
        if (root / names[0]).is_file():
            for name in names[1:]:
                if not (root / name).exists():
                    raise CaffeCompatError(f"{root / name}: missing from the archive")
            return root
    elsewhere = f" (nor in {source / subfolder})" if subfolder else ""
    raise CaffeCompatError(f"{source / names[0]}: missing{elsewhere}")


def _read_columns(path: Path, columns: int, header: bool = False) -> List[Tuple[int, List[str]]]:
    """(line number, fields) of each non-blank line."""
    rows = []
    try:
        lines = read_regular_file(path, MAX_LIST_BYTES).decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CaffeCompatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise CaffeCompatError(f"{path}: cannot read: {err.strerror}") from None
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise CaffeCompatError(f"{path}:{number}: expected {columns} fields, found {len(fields)}")
        rows.append((number, fields))
    return rows


def _integer(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CaffeCompatError(f"{where}: {quote(text)} is not an integer") from None


def _inside(entry: str, where: str) -> str:
    """An index entry as a normalised relative path. Absolute entries and ones that climb
    out with '..' are refused: joined under OUT/images/ they would write elsewhere, even
    over the archive's own images."""
    normal = os.path.normpath(entry) if entry else ""
    if (not normal or "\0" in entry or os.path.isabs(entry) or Path(entry).anchor or normal == "."
            or normal == os.pardir or normal.startswith(os.pardir + os.sep)):
        raise CaffeCompatError(f"{where}: entry {quote(entry)} is not a path inside the archive "
                               f"(absolute, empty or climbing out with '..'); nothing was written")
    return Path(normal).as_posix()


def _cub_items(source: Path) -> Tuple[List[Item], List[Item]]:
    root = _first_existing(source, ("images.txt", "image_class_labels.txt", "images"), "CUB_200_2011")
    index = root / "images.txt"
    names = {image_id: _inside(name, f"{index}:{number}") for number, (image_id, name) in _read_columns(index, 2)}
    labels_path = root / "image_class_labels.txt"
    train, test = [], []
    for number, (image_id, class_id) in _read_columns(labels_path, 2):
        if image_id not in names:
            raise CaffeCompatError(f"{labels_path}:{number}: image id {image_id} is not in images.txt")
        label = _integer(class_id, f"{labels_path}:{number}")
        item = Item(root / "images" / names[image_id], names[image_id], label)
        (train if label <= 100 else test).append(item)
    return train, test


def _cars_items(source: Path) -> Tuple[List[Item], List[Item]]:
    root = _first_existing(source, ("cars_annos.mat",))
    annos_path = root / "cars_annos.mat"
    annotations = read_mat(annos_path).get("annotations")
    if not isinstance(annotations, list) or not annotations or not isinstance(annotations[0], dict):
        raise CaffeCompatError(f"{annos_path}: no struct array 'annotations'")
    train, test = [], []
    for number, record in enumerate(annotations, start=1):
        where = f"{annos_path}: annotations({number})"
        for field in ("relative_im_path", "class"):
            if field not in record:
                raise CaffeCompatError(f"{where} has no field '{field}'")
        relative = record["relative_im_path"]
        label = np.asarray(record["class"]).reshape(-1)
        if (not isinstance(relative, str) or label.size != 1 or label.dtype.kind not in "iuf"
                or not np.isfinite(label[0])):
            raise CaffeCompatError(f"{where} needs a path string and one class")
        relative = _inside(relative, f"{where}.relative_im_path")
        item = Item(root / relative, relative, int(label[0]))
        (train if item.label <= 98 else test).append(item)
    return train, test


def _sop_items(source: Path) -> Tuple[List[Item], List[Item]]:
    root = _first_existing(source, ("Ebay_train.txt", "Ebay_test.txt"), "Stanford_Online_Products")
    splits = []
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        items = []
        for number, (_, class_id, _, path) in _read_columns(root / name, 4, header=True):
            where = f"{root / name}:{number}"
            relative = _inside(path, where)
            items.append(Item(root / relative, relative, _integer(class_id, where)))
        splits.append(items)
    return splits[0], splits[1]


def _resized_square(image):
    from PIL import Image

    return image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


def _grey(pixels: np.ndarray) -> np.ndarray:
    """MATLAB's rgb2gray on uint8: these weights, rounded back to uint8."""
    weights = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    return np.round(pixels[..., :3].astype(np.float64) @ weights).astype(np.uint8)


def _cropped_padded_square(image):
    """load_cropped_images.m with crop_padding 15 and square size 256."""
    from PIL import Image

    # A grey photo replicated to RGB keeps its values through _grey (the weights sum to 1),
    # as MATLAB uses a grey image as its own view.
    image = image.convert("RGB")
    rows, cols = np.nonzero(_grey(np.asarray(image)) < WHITE_THRESHOLD)
    if len(rows):  # an all-white image has nothing to crop to (MATLAB errors); keep it whole
        width, height = image.size
        image = image.crop((max(0, cols.min() - CROP_PADDING), max(0, rows.min() - CROP_PADDING),
                            min(width, cols.max() + CROP_PADDING + 2), min(height, rows.max() + CROP_PADDING + 2)))
    width, height = image.size
    if height == width:
        return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    if height > width:
        size = (-(-IMAGE_SIZE * width // height), IMAGE_SIZE)  # imresize rounds the free side up
    else:
        size = (IMAGE_SIZE, -(-IMAGE_SIZE * height // width))
    resized = image.resize(size, Image.BICUBIC)
    square = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    square.paste(resized, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return square


def _load(item: Item, preprocess):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(read_regular_file(item.image, MAX_IMAGE_BYTES))) as image:
            return preprocess(image)
    except FileNotFoundError:
        raise CaffeCompatError(f"{item.image}: image listed in the archive's index is missing") from None
    # Pillow reports damaged or hostile images as any of these.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CaffeCompatError(f"{item.image}: not a readable image: {err}") from None


def _write_list(items: List[Item], preprocess, out: Path, split: str, bar) -> str:
    lines = []
    for item in items:
        target = out / "images" / item.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _load(item, preprocess).save(target, format="JPEG", quality=JPEG_QUALITY)
        lines.append(f"images/{item.relative} {item.label}\n")
        bar.update()
    (out / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    return f"{split}.txt"


def _write_lmdb(items: List[Item], preprocess, out: Path, split: str, bar) -> str:
    def records():
        for item in items:
            yield np.asarray(_load(item, preprocess))[:, :, ::-1].transpose(2, 0, 1), item.label
            bar.update()

    fill_datum_lmdb(out / f"{split}_lmdb", records(), commit_every=LMDB_COMMIT_EVERY)
    return f"{split}_lmdb"


def _require(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise CaffeCompatError(f"dataset preparation needs {module}: pip install 'caffe-compat[{extra}]'") from None


def check_output(out: Path, source: Path) -> None:
    """`out` must be a new or empty folder (or a link to one) outside the archive."""
    folder_target(out)  # a dangling link is refused here, before any work
    if out.exists() and not out.is_dir():
        raise CaffeCompatError(f"{out}: is a file; -o names the folder prepare writes")
    archive, target = source.resolve(), out.resolve()
    if target == archive or archive in target.parents:
        raise CaffeCompatError(f"{out}: is --source {source} or inside it; prepare never writes into the archive")
    if out.is_dir() and any(out.iterdir()):
        if (out / MARKER).is_file():
            raise CaffeCompatError(f"{out}: already holds a prepared dataset ({MARKER}); remove it or give "
                                   f"another -o")
        raise CaffeCompatError(f"{out}: exists and is not empty; give a new or empty folder")


def prepared(out: PathLike, name: str, source: PathLike, fmt: str = "list") -> Optional[Dict[str, dict]]:
    """The summary of a finished `prepare(name, source, out, fmt)` found in `out`, else None."""
    out = Path(out)
    try:
        record = parse_json(out / MARKER, (out / MARKER).read_text(encoding="utf-8"))
        same = (record["dataset"], record["format"], record["source"]) == (name, fmt, str(Path(source).resolve()))
        return {split: {**info, "path": str(out / info["path"])} for split, info in record["splits"].items()} \
            if same else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CaffeCompatError):
        return None


_READERS = {"cub": (_cub_items, _resized_square), "cars": (_cars_items, _resized_square),
            "sop": (_sop_items, _cropped_padded_square)}


def _check_choices(name: str, fmt: str) -> None:
    if name not in _READERS:
        raise CaffeCompatError(f"dataset: unknown name {name!r} (one of {', '.join(DATASETS)})")
    if fmt not in FORMATS:
        raise CaffeCompatError(f"fmt: unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    _require("PIL", "images")
    if fmt == "lmdb":
        _require("lmdb", "lmdb")


def _checked_splits(name: str, source: Path, fmt: str) -> Dict[str, List[Item]]:
    """The archive's splits, every index entry and image checked; nothing is written."""
    _check_choices(name, fmt)
    if not source.is_dir():
        raise CaffeCompatError(f"{source}: dataset folder not found")
    splits = dict(zip(("train", "test"), _READERS[name][0](source)))
    for split, items in splits.items():
        if not items:
            raise CaffeCompatError(f"{source}: the {name} archive has no {split} images")
        missing = next((item for item in items if not item.image.is_file()), None)
        if missing is not None:
            what = "is not a regular file" if missing.image.exists() else "is missing"
            raise CaffeCompatError(f"{missing.image}: image listed in the archive's index {what}")
    return splits


def check_source(name: str, source: PathLike, fmt: str = "list") -> Dict[str, dict]:
    """What `prepare(name, source, ...)` would write, {split: {"images", "classes"}}, from an
    archive checked as `prepare` checks it, without writing anything."""
    splits = _checked_splits(name, Path(source), fmt)
    return {split: {"images": len(items), "classes": len({item.label for item in items})}
            for split, items in splits.items()}


def prepare(name: str, source: PathLike, out: PathLike, fmt: str = "list") -> Dict[str, dict]:
    """Write `name`'s train and test splits from the official archive extracted at
    `source` into `out` (a new or empty folder outside the archive). Everything is
    checked before anything is written, the folder is built as a hidden sibling and
    renamed into place when complete, and nothing under `source` is ever written.
    Returns {split: {"path", "images", "classes"}}."""
    source, out = Path(source), Path(out)
    _check_choices(name, fmt)
    check_output(out, source)  # before the archive is read: reading SOP's takes a while
    splits = _checked_splits(name, source, fmt)

    write = _write_list if fmt == "list" else _write_lmdb
    preprocess = _READERS[name][1]
    record = {"dataset": name, "format": fmt, "source": str(source.resolve()), "splits": {}}
    failures = ()
    if fmt == "lmdb":
        import lmdb

        failures = (lmdb.Error,)
    # Failures name OUT, not the hidden folder: the LMDBs are written in place inside it.
    with atomic_folder(out, failures) as staging:
        with progress(total=sum(map(len, splits.values())), desc=f"prepare {name}", unit="img") as bar:
            for split, items in splits.items():
                record["splits"][split] = {"path": write(items, preprocess, staging, split, bar),
                                           "images": len(items), "classes": len({item.label for item in items})}
        (staging / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return {split: {**info, "path": str(out / info["path"])} for split, info in record["splits"].items()}
