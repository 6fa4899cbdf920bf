"""Issue 17: no output lands on a file the run reads (the solver's nets, their data, the
weights, the images of a list), whatever the spelling of its path, and no output replaces
a device node; /dev/null takes an output by being written through."""
import os
import shutil
import stat
from pathlib import Path

import pytest

from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io import atomic
from caffe_compat.io.run_inputs import RunInputs
from conftest import REFERENCE, require

SOLVER = REFERENCE / "nets" / "solver"


@pytest.fixture
def solver_dir(tmp_path, monkeypatch):
    """A writable copy of the solver fixture, as the working directory."""
    target = tmp_path / "solver"
    shutil.copytree(require(SOLVER), target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(target)
    return target


def contents(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what a refused run must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv) -> str:
    """Run `caffe-compat ARGV`, expect exit 2 with one error line; that line."""
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def test_train_output_over_the_net_is_refused(solver_dir, capsys):
    before = contents(solver_dir)
    line = refused(capsys, ["train", "solver.prototxt", "--output", "train.prototxt"])
    assert line == ("caffe-compat: error: output train.prototxt: is the input train.prototxt (the train net); "
                    "write to another path")
    assert contents(solver_dir) == before


def test_train_log_over_the_training_lmdb_is_refused(solver_dir, capsys):
    before = contents(solver_dir)
    line = refused(capsys, ["train", "solver.prototxt", "--log", "train_lmdb/data.mdb"])
    assert ("output train_lmdb/data.mdb: is the input train_lmdb/data.mdb (in the training LMDB of layer 'data' "
            "in train.prototxt)") in line
    line = refused(capsys, ["train", "solver.prototxt", "--log", "train_lmdb/log.csv"])
    assert "output train_lmdb/log.csv: is inside the input train_lmdb (the training LMDB of layer 'data'" in line
    assert contents(solver_dir) == before


def test_an_hdf5_output_layer_over_the_training_lmdb_is_refused(solver_dir, capsys):
    with open(solver_dir / "train.prototxt", "a") as net:
        net.write('layer { name: "dump" type: "HDF5Output" bottom: "fc_embedding" bottom: "label" '
                  'hdf5_output_param { file_name: "train_lmdb/data.mdb" } include { phase: TRAIN } }\n')
    before = contents(solver_dir)
    line = refused(capsys, ["train", "solver.prototxt"])
    assert ("output train_lmdb/data.mdb (hdf5_output_param.file_name of layer 'dump' in train.prototxt): is the "
            "input train_lmdb/data.mdb (in the training LMDB of layer 'data' in train.prototxt)") in line, line
    assert contents(solver_dir) == before


def test_symlinks_and_hard_links_do_not_dodge_the_check(solver_dir, capsys):
    before = contents(solver_dir)
    (solver_dir.parent / "alias").symlink_to(solver_dir)
    line = refused(capsys, ["train", "solver.prototxt", "--output", solver_dir.parent / "alias" / "train.prototxt"])
    assert "is the input train.prototxt (the train net)" in line
    os.link(solver_dir / "train_lmdb" / "data.mdb", solver_dir.parent / "log.csv")
    line = refused(capsys, ["train", "solver.prototxt", "--log", solver_dir.parent / "log.csv"])
    assert "is the input train_lmdb/data.mdb (in the training LMDB" in line
    assert contents(solver_dir) == before


@pytest.mark.parametrize("prefix, needle", [
    ("train_lmdb/snap", "is inside the input train_lmdb (the training LMDB of layer 'data'"),
    ("train_lmdb", "is inside the input train_lmdb"),  # a folder: train_lmdb/solver_iter_N
    ("init", "_iter_5.caffemodel (a snapshot of snapshot_prefix 'init' in solver.prototxt): is the input "
             "init_iter_5.caffemodel (the weights)"),
])
def test_snapshots_never_land_on_an_input(solver_dir, capsys, prefix, needle):
    edit(solver_dir / "solver.prototxt", "snapshot: 0", f'snapshot: 5 snapshot_prefix: "{prefix}"')
    (solver_dir / "init.caffemodel").rename(solver_dir / "init_iter_5.caffemodel")
    before = contents(solver_dir)
    line = refused(capsys, ["train", "solver.prototxt", "--weights", "init_iter_5.caffemodel"])
    assert needle in line, line
    assert contents(solver_dir) == before


def test_a_snapshot_already_there_as_a_hard_link_of_the_net_is_refused(solver_dir, capsys):
    """Snapshots of a stopped run can land on any iteration: each existing one is checked."""
    os.link(solver_dir / "train.prototxt", solver_dir / "solver_iter_7.solverstate.pt")
    before = contents(solver_dir)
    line = refused(capsys, ["train", "solver.prototxt", "--weights", "init.caffemodel"])
    assert "output solver_iter_7.solverstate.pt (a snapshot of snapshot_prefix 'solver'" in line
    assert "is the input train.prototxt (the train net)" in line
    assert contents(solver_dir) == before


def test_extract_into_the_lmdb_it_reads_is_refused(tmp_path, capsys):
    lmdb_folder = tmp_path / "lmdb"
    shutil.copytree(require(SOLVER / "train_lmdb"), lmdb_folder)
    before = contents(lmdb_folder)
    for output, relation in [(lmdb_folder / "data.mdb", "is the input"),
                             (lmdb_folder / "f.npz", "is inside the input")]:
        line = refused(capsys, ["extract", SOLVER / "train.prototxt", SOLVER / "final.caffemodel",
                                "--data", lmdb_folder, "-o", output])
        assert f"output {output}: {relation} {lmdb_folder}" in line, line
    assert contents(lmdb_folder) == before


def test_extract_over_an_image_of_its_list_is_refused(tmp_path, capsys):
    """The images a list names are inputs too, through a hard link as well."""
    net = tmp_path / "extract.prototxt"
    net.write_text((SOLVER / "train.prototxt").read_text().replace("phase: TRAIN", "phase: TEST"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.png").write_bytes(b"an image")
    (tmp_path / "list.txt").write_text("imgs/0.png 3\n")
    os.link(tmp_path / "imgs" / "0.png", tmp_path / "linked.npz")
    for output in (tmp_path / "imgs" / "0.png", tmp_path / "linked.npz"):
        line = refused(capsys, ["extract", net, SOLVER / "final.caffemodel", "--data", tmp_path / "list.txt",
                                "-o", output])
        assert f"is the input {tmp_path}/imgs/0.png (an image of test layer 'data' in {net})" in line, line
    assert (tmp_path / "imgs" / "0.png").read_bytes() == b"an image"


def _special_nodes(tmp_path) -> list:
    """A FIFO, and where mknod is permitted (root), a character device like /dev/zero."""
    os.mkfifo(tmp_path / "fifo")
    nodes = [(tmp_path / "fifo", "a FIFO")]
    try:
        os.mknod(tmp_path / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        nodes.append((tmp_path / "zero", "a character device"))
    except PermissionError:
        pass  # not root: the FIFO stands for every node that is not a regular file
    return nodes


@pytest.mark.parametrize("verb", ["convert", "export-onnx", "extract", "train", "evaluate"])
def test_an_output_that_is_a_device_node_is_refused_and_kept(tmp_path, capsys, verb):
    for node, kind in _special_nodes(tmp_path):
        argv = {"convert": ["convert", "net.prototxt", "w.caffemodel", "-o", node],
                "export-onnx": ["export-onnx", "net.prototxt", "w.caffemodel", "-o", node],
                "extract": ["extract", "net.prototxt", "w.caffemodel", "--data", "lmdb", "-o", node],
                "train": ["train", "solver.prototxt", "--log", node],
                "evaluate": ["evaluate", "f.npz", "--json", node]}[verb]
        line = refused(capsys, argv)
        assert line == (f"caffe-compat: error: output {node}: is {kind}, not a regular file; write to a file path "
                        f"(or {os.devnull} to discard the output)")
        assert not stat.S_ISREG(os.lstat(node).st_mode)


def null_node(tmp_path) -> Path:
    """A node with the null device's numbers in tmp_path: what /dev/null is, without risking
    the machine's own /dev/null should the code under test ever rename over it."""
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.stat(os.devnull).st_rdev)
    except PermissionError:
        pytest.skip("mknod needs root (CAP_MKNOD): a copy of the null device cannot be made here")
    return tmp_path / "null"


def test_atomic_path_refuses_a_node_and_writes_through_the_null_device(tmp_path):
    """The last line of defence, under every writer: a node is never renamed over, and the
    null device is written through without a temporary beside it."""
    nodes = _special_nodes(tmp_path)
    for node, kind in nodes:
        with pytest.raises(CaffeCompatError, match=f"^{node}: is {kind}, not a regular file"):
            atomic.write_text(node, "x")
        assert not stat.S_ISREG(os.lstat(node).st_mode)
    assert sorted(tmp_path.iterdir()) == sorted(node for node, _ in nodes)
    null = null_node(tmp_path)
    atomic.write_text(null, "discarded")
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert sorted(tmp_path.iterdir()) == sorted([null] + [node for node, _ in nodes])


def test_train_writes_its_log_and_weights_through_the_null_device(solver_dir, capsys):
    null = null_node(solver_dir.parent)
    edit(solver_dir / "solver.prototxt", "max_iter: 10", "max_iter: 2")
    before = sorted(solver_dir.parent.iterdir())
    assert main(["train", "solver.prototxt", "--weights", "init.caffemodel", "--output", str(null),
                 "--log", str(null)]) == 0
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert f"wrote {null}" in capsys.readouterr().out
    assert sorted(solver_dir.parent.iterdir()) == before  # no temporary, no probe left beside it


def test_an_output_beside_its_inputs_is_accepted(tmp_path):
    """Outputs next to the inputs, or in the images' folder, are fine: only the files themselves count."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "list.txt").write_text("imgs/0.png 3\n")
    inputs = RunInputs()
    inputs.add(tmp_path / "list.txt", "the list")
    inputs.add_image_list(str(tmp_path / "list.txt"), f"{tmp_path}/", "layer 'data'")
    inputs.add("a\0b", "a source a prototxt spelt with a NUL: it names no file")
    inputs.check_output(tmp_path / "features.npz")
    inputs.check_output(tmp_path / "imgs" / "features.npz")
    with pytest.raises(CaffeCompatError, match="is the input"):
        inputs.check_output(tmp_path / "imgs" / "0.png")


def test_figures_never_replace_the_images_or_log_they_draw(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the all extra)")
    import numpy as np

    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "retrieval.png").write_bytes(b"an image the features list")
    np.savez(tmp_path / "f.npz", embeddings=np.eye(4, dtype=np.float32), labels=np.array([0, 0, 1, 1]),
             paths=np.array(["figures/retrieval.png", "b.png", "c.png", "d.png"]))
    line = refused(capsys, ["evaluate", tmp_path / "f.npz", "--figure-dir", figures])
    assert (f"output {figures}/retrieval.png: is the input {tmp_path}/figures/retrieval.png (an image listed in "
            f"{tmp_path}/f.npz)") in line, line
    assert (figures / "retrieval.png").read_bytes() == b"an image the features list"
    np.savez(tmp_path / "f.npz", embeddings=np.eye(4, dtype=np.float32), labels=np.array([0, 0, 1, 1]))
    (figures / "training_loss.png").write_text("iteration,loss,lr,smoothed_loss\n")
    line = refused(capsys, ["evaluate", tmp_path / "f.npz", "--figure-dir", figures,
                            "--train-log", figures / "training_loss.png"])
    assert "training_loss.png: is the input" in line and "(the training log)" in line, line
    assert (figures / "training_loss.png").read_text() == "iteration,loss,lr,smoothed_loss\n"
