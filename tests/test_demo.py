"""`caffe-compat demo`, shortened to a few iterations (the default 500 take about a
minute): the digits in the paper's pair layout, the before/after table, ONNX Runtime,
the figures and the listing, all in --workdir."""
import numpy as np
import pytest

from conftest import DEMO_ITERATIONS, run_cli


def test_demo_trains_evaluates_exports_and_lists(demo_run):
    folder, out = demo_run
    assert "weights identical: True" in out
    assert f"after {DEMO_ITERATIONS} iterations" in out and "random weights" in out
    assert "ONNX Runtime vs PyTorch on 64 unseen images: max abs difference" in out  # ran, not skipped
    for name in ("train_lmdb", "held_out_lmdb", "unseen_lmdb", "lenet_embedder.prototxt", "deploy.prototxt",
                 "solver.prototxt", "init.caffemodel", "trained.caffemodel", "train_log.csv", "embedder.onnx",
                 "results.json", "features_unseen.npz", "figures/training_loss.png", "figures/recall_at_k.png",
                 "figures/retrieval_unseen.png"):
        assert (folder / name).exists(), name
        assert name.split("/")[0] in out.split("what the demo wrote")[1]


def test_training_improves_retrieval_and_clustering_on_unseen_classes(tmp_path):
    """The paper's claim, at the demo's default length (500 iterations: about 35 s of CPU,
    the shortened session fixture is too short to show it): the trained embedder retrieves
    and clusters classes 5-9, never trained on, better than its random initialisation."""
    import json

    pytest.importorskip("sklearn", reason="the demo's digits come with scikit-learn (the test extra)")
    result = run_cli("demo", "--workdir", tmp_path / "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert results["iterations"] == 500
    for split in ("held_out", "unseen"):
        assert after[split]["recall"]["1"] > before[split]["recall"]["1"] + 0.05, split
        assert after[split]["nmi"] > before[split]["nmi"] + 0.1, split


def test_training_lmdb_holds_same_class_pairs(demo_run):
    import lmdb

    from caffe_compat.io.datum import datum_to_array, parse_datum

    folder, _ = demo_run
    with lmdb.open(str(folder / "train_lmdb"), readonly=True, lock=False) as env, env.begin() as txn:
        records = [datum_to_array(parse_datum(value, key.decode()), key.decode()) for key, value in txn.cursor()]
    labels = np.array([label for _, label in records])
    assert len(records) >= 64 * DEMO_ITERATIONS
    assert (labels[0::2] == labels[1::2]).all() and set(labels.tolist()) == {0, 1, 2, 3, 4}
    assert records[0][0].shape == (1, 28, 28) and records[0][0].dtype == np.uint8


def test_splits_keep_unseen_classes_out_of_training():
    pytest.importorskip("sklearn", reason="the test extra installs scikit-learn")
    from caffe_compat.demo.digits import load_splits

    splits = load_splits()
    assert set(splits.labels[splits.train]) == set(splits.labels[splits.held_out]) == {0, 1, 2, 3, 4}
    assert set(splits.labels[splits.unseen]) == {5, 6, 7, 8, 9}
    assert not set(splits.train) & set(splits.held_out)
    assert len(splits.train) + len(splits.held_out) + len(splits.unseen) == len(splits.labels)


def tree(root):
    """Every file and folder under root, files with their bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_caffe_project_folder_is_refused_untouched(tmp_path):
    project = tmp_path / "project"
    (project / "train_lmdb").mkdir(parents=True)
    (project / "train_lmdb" / "data.mdb").write_bytes(b"the project's data")
    (project / "figures").mkdir()
    (project / "figures" / "loss.png").write_bytes(b"a figure")
    for name in ("solver.prototxt", "deploy.prototxt"):
        (project / name).write_text("the project's\n")
    before = tree(project)
    result = run_cli("demo", "--workdir", project, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"caffe-compat: error: --workdir {project}: holds files and no .caffe-compat-demo (not a demo's folder): "
        f"deploy.prototxt, figures, solver.prototxt and 1 more; the demo writes only into a new or empty folder "
        f"or a previous demo's; give another --workdir"]
    assert tree(project) == before


def previous_demo(folder):
    from caffe_compat.demo.run import MARKER

    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / "recall_at_k.png").write_bytes(b"old")
    (folder / "train_lmdb").mkdir()
    (folder / "train_lmdb" / "data.mdb").write_bytes(b"old")
    (folder / "results.json").write_text("{}")
    (folder / ".results.json.caffe-compat-tmp-host-1-0").write_text("a killed write's")
    (folder / "snapshot_iter_7.solverstate.pt").write_bytes(b"an interrupted training's")
    (folder / MARKER).write_text("")


@pytest.mark.parametrize("foreign", ["mine.txt", "figures/mine.png", "train_lmdb/notes.txt"])
def test_a_previous_demos_folder_with_foreign_files_is_refused_untouched(tmp_path, foreign):
    from caffe_compat.demo.run import prepare_workdir
    from caffe_compat.errors import CaffeCompatError

    previous_demo(tmp_path)
    (tmp_path / foreign).write_text("keep me")
    before = tree(tmp_path)
    with pytest.raises(CaffeCompatError, match=f"holds files the demo did not write: {foreign};"):
        prepare_workdir(tmp_path)
    assert tree(tmp_path) == before


def test_new_empty_and_previous_demo_folders_are_accepted(tmp_path):
    from caffe_compat.demo.run import MARKER, prepare_workdir

    previous_demo(tmp_path / "previous")
    (tmp_path / "empty").mkdir()
    for name in ("new/inner", "empty", "previous"):
        assert prepare_workdir(tmp_path / name) == tmp_path / name
        assert [p.name for p in (tmp_path / name).iterdir()] == [MARKER]


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    result = run_cli("demo", "--workdir", tmp_path / "taken", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"caffe-compat: error: --workdir {tmp_path / 'taken'}: is a file, not a folder"
