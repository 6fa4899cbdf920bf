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
    from caffe_compat.demo_digits import load_splits

    splits = load_splits()
    assert set(splits.labels[splits.train]) == set(splits.labels[splits.held_out]) == {0, 1, 2, 3, 4}
    assert set(splits.labels[splits.unseen]) == {5, 6, 7, 8, 9}
    assert not set(splits.train) & set(splits.held_out)
    assert len(splits.train) + len(splits.held_out) + len(splits.unseen) == len(splits.labels)


def test_a_rerun_replaces_its_own_files_only(tmp_path):
    from caffe_compat.demo import OUTPUTS, prepare_workdir

    (tmp_path / "train_lmdb").mkdir()
    (tmp_path / "train_lmdb" / "data.mdb").write_bytes(b"old")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("keep me")
    assert prepare_workdir(tmp_path) == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    assert {"train_lmdb", "results.json", "figures"} <= set(OUTPUTS)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    result = run_cli("demo", "--workdir", tmp_path / "taken", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"caffe-compat: error: --workdir {tmp_path / 'taken'}: is a file, not a folder"
