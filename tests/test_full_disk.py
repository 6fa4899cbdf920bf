"""A full disk ends every writer in one line naming its output and "no space left on
device", exit 2, the previous outputs intact and nothing partial left: convert -o .pt,
the solver state of a snapshot, extract -o, evaluate --figure-dir, prepare (list and
LMDB) and the demo's LMDB writer, each on a small tmpfs filled up first."""
import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest

from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io import atomic
from conftest import REFERENCE, require
from test_datasets import make_cub

lmdb = pytest.importorskip("lmdb", reason="lmdb is in the test extra")

NO_SPACE = "cannot be written (no space left on device)"
# LMDB maps its lock file and writes it through memory: on a tmpfs with no page left that
# is SIGBUS, not an error, so the LMDB tests leave it room and fill the rest with records.
LMDB_LOCK_ROOM = 64 << 10


@pytest.fixture
def disk(tmp_path):
    """An 8 MiB tmpfs (the tests run as root), bigger than what io/atomic.py calls full."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"a full disk is a tmpfs mount, which is not permitted here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk, leave: int = 0) -> dict:
    """Fill `disk` with a file until `leave` bytes are free; what the disk then holds."""
    stats = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        handle.write(bytes(stats.f_bavail * stats.f_frsize - leave))
    return contents(disk)


def contents(root) -> dict:
    """Every file and folder under root, files with their bytes' sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def run(capsys, *args):
    """`caffe-compat ARGS` in this process: (exit code, stderr lines other than progress)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if not line.startswith(("prepare ", "extract: "))]


def assert_refused(capsys, before, disk, output, *args):
    code, err = run(capsys, *args)
    assert code == 2 and err == [f"caffe-compat: error: {output}: {NO_SPACE}"], err
    assert contents(disk) == before


def test_convert_to_pt(disk, capsys):
    folder = require(REFERENCE / "layers")
    net, weights = folder / "conv_basic.prototxt", folder / "conv_basic.caffemodel"
    out = disk / "model.pt"
    assert run(capsys, "convert", net, weights, "-o", out)[0] == 0
    out.write_bytes(out.read_bytes()[:100])  # the previous output, smaller than a new one
    before = fill(disk, leave=100)
    assert_refused(capsys, before, disk, out, "convert", net, weights, "-o", out)


def test_solver_state_of_a_snapshot(disk, tmp_path, capsys, monkeypatch):
    solver = tmp_path / "solver"
    shutil.copytree(require(REFERENCE / "nets" / "solver"), solver)
    monkeypatch.chdir(solver)
    text = (solver / "solver.prototxt").read_text()
    (solver / "solver.prototxt").write_text(text.replace("snapshot: 0", f'snapshot: 2 snapshot_prefix: "{disk}/run"')
                                            .replace("max_iter: 10", "max_iter: 2"))
    (disk / "run_iter_2.solverstate.pt").write_bytes(b"an earlier run's state")
    # Room for the snapshot's caffemodel (7 kB), not for its solver state.
    before = fill(disk, leave=12 << 10)
    code, err = run(capsys, "train", "solver.prototxt", "--weights", "init.caffemodel")
    assert code == 2 and err == [f"caffe-compat: error: {disk}/run_iter_2.solverstate.pt: {NO_SPACE}"], err
    after = contents(disk)
    assert after.pop("run_iter_2.caffemodel") and after == before


def test_extract(disk, tmp_path, capsys):
    from test_extract import _test_phase_net

    net = _test_phase_net(tmp_path, batch_size=32)
    out = disk / "features.npz"
    out.write_bytes(b"previous features")
    before = fill(disk)
    assert_refused(capsys, before, disk, out, "extract", net, REFERENCE / "nets" / "solver" / "final.caffemodel",
                   "--data", REFERENCE / "nets" / "solver" / "train_lmdb", "-o", out)


def test_evaluate_figures(disk, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the plots extra)")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", embeddings=rng.normal(size=(40, 4)).astype(np.float32),
             labels=np.repeat(np.arange(4), 10))
    figures = disk / "figures"
    figures.mkdir()
    (figures / "recall_at_k.png").write_bytes(b"previous figure")
    before = fill(disk, leave=4 << 10)
    assert_refused(capsys, before, disk, figures / "recall_at_k.png",
                   "evaluate", tmp_path / "f.npz", "--figure-dir", figures)


@pytest.mark.parametrize("fmt, leave", [("list", 0), ("lmdb", LMDB_LOCK_ROOM)])
def test_prepare(disk, tmp_path, capsys, fmt, leave):
    make_cub(tmp_path / "src")
    (disk / "earlier").mkdir()
    (disk / "earlier" / "train.txt").write_text("a previous preparation\n")
    before = fill(disk, leave)
    assert_refused(capsys, before, disk, disk / "out",
                   "prepare", "cub", "--source", tmp_path / "src", "-o", disk / "out", "--format", fmt)


def test_the_demos_lmdb_writer(disk):
    from caffe_compat.io.datum import write_datum_lmdb

    (disk / "held_out_lmdb").mkdir()
    (disk / "held_out_lmdb" / "data.mdb").write_bytes(b"another LMDB")
    before = fill(disk, leave=LMDB_LOCK_ROOM)
    records = ((np.full((1, 28, 28), i % 256, np.uint8), i % 5) for i in range(1000))  # 800 kB
    with pytest.raises(CaffeCompatError) as err:
        write_datum_lmdb(disk / "train_lmdb", records, commit_every=100)
    assert str(err.value) == f"{disk / 'train_lmdb'}: {NO_SPACE}"
    assert contents(disk) == before


def test_a_fault_that_no_failure_to_write_explains_is_not_disguised(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(KeyError, match="a bug"):
        with atomic.atomic_path(target):
            raise KeyError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        with atomic.atomic_folder(tmp_path / "folder"):
            raise RuntimeError("a bug")
    assert list(tmp_path.iterdir()) == []
