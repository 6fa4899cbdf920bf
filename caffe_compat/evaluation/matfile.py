"""MATLAB level 5 MAT-files (the Cars196 archive's cars_annos.mat), read without scipy.
Format: MathWorks, "MAT-File Format", ch. 1: a 128-byte header, then tagged data elements."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Dict, Union

import numpy as np

from ..errors import CaffeCompatError

PathLike = Union[str, Path]
_MI_NUMERIC = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8, _MI_UTF16, _MI_UTF32 = 14, 15, 16, 17, 18
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
MAX_INFLATED = 256 << 20  # bytes one compressed element may inflate to


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
                yield from self.elements(self.inflate(payload))
                pos += 8 + size
            else:
                yield kind, payload
                pos += 8 + size + (-size % 8)

    def inflate(self, payload: bytes) -> bytes:
        """A compressed element's bytes, refused past MAX_INFLATED (a zip bomb)."""
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(payload, MAX_INFLATED)
        except zlib.error as err:
            raise self.fail(f"damaged compressed element: {err}") from None
        if inflater.unconsumed_tail:
            raise self.fail(f"a compressed element inflates past {MAX_INFLATED >> 20} MiB "
                            "(Cars196's annotations need a few MiB); refused")
        if not inflater.eof:
            raise self.fail("damaged compressed element: truncated stream")
        return data

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
    try:
        for kind, payload in reader.elements(data, 128):
            if kind != _MI_MATRIX:
                continue
            name_parts = reader.elements(payload)
            next(name_parts), next(name_parts)
            name = next(name_parts)[1].decode("ascii")
            variables[name] = reader.matrix(payload)
    # A damaged file runs out of elements (StopIteration), or holds sizes, dims and
    # text that do not fit together: each of these means the same to the user.
    except (StopIteration, IndexError, ValueError, UnicodeDecodeError, struct.error, MemoryError,
            RecursionError, OverflowError) as err:
        raise CaffeCompatError(f"{path}: damaged MAT-file ({err.__class__.__name__}: {err})") from None
    return variables
