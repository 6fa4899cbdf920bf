"""Reading an LMDB of Caffe's as of one commit, safely: opened with LMDB's reader lock,
its page structure checked before any page is read (see lmdb_pages), one read
transaction shared by every reader of the folder in this process. Torch-free, so
`inspect` can read a data layer's first record."""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Dict, Tuple

from ..errors import CaffeCompatError
from .datum import datum_to_array, parse_datum
from .lmdb_pages import check_lmdb_file


class LmdbSnapshot:
    """An LMDB opened with LMDB's reader lock and one read transaction on it, whose records
    every reader of the folder in this process reads: a database another process is
    appending to is read as of one commit (as Caffe's one cursor per reader does), and
    its pages are not reused by that writer while the transaction lasts."""

    def __init__(self, path: str, where: str):
        import lmdb

        self.path = path
        self.users = 0
        # Cursors of the one transaction step under this lock (producer threads share it);
        # re-entrant, as a garbage collection between steps can close another reader.
        self.lock = threading.RLock()
        options = dict(readonly=True, readahead=False, max_readers=256)
        try:
            try:
                self.env = lmdb.open(path, lock=True, **options)
            except lmdb.ReadonlyError:
                # lock.mdb cannot be created or written here (a read-only folder, another
                # user's files): read without the reader table, as Caffe built with
                # ALLOW_LMDB_NOLOCK does, and say what that costs.
                self.env = lmdb.open(path, lock=False, **options)
                warnings.warn(f"{where}: {path}: LMDB's lock file cannot be written here; reading without its "
                              f"reader lock, so no process may write this LMDB meanwhile", stacklevel=2)
        except lmdb.Error as err:
            raise CaffeCompatError(f"{where}: cannot open the LMDB {path}: {err}") from None
        try:
            self.txn = self._begin(where)
            check_lmdb_file(path, where, self.txn.id())  # before any cursor reads a page
            self.entries = self.txn.stat()["entries"]
        except BaseException:
            self.env.close()
            raise

    def _begin(self, where: str):
        import lmdb

        try:
            try:
                return self.env.begin(buffers=False)
            except lmdb.MapResizedError:  # a writer grew the map since it was opened: map it anew
                self.env.set_mapsize(0)
                return self.env.begin(buffers=False)
        except lmdb.Error as err:
            raise CaffeCompatError(f"{where}: cannot read the LMDB {self.path}: {err}") from None

    def close(self) -> None:
        with self.lock:
            self.env.close()  # ends the transaction and its cursors too


class LmdbSnapshots:
    """The open snapshots by folder: py-lmdb refuses to open one environment twice in a
    process, so each is opened once, used by every layer reading it, and closed when the
    last lets go."""

    def __init__(self):
        # Re-entrant: a garbage collection inside the locked section (lmdb.open allocates)
        # can finalise another reader's generator, whose exit takes the lock in this thread.
        self._lock = threading.RLock()
        self._open: Dict[str, LmdbSnapshot] = {}

    def acquire(self, path: str, where: str) -> LmdbSnapshot:
        with self._lock:
            snapshot = self._open.get(path)
            if snapshot is None:
                snapshot = self._open[path] = LmdbSnapshot(path, where)
            snapshot.users += 1
            return snapshot

    def release(self, snapshot: LmdbSnapshot) -> None:
        with self._lock:
            snapshot.users -= 1
            if not snapshot.users:
                if self._open.get(snapshot.path) is snapshot:
                    del self._open[snapshot.path]
                snapshot.close()

    @contextlib.contextmanager
    def use(self, path: str, where: str):
        snapshot = self.acquire(path, where)
        try:
            yield snapshot
        finally:
            self.release(snapshot)


SNAPSHOTS = LmdbSnapshots()


def first_record_shape(path: str, where: str) -> Tuple[int, ...]:
    """The C x H x W of the LMDB's first Datum (decoded, where it holds an encoded image)."""
    import lmdb

    with SNAPSHOTS.use(path, where) as snapshot, snapshot.lock:
        try:
            cursor = snapshot.txn.cursor()
            value = cursor.value() if cursor.first() else None
        except lmdb.Error as err:
            raise CaffeCompatError(f"{where}: the LMDB {path} is damaged at its first record: {err}") from None
    if value is None:
        raise CaffeCompatError(f"{where}: the LMDB {path} holds no records")
    array, _ = datum_to_array(parse_datum(value, f"{where}: {path}: first record"), f"{where}: {path}")
    return tuple(array.shape)
