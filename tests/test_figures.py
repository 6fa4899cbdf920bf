"""Figures: the training log reader (old and new CSV), smoothing, the paper's curve,
the split of retrieval queries into successes and failures."""
import os

import numpy as np
import pytest
from PIL import Image

from caffe_compat.evaluation import figures
from caffe_compat.errors import CaffeCompatError
from conftest import bounded

pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")


def test_reads_the_old_and_the_new_training_log(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("iteration,loss,lr\n0,2.5,0.01\n1,1.5,0.01\n")
    log = figures.read_training_log(old)
    assert log["iteration"].tolist() == [0, 1] and log["loss"].tolist() == [2.5, 1.5] and log["smoothed"] is None
    new = tmp_path / "new.csv"
    new.write_text("iteration,loss,smoothed_loss,lr\n0,2.5,2.5,0.01\n1,1.5,2,0.001\n")
    log = figures.read_training_log(new)
    assert log["smoothed"].tolist() == [2.5, 2.0] and log["lr"].tolist() == [0.01, 0.001]


@pytest.mark.parametrize("text, message", [
    ("iter,loss\n1,2\n", "log.csv: expected a header with iteration, loss and lr"),
    ("iteration,loss,lr\n1,2,0.1\n2,x,0.1\n", "log.csv:3: expected numbers"),
    ("iteration,loss,lr\n1,2\n", "log.csv:2: expected 3 values"),
    ("iteration,loss,lr\n", "log.csv: no rows after the header"),
    ("", "log.csv: expected a header"),
])
def test_bad_training_logs_are_named(tmp_path, text, message):
    log = tmp_path / "log.csv"
    log.write_text(text)
    with pytest.raises(CaffeCompatError, match=message):
        figures.loss_curve(log, tmp_path / "loss.png")


def test_moving_average_is_the_mean_of_the_last_window():
    values = np.array([4.0, 2.0, 6.0, 0.0])
    np.testing.assert_allclose(figures.moving_average(values, 2), [4.0, 3.0, 4.0, 3.0])
    np.testing.assert_allclose(figures.moving_average(values, 10), [4.0, 3.0, 4.0, 3.0])


def test_successes_and_failures_are_split_by_the_first_neighbour():
    labels = np.array([0, 0, 1, 1, 2])
    neighbours = np.array([[1], [4], [3], [0], [2]])  # right for 0 and 2
    successes, failures = figures.split_queries(labels, neighbours, count=5)
    assert successes.tolist() == [0, 2] and failures.tolist() == [1, 3, 4]
    successes, failures = figures.split_queries(labels, neighbours, count=2)
    assert failures.tolist() == [1, 4]  # spread over the failures: first and last


def test_published_curve_names_its_source():
    cub = figures.published_recall("cub")
    assert set(cub["recall"]) == {"1", "2", "4", "8"} and "CVPR 2016" in cub["source"]
    assert set(figures.published_recall("sop")["recall"]) == {"1", "10", "100", "1000"}
    with pytest.raises(CaffeCompatError, match="the paper reports cub, cars and sop"):
        figures.published_recall("mnist")


def test_figures_are_drawn(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("iteration,loss,lr\n" + "".join(f"{i},{3 / (i + 1)},{0.01 if i < 50 else 0.001}\n"
                                                   for i in range(100)))
    figures.loss_curve(log, tmp_path / "loss.png", title="a run")
    figures.recall_curve({"before": {"1": 0.5, "2": 0.6}, "after": {"1": 0.7, "2": 0.8}}, tmp_path / "recall.png",
                         paired=True, published={"paper": figures.published_recall("cub")})
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    x = rng.standard_normal((20, 3)).astype(np.float32) + labels[:, None]
    images = [np.full((8, 8), 10 * i, np.uint8) for i in range(20)]
    shown = figures.retrieval_figure(x, labels, images, tmp_path / "retrieval.png", k=3, rows=2)
    assert shown["successes"] == 2 and 0 < shown["failures"] <= 2
    for name in ("loss.png", "recall.png", "retrieval.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 300 and image.height > 200


def test_retrieval_figure_names_missing_images(tmp_path):
    x = np.arange(4, dtype=np.float32)[:, None]
    with pytest.raises(CaffeCompatError, match="gone.png: image not found"):
        figures.retrieval_figure(x, [1, 1, 2, 2], [tmp_path / "gone.png"] * 4, tmp_path / "g.png", k=1)
    os.mkfifo(tmp_path / "fifo.png")
    with bounded(30), pytest.raises(CaffeCompatError, match=r"fifo.png: not a readable image .*: not a regular file "
                                                            r"\(a FIFO\)"):
        figures.retrieval_figure(x, [1, 1, 2, 2], [tmp_path / "fifo.png"] * 4, tmp_path / "g.png", k=1)
    with pytest.raises(CaffeCompatError, match="images: 3 images for 4 embeddings"):
        figures.retrieval_figure(x, [1, 1, 2, 2], [tmp_path / "gone.png"] * 3, tmp_path / "g.png", k=1)


def test_recall_axis_shows_every_line_the_published_one_included(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: saved.append(figure))
    paper = figures.published_recall("cub")
    figures.recall_curve({"ours": {"1": 0.8, "2": 0.9}}, tmp_path / "recall.png", published={"paper": paper})
    (figure,) = saved
    bottom, _ = figure.axes[0].get_ylim()
    assert bottom < 100 * min(paper["recall"].values())


def test_learning_rate_ticks_stay_apart_however_slowly_it_decays():
    from caffe_compat.evaluation.figures import distinct_labels

    assert distinct_labels([0.001, 0.0009995, 0.000999]) == ["0.001", "0.0009995", "0.000999"]
    assert distinct_labels([0.01, 0.005, 0.0025]) == ["0.01", "0.005", "0.0025"]
