"""Features files, the metrics table, figures and the `evaluate` command's one entry point."""
import builtins
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from caffe_compat.evaluation import evaluate as ev
from caffe_compat.errors import CaffeCompatError
from conftest import REFERENCE, require

FIXTURE = REFERENCE / "eval" / "metrics_n400.npz"


def features(tmp_path, name="f.npz", **arrays):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6) * 5 + 3, 5)
    base = {"embeddings": (rng.standard_normal((30, 4)) + labels[:, None]).astype(np.float32), "labels": labels}
    base.update(arrays)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def test_load_features_reads_optional_keys(tmp_path):
    paths = np.array([f"img/{i}.png" for i in range(30)])
    loaded = ev.load_features(features(tmp_path, paths=paths, assignments=np.arange(30) % 6))
    assert loaded.embeddings.dtype == np.float32 and loaded.embeddings.shape == (30, 4)
    assert loaded.paths[3] == "img/3.png" and loaded.assignments.shape == (30,)
    assert ev.load_features(features(tmp_path, name="g.npz")).paths is None


@pytest.mark.parametrize("arrays, message", [
    ({"labels": None}, r"f.npz: missing key 'labels' \(keys present: embeddings\)"),
    ({"embeddings": None}, "f.npz: missing key 'embeddings'"),
    ({"labels": np.arange(29)}, "f.npz: labels: 29 labels for 30 rows"),
    ({"embeddings": np.full((30, 4), np.nan, np.float32)}, "f.npz: embeddings: row 0 contains NaN"),
    ({"paths": np.array(["a"] * 29)}, "f.npz: 'paths' must be 30 strings"),
    ({"assignments": np.zeros((30, 2))}, "f.npz: 'assignments' must hold 30 cluster ids"),
    ({"paths": np.array([{"a": 1}] * 30, dtype=object)}, "f.npz: key 'paths' cannot be read without pickle"),
])
def test_bad_features_files_are_named(tmp_path, arrays, message):
    with pytest.raises(CaffeCompatError, match=message):
        ev.load_features(features(tmp_path, **arrays))


def test_missing_or_foreign_features_file(tmp_path):
    with pytest.raises(CaffeCompatError, match="nope.npz: features file not found"):
        ev.load_features(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CaffeCompatError, match="text.npz: not a readable .npz archive"):
        ev.load_features(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(CaffeCompatError, match="single.npy: expected an .npz archive"):
        ev.load_features(tmp_path / "single.npy")


def test_format_table():
    table = ev.format_table({"recall": {"1": 0.8275, "2": 0.8925}, "nmi": 0.8066, "f1": 0.6309, "ri": 0.979,
                             "n": 400, "classes": 38})
    assert table.splitlines() == ["metric         %", "Recall@1   82.75", "Recall@2   89.25", "NMI        80.66",
                                  "F1         63.09", "RI         97.90", "400 items, 38 classes"]


def test_run_evaluate_on_the_fixture_writes_json(tmp_path):
    fixture = np.load(require(FIXTURE))
    path = tmp_path / "fixture.npz"
    np.savez(path, embeddings=fixture["embeddings"], labels=fixture["labels"], assignments=fixture["assignments"])
    result = ev.run_evaluate(path, fixture["recall_k"], use_assignments=True, json_path=tmp_path / "out" / "m.json",
                             figure_dir=None, device="cpu")
    assert json.loads((tmp_path / "out" / "m.json").read_text()) == result
    np.testing.assert_allclose(list(result["recall"].values()), fixture["recall"], atol=1e-9)
    for key in ("nmi", "ri", "f1"):
        assert abs(result[key] - float(fixture[key])) < 1e-9
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.json"]  # no temporary left behind


def test_run_evaluate_runs_kmeans_by_default(tmp_path):
    result = ev.run_evaluate(features(tmp_path, assignments=np.zeros(30, int)), [1, 4])
    assert list(result["recall"]) == ["1", "4"] and result["classes"] == 6
    assert result["nmi"] > 0.5  # k-means, not the single cluster stored in the file


def test_use_assignments_needs_them(tmp_path):
    with pytest.raises(CaffeCompatError, match="f.npz: missing key 'assignments'"):
        ev.run_evaluate(features(tmp_path), use_assignments=True)


def test_figures_need_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(CaffeCompatError, match="figures need matplotlib"):
        ev.run_evaluate(features(tmp_path), figure_dir=tmp_path / "figs")


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    for i in range(30):
        Image.new("RGB", (12, 9), (8 * i, 0, 0)).save(tmp_path / f"{i}.png")
    path = features(tmp_path, paths=np.array([f"{i}.png" for i in range(30)]))
    log = tmp_path / "log.csv"
    log.write_text("iteration,loss,lr\n" + "".join(f"{i},{3 / (i + 1)},{0.01 if i < 5 else 0.001}\n" for i in range(10)))
    ev.run_evaluate(path, [1, 2, 4], figure_dir=tmp_path / "figs", train_log=log, dataset="cub")
    for name in (ev.RECALL_FIGURE, ev.RETRIEVAL_FIGURE, ev.LOSS_FIGURE):
        with Image.open(tmp_path / "figs" / name) as image:
            assert image.width > 100 and image.height > 100


def test_no_retrieval_figure_without_image_paths_says_why(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    with pytest.warns(UserWarning, match=r"no image paths \('paths' key\), so no retrieval.png"):
        ev.run_evaluate(features(tmp_path), [1], figure_dir=tmp_path / "figs")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [ev.RECALL_FIGURE]


def test_paper_curve_needs_a_paper_dataset(tmp_path):
    with pytest.raises(CaffeCompatError, match="dataset 'mnist': the paper reports cub, cars and sop"):
        ev.run_evaluate(features(tmp_path), figure_dir=tmp_path / "figs", dataset="mnist")


def _valid_npz_bytes(tmp_path):
    path = features(tmp_path, paths=np.array([f"{i}.png" for i in range(30)]), assignments=np.arange(30) % 6)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_features_files_give_a_result_or_a_clean_error(tmp_path, data):
    original = _valid_npz_bytes(tmp_path)
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]), label="kind")
        where = data.draw(st.integers(0, len(mutated) - 1), label="where")
        if kind == "flip":
            mutated[where] ^= data.draw(st.integers(1, 255), label="bits")
        elif kind == "truncate":
            del mutated[where:]
        else:
            mutated[where:where] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        if not mutated:
            break
    path = tmp_path / "mutated.npz"
    path.write_bytes(bytes(mutated))
    try:
        loaded = ev.load_features(path)
    except CaffeCompatError:
        return
    assert loaded.embeddings.dtype == np.float32 and len(loaded.labels) == len(loaded.embeddings)


def test_paper_curve_option_needs_a_figure_dir(tmp_path, capsys):
    from caffe_compat.cli.main import main

    assert main(["evaluate", str(features(tmp_path)), "--dataset", "cub"]) == 2
    assert "--dataset draws the paper's curve in a figure: give --figure-dir too" in capsys.readouterr().err
