"""The paper's protocol end to end on a tiny archive in CUB-200-2011's layout, from
GoogLeNet weights (the reference fixture's random BVLC GoogLeNet stands in for
ImageNet's): inputs checked first, an estimate, then prepare, fine-tune, extract,
evaluate, compare with the paper."""
import numpy as np
import pytest
import torch
from PIL import Image

from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError
from caffe_compat.evaluation.published import PUBLISHED
from caffe_compat.evaluation.reproduce import estimate_text, reproduce
from conftest import REFERENCE, require


def make_cub(root, classes, per_class):
    cub = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    lines, labels = [], []
    image_id = 0
    for c in classes:
        for i in range(per_class):
            image_id += 1
            name = f"{c:03d}.bird/{i}.jpg"
            (cub / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(rng.normal(c % 200, 20, (60, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(cub / "images" / name)
            lines.append(f"{image_id} {name}\n")
            labels.append(f"{image_id} {c}\n")
    (cub / "images.txt").write_text("".join(lines))
    (cub / "image_class_labels.txt").write_text("".join(labels))
    return root


def test_reproduce_cub_layout_in_a_relative_workdir(tmp_path, capsys, monkeypatch):
    weights = require(REFERENCE / "nets" / "googlenet_deploy.caffemodel")
    make_cub(tmp_path / "archive", classes=[1, 2, 101, 102, 103], per_class=4)
    monkeypatch.chdir(tmp_path)  # relative --source and --workdir, as users type them
    result = reproduce("cub", "archive", weights, "work", embedding=64, max_iter=1, batch_size=4,
                       extract_batch_size=5, timing_images=2)
    assert result["n"] == 12 and result["classes"] == 3  # classes 101-200 are the test split
    assert set(result["recall"]) == {"1", "2", "4", "8"}
    features = np.load(tmp_path / "work" / "features.npz")
    assert features["embeddings"].shape == (12, 64) and np.isfinite(features["embeddings"]).all()
    assert sorted(set(features["labels"].tolist())) == [101, 102, 103]
    # Image paths resolve from the npz's folder, as evaluate reads them.
    assert all((tmp_path / "work" / p).is_file() for p in features["paths"].tolist())
    assert features["paths"][0].startswith("data/images/")
    assert (tmp_path / "work" / "cub_embed64.caffemodel").exists()
    log = (tmp_path / "work" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("iteration,loss") and len(log) == 2
    printed = capsys.readouterr().out
    assert f"{PUBLISHED['cub']['recall'][0]:.1f}" in printed and "R@8" in printed
    # Checks and the estimate come before any stage; the stages in order.
    marks = [printed.index(m) for m in ("checked: cub archive (train 8 images / 2 classes, test 12 images",
                                        "estimate: about", "[1/4] prepare", "[2/4] train", "[3/4] extract",
                                        "[4/4] evaluate")]
    assert marks == sorted(marks)

    assert main(["evaluate", "work/features.npz", "--figure-dir", "figures"]) == 0
    assert any((tmp_path / "figures").iterdir())

    # A rerun finds the finished preparation and reuses it (here it stops at the weights).
    with pytest.raises(CaffeCompatError, match="shares no layer"):
        reproduce("cub", "archive", REFERENCE / "layers" / "conv_basic.caffemodel", "work", max_iter=1,
                  batch_size=4)


def test_inputs_are_checked_before_anything_is_written(tmp_path):
    weights = require(REFERENCE / "nets" / "googlenet_deploy.caffemodel")
    archive = make_cub(tmp_path / "archive", classes=[1, 101], per_class=2)
    (tmp_path / "file").write_text("x")
    conv = REFERENCE / "layers" / "conv_basic.caffemodel"
    cases = [
        (dict(weights=conv), "conv_basic.caffemodel: shares no layer"),
        (dict(weights=tmp_path / "none.caffemodel"), "none.caffemodel"),
        (dict(workdir=tmp_path / "file"), "--workdir is a file"),
        (dict(source=tmp_path / "nowhere"), "dataset folder not found"),
        (dict(batch_size=3), "must be positive and even"),
        (dict(max_iter=0), "must be positive"),
        (dict(device="tpu"), "not a device"),
        (dict(mean_file=tmp_path / "mean.binaryproto"), "no such mean file"),
    ]
    for change, needle in cases:
        args = {**dict(dataset="cub", source=archive, weights=weights, workdir=tmp_path / "work", max_iter=1,
                       batch_size=4), **change}
        with pytest.raises(CaffeCompatError, match=needle.replace("(", r"\(")):
            reproduce(**args)
        assert not (tmp_path / "work").exists(), change
    (archive / "CUB_200_2011" / "images" / "101.bird" / "1.jpg").unlink()
    with pytest.raises(CaffeCompatError, match="1.jpg: image listed in the archive's index is missing"):
        reproduce("cub", archive, weights, tmp_path / "work", max_iter=1, batch_size=4)
    assert not (tmp_path / "work").exists()


def test_estimate_of_the_default_run_on_a_cpu():
    # 0.196 s per image forward+backward (GoogLeNet at 227 px on 2 loaded cores).
    text = estimate_text({"train": 0.196, "forward": 0.06}, torch.device("cpu"), 20000, 128, 5924, 8)
    assert text.startswith("estimate: about 139.5 h on cpu: training 20000 iterations x 128 images")
    assert "measured here on 8 images" in text
    assert "--device cuda" in text and "--max-iter" in text
    short = estimate_text({"train": 0.004, "forward": 0.001}, torch.device("cuda"), 100, 128, 5924)
    assert "about 57 s" in short and "--device cuda" not in short


def test_resume_point_is_the_latest_state_of_an_unfinished_run(tmp_path):
    from caffe_compat.evaluation.reproduce import resume_point

    final = tmp_path / "cub_embed64.caffemodel"
    assert resume_point(tmp_path, final) is None
    for name in ("snapshot_iter_500.solverstate.pt", "snapshot_iter_1500.solverstate.pt",
                 "snapshot_iter_1500.caffemodel", "snapshot_iter_x.solverstate.pt"):
        (tmp_path / name).write_text("")
    assert resume_point(tmp_path, final) == tmp_path / "snapshot_iter_1500.solverstate.pt"
    final.write_text("")  # the run that wrote the final weights finished: start afresh
    assert resume_point(tmp_path, final) is None


def test_a_stopped_training_says_so_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    import signal

    from caffe_compat.evaluation import reproduce as module
    from caffe_compat.solver import TrainResult

    weights = require(REFERENCE / "nets" / "googlenet_deploy.caffemodel")
    archive = make_cub(tmp_path / "archive", classes=[1, 101], per_class=2)
    calls = []

    def stopped(solver, **options):
        calls.append(options)
        state = tmp_path / "work" / "snapshot_iter_7.solverstate.pt"
        state.write_text("")
        return TrainResult(7, 1.0, True, [state], signal.SIGINT)

    monkeypatch.setattr(module, "train", stopped)
    monkeypatch.setattr(module, "_seconds_per_image", lambda *_: {"train": 1.0, "forward": 0.5})  # not timed here
    for _ in range(2):
        result = module.reproduce("cub", archive, weights, tmp_path / "work", max_iter=10, batch_size=4,
                                  timing_images=1)
        assert result == {"stopped_early": True, "stop_signal": signal.SIGINT, "iterations": 7}
    printed = capsys.readouterr().out
    assert "stopped at iteration 7; snapshot" in printed and "the same command continues" in printed
    assert "[3/4] extract" not in printed and "resuming from" in printed
    assert calls[0]["resume"] is None and calls[0]["weights"] == weights
    assert calls[1]["resume"] == tmp_path / "work" / "snapshot_iter_7.solverstate.pt" and calls[1]["weights"] is None
