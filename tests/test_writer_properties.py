"""Properties of every writer's one path (io.atomic): whatever is written and wherever a
write fails (a full disk, a bug), the output is the new content or the old one, never a
mix, and nothing temporary is left beside it."""
import errno
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from caffe_compat.errors import CaffeCompatError
from caffe_compat.io.atomic import atomic_file, atomic_folder, write_bytes
from caffe_compat.io.datum import write_datum_lmdb

FAILURES = st.sampled_from([None, "enospc", "bug"])  # None: the write completes


def _fail(kind):
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    raise ValueError("a fault of the writer's own")


def _outcome(kind, write):
    """Run `write`; the error it must end in for `kind` (None when it completes)."""
    if kind is None:
        write()
        return
    expected = CaffeCompatError if kind == "enospc" else ValueError
    with pytest.raises(expected) as caught:
        write()
    if kind == "enospc":
        assert str(caught.value).endswith("cannot be written (no space left on device)")


def _only(folder: Path, names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@settings(max_examples=40)
@given(old=st.one_of(st.none(), st.binary(max_size=64)), new=st.binary(max_size=4096),
       cut=st.integers(0, 4096), kind=FAILURES, how=st.sampled_from(["bytes", "torch", "numpy"]))
def test_a_file_output_is_old_or_new_never_half(old, new, cut, kind, how):
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "out.bin"
        if old is not None:
            target.write_bytes(old)

        def write():
            with atomic_file(target) as handle:
                if how == "bytes":
                    handle.write(new[:cut] if kind else new)
                elif how == "torch":
                    torch.save({"x": torch.frombuffer(bytearray(new or b"\0"), dtype=torch.uint8)}, handle)
                else:
                    np.savez(handle, x=np.frombuffer(new or b"\0", np.uint8))
                if kind:
                    _fail(kind)

        _outcome(kind, write)
        if kind is None:
            assert target.exists() and (how != "bytes" or target.read_bytes() == new)
        elif old is None:
            assert not target.exists()
        else:
            assert target.read_bytes() == old
        _only(Path(folder), ["out.bin"] if target.exists() else [])


@settings(max_examples=25)
@given(records=st.integers(1, 6), fail_after=st.integers(0, 6), kind=FAILURES, had=st.booleans())
def test_a_folder_output_appears_whole_or_not_at_all(records, fail_after, kind, had):
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "db"
        if had:  # an empty folder the user made for it
            target.mkdir()

        def write():
            with atomic_folder(target) as building:
                for i in range(records):
                    (building / f"part{i}").write_bytes(bytes([i]) * 10)
                    if kind and i >= min(fail_after, records - 1):
                        _fail(kind)

        _outcome(kind, write)
        if kind is None:
            _only(target, [f"part{i}" for i in range(records)])
        else:
            assert not target.exists() or not any(target.iterdir())
        _only(Path(folder), ["db"] if target.exists() else [])


@settings(max_examples=10)
@given(count=st.integers(1, 5), kind=FAILURES)
def test_an_lmdb_is_written_whole_or_not_at_all(count, kind):
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "lmdb"
        images = [(np.full((1, 2, 2), i, np.uint8), i) for i in range(count)]

        def records():
            for index, record in enumerate(images):
                if kind and index == count - 1:
                    _fail(kind)
                yield record

        _outcome(kind, lambda: write_datum_lmdb(target, records()))
        assert target.exists() == (kind is None)
        _only(Path(folder), ["lmdb"] if kind is None else [])


def test_bytes_written_over_an_output_replace_it_whole(tmp_path):
    target = tmp_path / "a.txt"
    write_bytes(target, b"old")
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    _only(tmp_path, ["a.txt"])
