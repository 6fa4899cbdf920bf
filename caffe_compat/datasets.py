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
imageset_to_leveldb.cpp writes them.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import CaffeCompatError
from .io.atomic import write_text
from .io.datum import write_datum_lmdb

PathLike = Union[str, Path]
IMAGE_SIZE = 256
CROP_PADDING = 15
WHITE_THRESHOLD = 250  # load_cropped_images.m: find(view < 250)
JPEG_QUALITY = 95
LMDB_COMMIT_EVERY = 1000
DATASETS = ("cub", "cars", "sop")
FORMATS = ("list", "lmdb")


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
        if (root / names[0]).is_file():
            for name in names[1:]:
                if not (root / name).exists():
                    raise CaffeCompatError(f"{root / name}: missing from the archive")
            return root
    elsewhere = f" (nor in {source / subfolder})" if subfolder else ""
    raise CaffeCompatError(f"{source / names[0]}: missing{elsewhere}")


def _read_columns(path: Path, columns: int, header: bool = False) -> List[List[str]]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise CaffeCompatError(f"{path}:{number}: expected {columns} fields, found {len(fields)}")
        rows.append(fields)
    return rows


def _integer(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CaffeCompatError(f"{where}: {text!r} is not an integer") from None


def _cub_items(source: Path) -> Tuple[List[Item], List[Item]]:
    root = _first_existing(source, ("images.txt", "image_class_labels.txt", "images"), "CUB_200_2011")
    names = {row[0]: row[1] for row in _read_columns(root / "images.txt", 2)}
    train, test = [], []
    for image_id, class_id in _read_columns(root / "image_class_labels.txt", 2):
        if image_id not in names:
            raise CaffeCompatError(f"{root / 'image_class_labels.txt'}: image id {image_id} is not in images.txt")
        label = _integer(class_id, f"{root / 'image_class_labels.txt'}: image {image_id}")
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
        for field in ("relative_im_path", "class"):
            if field not in record:
                raise CaffeCompatError(f"{annos_path}: annotations({number}) has no field '{field}'")
        relative = record["relative_im_path"]
        label = np.asarray(record["class"]).reshape(-1)
        if not isinstance(relative, str) or label.size != 1:
            raise CaffeCompatError(f"{annos_path}: annotations({number}) needs a path string and one class")
        item = Item(root / relative, relative, int(label[0]))
        (train if item.label <= 98 else test).append(item)
    return train, test


def _sop_items(source: Path) -> Tuple[List[Item], List[Item]]:
    root = _first_existing(source, ("Ebay_train.txt", "Ebay_test.txt"), "Stanford_Online_Products")
    splits = []
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        rows = _read_columns(root / name, 4, header=True)
        splits.append([Item(root / path, path, _integer(class_id, f"{root / name}: image {image_id}"))
                       for image_id, class_id, _, path in rows])
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
        with Image.open(item.image) as image:
            return preprocess(image)
    except FileNotFoundError:
        raise CaffeCompatError(f"{item.image}: image listed in the archive's index is missing") from None
    except OSError as err:
        raise CaffeCompatError(f"{item.image}: not a readable image: {err}") from None


def _write_list(items: List[Item], preprocess, out: Path, split: str) -> Path:
    lines = []
    for item in items:
        target = out / "images" / item.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _load(item, preprocess).save(target, format="JPEG", quality=JPEG_QUALITY)
        lines.append(f"images/{item.relative} {item.label}\n")
    list_path = out / f"{split}.txt"
    write_text(list_path, "".join(lines))
    return list_path


def _write_lmdb(items: List[Item], preprocess, out: Path, split: str) -> Path:
    db_path = out / f"{split}_lmdb"
    records = (((np.asarray(_load(item, preprocess))[:, :, ::-1].transpose(2, 0, 1)), item.label) for item in items)
    write_datum_lmdb(db_path, records, commit_every=LMDB_COMMIT_EVERY)
    return db_path


def _require(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise CaffeCompatError(f"dataset preparation needs {module}: pip install 'caffe-compat[{extra}]'") from None


def prepare(name: str, source: PathLike, out: PathLike, fmt: str = "list") -> Dict[str, dict]:
    """Write `name`'s train and test splits from the official archive extracted at
    `source` into `out`. Returns {split: {"path", "images", "classes"}}."""
    readers = {"cub": (_cub_items, _resized_square), "cars": (_cars_items, _resized_square),
               "sop": (_sop_items, _cropped_padded_square)}
    if name not in readers:
        raise CaffeCompatError(f"dataset: unknown name {name!r} (one of {', '.join(DATASETS)})")
    if fmt not in FORMATS:
        raise CaffeCompatError(f"fmt: unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    _require("PIL", "images")
    if fmt == "lmdb":
        _require("lmdb", "lmdb")
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise CaffeCompatError(f"{source}: dataset folder not found")
    read_items, preprocess = readers[name]
    splits = dict(zip(("train", "test"), read_items(source)))
    out.mkdir(parents=True, exist_ok=True)
    write = _write_list if fmt == "list" else _write_lmdb
    summary = {}
    for split, items in splits.items():
        if not items:
            raise CaffeCompatError(f"{source}: the {name} archive has no {split} images")
        written = write(items, preprocess, out, split)
        summary[split] = {"path": str(written), "images": len(items),
                          "classes": len({item.label for item in items})}
    return summary


# MATLAB level 5 MAT-files (cars_annos.mat), read without scipy. Format: MathWorks,
# "MAT-File Format", ch. 1: a 128-byte header, then tagged data elements.
_MI_NUMERIC = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8, _MI_UTF16, _MI_UTF32 = 14, 15, 16, 17, 18
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}


class _MatReader:
    def __init__(self, path: Path, data: bytes):
        self.path = path
        if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
            raise CaffeCompatError(f"{path}: not a MATLAB level 5 MAT-file (v7.3/HDF5 and v4 files are not read)")
        self.order = "<" if data[126:128] == b"IM" else ">"

    def fail(self, message: str) -> CaffeCompatError:
        return CaffeCompatError(f"{self.path}: {message}")

    def elements(self, data: bytes, pos: int = 0, end: int = None):
        """(type, payload) of each data element in data[pos:end]."""
        end = len(data) if end is None else end
        while pos < end:
            if end - pos < 8:
                raise self.fail("truncated data element")
            kind, size = struct.unpack_from(self.order + "II", data, pos)
            if kind >> 16:  # small element: size and type share the first word
                kind, size = kind & 0xFFFF, kind >> 16
                yield kind, data[pos + 4:pos + 4 + size]
                pos += 8
                continue
            payload = data[pos + 8:pos + 8 + size]
            if len(payload) != size:
                raise self.fail("truncated data element")
            if kind == _MI_COMPRESSED:
                try:
                    yield from self.elements(zlib.decompress(payload))
                except zlib.error as err:
                    raise self.fail(f"damaged compressed element: {err}") from None
                pos += 8 + size
            else:
                yield kind, payload
                pos += 8 + size + (-size % 8)

    def numbers(self, kind: int, payload: bytes) -> np.ndarray:
        if kind not in _MI_NUMERIC:
            raise self.fail(f"unexpected data type {kind} in a numeric element")
        return np.frombuffer(payload, dtype=self.order + _MI_NUMERIC[kind])

    def matrix(self, payload: bytes):
        """The value of one miMATRIX element: ndarray, str, list (cell) or list of dicts (struct)."""
        if not payload:
            return np.zeros((0, 0))
        parts = self.elements(payload)
        flags = self.numbers(*next(parts))
        dims = tuple(int(d) for d in self.numbers(*next(parts)))
        next(parts)  # the array's name
        mx_class = int(flags[0]) & 0xFF
        count = int(np.prod(dims))
        if mx_class == _MX_CELL:
            return [self.matrix(body) for _, body in parts]
        if mx_class == _MX_STRUCT:
            width = int(self.numbers(*next(parts))[0])
            raw = next(parts)[1]
            names = [raw[i:i + width].split(b"\0", 1)[0].decode("ascii") for i in range(0, len(raw), width)]
            fields = [self.matrix(body) for _, body in parts]
            if len(fields) != count * len(names):
                raise self.fail(f"struct array of {count} elements holds {len(fields)} field values")
            return [dict(zip(names, fields[i * len(names):(i + 1) * len(names)])) for i in range(count)]
        if mx_class == _MX_CHAR:
            kind, body = next(parts)
            if count == 0:
                return ""
            if kind in (_MI_UTF8, _MI_UTF16, _MI_UTF32):
                encoding = {_MI_UTF8: "utf-8", _MI_UTF16: "utf-16", _MI_UTF32: "utf-32"}[kind]
                text = body.decode(encoding + ("" if kind == _MI_UTF8 else "-le" if self.order == "<" else "-be"))
                codes = np.array([ord(c) for c in text], dtype=np.uint32)
            else:
                codes = self.numbers(kind, body)
            chars = np.array([chr(c) for c in codes]).reshape(dims, order="F")
            if len(dims) == 2 and dims[0] == 1:
                return "".join(chars.reshape(-1))
            return ["".join(row) for row in chars.reshape(dims[0], -1)]
        if mx_class in _MX_NUMERIC:
            if int(flags[0]) & 0x800:
                raise self.fail("complex arrays are not supported")
            values = self.numbers(*next(parts)).astype(_MX_NUMERIC[mx_class])
            if values.size != count:
                raise self.fail(f"array of shape {dims} holds {values.size} values")
            return values.reshape(dims, order="F")
        raise self.fail(f"MATLAB array class {mx_class} (sparse, object or function) is not supported")


def read_mat(path: PathLike) -> Dict[str, object]:
    """Variables of a level 5 MAT-file (as MATLAB's save writes by default, compressed or
    not): numeric arrays as ndarrays (MATLAB shape), char arrays as str, cell arrays as
    lists and struct arrays as lists of dicts, both in MATLAB's column-major order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CaffeCompatError(f"{path}: cannot read: {err}") from None
    reader = _MatReader(path, data)
    variables = {}
    for kind, payload in reader.elements(data, 128):
        if kind != _MI_MATRIX:
            continue
        name_parts = reader.elements(payload)
        next(name_parts), next(name_parts)
        name = next(name_parts)[1].decode("ascii")
        variables[name] = reader.matrix(payload)
    return variables
