"""Damaged LMDBs and solver states, generated: reading batches from a mutated LMDB, or
resuming training from a mutated `.solverstate.pt`, gives a result or CaffeCompatError,
never another exception, never a signal (LMDB's SIGBUS would end the whole run here,
loudly), never a hang. Derandomized, so CI runs the same examples every time."""
import copy
import io
import itertools
import os
import shutil
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_compat.data import close_data_layers
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.datum import array_to_datum
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
from caffe_compat.solver import Trainer
from conftest import REFERENCE, bounded, require

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EXAMPLE_SECONDS = 20  # far above one example's real work: only a hang reaches it
_folders = itertools.count()


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` with bytes overwritten, a run zeroed, or cut short."""
    kind = draw(st.sampled_from(["overwrite", "zero", "truncate"]))
    result = bytearray(data)
    if kind == "truncate":
        return bytes(result[:draw(st.integers(0, len(data) - 1))])
    if kind == "zero":
        start = draw(st.integers(0, len(data) - 1))
        end = min(len(data), start + draw(st.integers(1, 4096)))
        result[start:end] = bytes(end - start)
        return bytes(result)
    for offset, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                       min_size=1, max_size=8)):
        result[offset] = value
    return bytes(result)


# ---- LMDBs

def _lmdb(folder: Path, shape) -> bytes:
    """data.mdb of 20 records of `shape` (3 x 6 x 6: leaf pages; 3 x 40 x 40: overflow pages)."""
    env = lmdb.open(str(folder), map_size=1 << 24)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for i in range(20):
            txn.put(f"{i:08d}".encode(), array_to_datum(rng.integers(0, 256, shape, dtype=np.uint8), i % 4)
                    .SerializeToString())
    env.close()
    return (folder / "data.mdb").read_bytes()


@pytest.fixture(scope="module")
def lmdb_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdbs")
    return {"leaf": _lmdb(root / "leaf", (3, 6, 6)), "overflow": _lmdb(root / "overflow", (3, 40, 40))}


def read_batches(folder: Path) -> None:
    net = messages("bvlc").NetParameter()
    layer = net.layer.add(name="data", type="Data", top=["data", "label"])
    layer.data_param.source = str(folder)
    layer.data_param.batch_size = 8
    layer.data_param.backend = layer.data_param.LMDB
    built = CaffeNet(build_graph(net, "TEST"))
    try:
        with torch.no_grad():
            for _ in range(3):  # 24 records of 20: past the end and round again
                built.run({})
    finally:
        close_data_layers(built)


@FUZZ
@given(data=st.data())
def test_damaged_lmdbs(lmdb_files, tmp_path, data):
    kind = data.draw(st.sampled_from(sorted(lmdb_files)))
    folder = tmp_path / f"db{next(_folders)}"
    folder.mkdir()
    (folder / "data.mdb").write_bytes(data.draw(damaged(lmdb_files[kind])))
    try:
        with bounded(EXAMPLE_SECONDS):
            read_batches(folder)
    except CaffeCompatError:
        pass
    finally:
        shutil.rmtree(folder)


# ---- solver states

@pytest.fixture(scope="module")
def solver_run(tmp_path_factory):
    """A copy of the solver fixture that snapshots at iteration 2, and that snapshot."""
    folder = tmp_path_factory.mktemp("solver") / "solver"
    shutil.copytree(require(REFERENCE / "nets" / "solver"), folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    solver = folder / "solver.prototxt"
    solver.write_text(solver.read_text().replace("max_iter: 10", "max_iter: 2")
                      .replace("snapshot: 0", 'snapshot: 2 snapshot_prefix: "snaps/run"'))
    previous = os.getcwd()
    os.chdir(folder)  # the solver's paths resolve from the working directory, as in Caffe
    try:
        resume(None, weights="init.caffemodel")
        yield folder, Path("snaps/run_iter_2.solverstate.pt").read_bytes()
    finally:
        os.chdir(previous)


def resume(state: Path, weights=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer("solver.prototxt", weights=weights, resume=state, max_iter=3, stream=io.StringIO()).run()


def key_paths(value, path=()):
    """Every path to a dict entry or list/tuple element of a state, down to the leaves."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield path + (key,)
        yield from key_paths(child, path + (key,))


ODD_VALUES = [None, "x", -1, 2 ** 70, 1.5, True, [], {}, torch.zeros(3), torch.zeros(2, dtype=torch.int64),
              torch.full((2, 2), float("nan")), [torch.zeros(1)], {"cursor": {}, "rng": {}}]


def replaced(state, path, value, delete: bool):
    """A copy of `state` with the entry at `path` set to `value` (or deleted)."""
    state = copy.deepcopy(state)
    *parents, last = path
    holders = [state]
    for key in parents:
        holders.append(holders[-1][key])
    holder = holders[-1]
    mutable = list(holder) if isinstance(holder, tuple) else holder
    if delete:
        del mutable[last]
    else:
        mutable[last] = value
    if isinstance(holder, tuple):  # tuples are rebuilt, from the innermost out
        child = tuple(mutable)
        holders[-2][parents[-1]] = child
    return state


@FUZZ
@given(data=st.data())
def test_damaged_solverstate_files(solver_run, data):
    _, original = solver_run
    target = Path(f"damaged{next(_folders)}.solverstate.pt")
    target.write_bytes(data.draw(damaged(original)))
    try:
        with bounded(EXAMPLE_SECONDS):
            resume(target)
    except CaffeCompatError:
        pass
    finally:
        target.unlink()


@FUZZ
@given(data=st.data())
def test_solverstates_with_damaged_structure(solver_run, data):
    _, original = solver_run
    state = torch.load(io.BytesIO(original), weights_only=True)
    path = data.draw(st.sampled_from(sorted(key_paths(state), key=repr)))
    delete = data.draw(st.booleans())
    value = data.draw(st.sampled_from(ODD_VALUES))
    target = Path(f"damaged{next(_folders)}.solverstate.pt")
    torch.save(replaced(state, path, value, delete), target)
    try:
        with bounded(EXAMPLE_SECONDS):
            resume(target)
    except CaffeCompatError:
        pass
    finally:
        target.unlink()
