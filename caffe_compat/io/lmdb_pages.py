"""A check of an LMDB file's page structure before LMDB reads its records.

LMDB trusts its file: a truncated `data.mdb`, or a node offset or value size damaged on
disk, makes it read past the end of the file through its memory map, and the process
dies of SIGBUS, beyond any `except`. So before a cursor moves, the B-tree of the main
database is walked here (64-bit LMDB format, as Caffe writes it): every page the tree
reaches lies inside the file, every node inside its page, every value inside its page or
its overflow pages. Overflow pages themselves are not read, so the walk costs a read of
the branch and leaf pages only.

A database another process is writing is walked as of the reader's transaction: its
pages stay as they are while the reader holds LMDB's reader lock, and the meta pages are
read before the file's size, so every page they name is already in the file. A walk that
fails while a meta page changed under it read that page half-written, and starts again.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Optional, Tuple

from ..errors import CaffeCompatError

MAGIC = 0xBEEFC0DE
VERSION = 1
PAGE_HEADER = 16  # mp_pgno u64, mp_pad u16, mp_flags u16, mp_lower u16, mp_upper u16
NODE_HEADER = 8  # mn_lo u16, mn_hi u16, mn_flags u16, mn_ksize u16
P_BRANCH, P_LEAF = 0x01, 0x02
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
INVALID_PAGE = 2 ** 64 - 1
MAX_DEPTH = 32  # LMDB's CURSOR_STACK
META_ATTEMPTS = 5  # walks begun again after a meta page changed under them

_META = struct.Struct("<IIQQ48s48sQQ")  # magic, version, address, mapsize, free db, main db, last_pg, txnid
_DB = struct.Struct("<IHHQQQQQ")  # md_pad (psize in the free db), flags, depth, branch, leaf, overflow, entries, root
_PAGE = struct.Struct("<QHHHH")
_NODE = struct.Struct("<HHHH")
_META_LENGTH = PAGE_HEADER + _META.size


def check_lmdb_file(folder: str, where: str, txn_id: Optional[int] = None) -> None:
    """Raise CaffeCompatError naming the folder (and page) if LMDB would read outside
    `folder`/data.mdb in transaction `txn_id` (default: the newest)."""
    path = os.path.join(folder, "data.mdb")
    with open(path, "rb") as file:
        for attempt in range(META_ATTEMPTS):
            metas = _read_metas(file)
            size = os.fstat(file.fileno()).st_size
            if size < 2 * _META_LENGTH:
                raise CaffeCompatError(f"{where}: {folder}: data.mdb is {size} bytes, too short for an LMDB")
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                _Walk(data, size, folder, where).run(metas, txn_id)
                return
            except CaffeCompatError:
                if attempt + 1 == META_ATTEMPTS or _read_metas(file) == metas:
                    raise
            finally:
                data.close()


def _read_metas(file) -> Tuple[bytes, bytes]:
    """The headers of the two meta pages, one read each (the second sits one page in)."""
    first = os.pread(file.fileno(), _META_LENGTH, 0)
    psize = _DB.unpack_from(first, PAGE_HEADER + 24)[0] if len(first) == _META_LENGTH else 0
    return first, os.pread(file.fileno(), _META_LENGTH, psize) if psize >= _META_LENGTH else b""


def _parse_meta(header: bytes):
    """(txnid, page size, main db, last page), or None where no meta page is."""
    if len(header) < _META_LENGTH:
        return None
    magic, version, _, _, free, main, last_pg, txnid = _META.unpack_from(header, PAGE_HEADER)
    if magic != MAGIC or version != VERSION:
        return None
    return txnid, _DB.unpack(free)[0], main, last_pg


class _Walk:
    def __init__(self, data, size: int, folder: str, where: str):
        self.data, self.size, self.folder, self.where = data, size, folder, where

    def fail(self, what: str) -> CaffeCompatError:
        return CaffeCompatError(f"{self.where}: the LMDB {self.folder} is damaged: {what}")

    def run(self, metas: Tuple[bytes, bytes], txn_id: Optional[int]) -> None:
        psize, main, last_pg = self._meta(metas, txn_id)
        self.psize = psize
        pages = self.size // psize
        if last_pg >= pages:
            raise self.fail(f"data.mdb holds {pages} pages of {psize} bytes, its meta page counts {last_pg + 1} "
                            f"(the file is truncated)")
        self.last_pg = last_pg
        _, flags, depth, *_, root = _DB.unpack(main)
        if flags & 0x04:  # MDB_DUPSORT: not a plain key -> value database as Caffe writes
            raise self.fail("its main database has sorted duplicates; Caffe's LMDBs do not")
        if root != INVALID_PAGE:
            self._page(root, 1, set())

    def _meta(self, metas: Tuple[bytes, bytes], txn_id: Optional[int]):
        """(page size, main db, last page) of the meta page of transaction `txn_id`, else
        of the newer valid one, as LMDB picks it."""
        first = _parse_meta(metas[0])
        if first is None:
            raise self.fail("data.mdb does not start with an LMDB meta page")
        psize = first[1]
        if psize < 512 or psize > 65536 or psize & (psize - 1):
            raise self.fail(f"page size {psize} in its meta page")
        if psize + _META_LENGTH > self.size:
            raise self.fail("its second meta page lies past the end of data.mdb (the file is truncated)")
        second = _parse_meta(metas[1])
        if second is not None and second[1] != psize:
            second = None
        # The transaction's own meta page; gone when a writer committed twice since it
        # began, and then the newer one, whose pages the reader's lock keeps as well.
        own = [meta for meta in (first, second) if meta is not None and meta[0] == txn_id]
        if own:
            return own[0][1:]
        # LMDB uses the meta page with the newer transaction; a damaged one it skips.
        best = first if second is None or second[0] <= first[0] else second
        return best[1:]

    def _page(self, pgno: int, level: int, seen: set) -> None:
        if level > MAX_DEPTH:
            raise self.fail(f"its tree is deeper than {MAX_DEPTH} levels")
        if pgno > self.last_pg or pgno < 2:
            raise self.fail(f"a branch points to page {pgno}, outside pages 2 to {self.last_pg}")
        if pgno in seen:
            raise self.fail(f"page {pgno} is reached twice (a loop in its tree)")
        seen.add(pgno)
        start = pgno * self.psize
        _, _, flags, lower, upper = _PAGE.unpack_from(self.data, start)
        if bool(flags & P_BRANCH) == bool(flags & P_LEAF) or flags & ~(P_BRANCH | P_LEAF):
            raise self.fail(f"page {pgno} is neither a branch nor a leaf page (flags {flags:#x})")
        if not PAGE_HEADER <= lower <= upper <= self.psize or (lower - PAGE_HEADER) % 2:
            raise self.fail(f"page {pgno} has free space from {lower} to {upper}")
        count = (lower - PAGE_HEADER) // 2
        offsets = struct.unpack_from(f"<{count}H", self.data, start + PAGE_HEADER)
        for index, offset in enumerate(offsets):
            if not upper <= offset <= self.psize - NODE_HEADER:
                raise self.fail(f"page {pgno}, node {index}: offset {offset} outside the page's nodes")
            lo, hi, node_flags, key_size = _NODE.unpack_from(self.data, start + offset)
            end = offset + NODE_HEADER + key_size
            if flags & P_BRANCH:
                if end > self.psize:
                    raise self.fail(f"page {pgno}, node {index}: its key runs past the page")
                self._page(lo | hi << 16 | node_flags << 32, level + 1, seen)
                continue
            value_size = lo | hi << 16
            if node_flags & (F_SUBDATA | F_DUPDATA):
                raise self.fail(f"page {pgno}, node {index}: a sub-database, which Caffe's LMDBs do not have")
            if node_flags & F_BIGDATA:
                if end + 8 > self.psize:
                    raise self.fail(f"page {pgno}, node {index}: its overflow page number runs past the page")
                first = struct.unpack_from("<Q", self.data, start + end)[0]
                needed = -(-(PAGE_HEADER + value_size) // self.psize)
                if first < 2 or first + needed - 1 > self.last_pg:
                    raise self.fail(f"page {pgno}, node {index}: a {value_size}-byte value on pages {first} to "
                                    f"{first + needed - 1}, past the last page {self.last_pg}")
            elif end + value_size > self.psize:
                raise self.fail(f"page {pgno}, node {index}: a {value_size}-byte value runs past the page")
