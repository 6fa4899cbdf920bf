"""`prepare` writes only under -o, never into the archive, and never leaves half an output:
hostile index entries, bad output folders, a kill -9 in the middle, progress lines."""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from caffe_compat.evaluation import datasets
from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError
from conftest import run_cli
from test_datasets import make_cars, make_cub, make_sop, write_mat


def tree_digest(root):
    """Every file under root with its bytes' sha256: any write shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_written(tmp_path, before):
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.caffe-compat-tmp-*")), "a staging folder was left"
    assert tree_digest(tmp_path / "src") == before


def cub_with_entry(tmp_path, entry):
    make_cub(tmp_path / "src")
    index = tmp_path / "src" / "CUB_200_2011" / "images.txt"
    lines = index.read_text().splitlines()
    lines[3] = f"4 {entry}"
    index.write_text("\n".join(lines) + "\n")
    return index


@pytest.mark.parametrize("kind", ["climbing", "absolute", "climbing after a folder"])
def test_cub_entry_outside_the_archive_is_refused_before_writing(tmp_path, kind):
    make_cub(tmp_path / "src")
    own_image = tmp_path / "src" / "CUB_200_2011" / "images" / "001.Black_footed_Albatross" / "a_1.jpg"
    entry = {"climbing": "../../x.jpg", "absolute": str(own_image),
             "climbing after a folder": "101.White_Pelican/../../../../x.jpg"}[kind]
    index = cub_with_entry(tmp_path, entry)
    before = tree_digest(tmp_path / "src")
    with pytest.raises(CaffeCompatError) as err:
        datasets.prepare("cub", tmp_path / "src", tmp_path / "out")
    assert f"{index}:4" in str(err.value) and repr(entry) in str(err.value)
    assert_nothing_written(tmp_path, before)
    assert not (tmp_path / "x.jpg").exists() and not (tmp_path.parent / "x.jpg").exists()


def test_entry_that_stays_inside_is_normalised(tmp_path):
    cub_with_entry(tmp_path, "101.White_Pelican/./sub/../c_1.jpg")
    datasets.prepare("cub", tmp_path / "src", tmp_path / "out")
    assert "images/101.White_Pelican/c_1.jpg 101" in (tmp_path / "out" / "test.txt").read_text()


def test_sop_and_cars_entries_outside_are_refused(tmp_path):
    sop = make_sop(tmp_path / "src")
    (sop / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n4 11319 1 bicycle_final/3_0.JPG\n"
                                       "5 11319 1 ../../../escape.JPG\n")
    before = tree_digest(tmp_path / "src")
    result = run_cli("prepare", "sop", "--source", tmp_path / "src", "-o", tmp_path / "out", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Ebay_test.txt:3" in lines[0] and "'../../../escape.JPG'" in lines[0]
    assert_nothing_written(tmp_path, before)

    cars = tmp_path / "cars"
    make_cars(cars)
    victim = cars / "car_ims" / "000001.jpg"
    records = [{"relative_im_path": "car_ims/000002.jpg", "class": np.array([[1]], "u1")},
               {"relative_im_path": str(victim), "class": np.array([[99]], "u1")}]
    write_mat(cars / "cars_annos.mat", {"annotations": records}, compressed=True)
    with pytest.raises(CaffeCompatError, match=r"cars_annos.mat: annotations\(2\).relative_im_path: entry"):
        datasets.prepare("cars", cars, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_output_folders(tmp_path):
    make_cub(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    for out, needle in [(tmp_path / "file", "is a file"),
                        # The CLI's check of every output: none in an input folder.
                        (tmp_path / "src", "is the input"),
                        (tmp_path / "src" / "CUB_200_2011" / "prepared", "is inside the input"),
                        (tmp_path / "src" / "CUB_200_2011" / "images", "is inside the input")]:
        result = run_cli("prepare", "cub", "--source", tmp_path / "src", "-o", out, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    with pytest.raises(CaffeCompatError, match="or inside it; prepare never writes into the archive"):
        datasets.prepare("cub", tmp_path / "src", tmp_path / "src" / "CUB_200_2011" / "prepared")  # from Python
    assert not (tmp_path / "src" / "CUB_200_2011" / "prepared").exists()


def test_missing_image_is_found_before_writing(tmp_path):
    make_cub(tmp_path / "src")
    (tmp_path / "src" / "CUB_200_2011" / "images" / "200.Common_Yellowthroat" / "d_2.jpg").unlink()
    with pytest.raises(CaffeCompatError, match="d_2.jpg: image listed in the archive's index is missing"):
        datasets.prepare("cub", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def big_cub(root, count):
    cub = root / "CUB_200_2011"
    (cub / "images" / "001.a").mkdir(parents=True)
    (cub / "images" / "101.b").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    lines, labels = [], []
    for i in range(1, count + 1):
        name = f"{'001.a' if i % 2 else '101.b'}/{i}.jpg"
        Image.fromarray(pixels).save(cub / "images" / name)
        lines.append(f"{i} {name}\n")
        labels.append(f"{i} {1 if i % 2 else 101}\n")
    (cub / "images.txt").write_text("".join(lines))
    (cub / "image_class_labels.txt").write_text("".join(labels))


@pytest.mark.parametrize("fmt", ["list", "lmdb"])
def test_kill_9_during_prepare_then_rerun_works(tmp_path, fmt):
    big_cub(tmp_path / "src", 400)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "caffe_compat", "prepare", "cub", "--source",
                                str(tmp_path / "src"), "-o", str(out), "--format", fmt],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".out.caffe-compat-tmp-{socket.gethostname()}-{process.pid}-0"
    deadline = time.monotonic() + 60
    # Kill once the build is under way: images (or LMDB pages) in the staging folder.
    while not (staging.is_dir() and any(p.is_file() for p in staging.rglob("*"))):
        assert process.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists() and staging.exists()  # the half-built output is only the hidden sibling

    summary = datasets.prepare("cub", tmp_path / "src", out, fmt)
    assert summary["train"]["images"] == 200 and summary["test"]["images"] == 200
    assert not staging.exists() and not list(tmp_path.glob(".out.caffe-compat-tmp-*"))
    if fmt == "list":
        assert len((out / "train.txt").read_text().splitlines()) == 200
        assert len(list((out / "images").rglob("*.jpg"))) == 400


def test_cli_prepare_reports_progress_lines(tmp_path):
    make_cub(tmp_path / "src")
    result = run_cli("prepare", "cub", "--source", tmp_path / "src", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Not a terminal: whole lines (no carriage returns) with the count, ending at 100%.
    assert "\r" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("prepare cub: 6/6 (100%)")
    assert "train: 3 images of 2 classes" in result.stdout


@pytest.mark.parametrize("label", ["abc", np.array([[np.nan]]), np.array([[1, 2]], "u1")])
def test_cars_class_that_is_not_one_number_is_located(tmp_path, label):
    make_cars(tmp_path / "src")
    records = [{"relative_im_path": "car_ims/000001.jpg", "class": np.array([[1]], "u1")},
               {"relative_im_path": "car_ims/000002.jpg", "class": label}]
    write_mat(tmp_path / "src" / "cars_annos.mat", {"annotations": records}, compressed=False)
    with pytest.raises(CaffeCompatError, match=r"annotations\(2\) needs a path string and one class"):
        datasets.prepare("cars", tmp_path / "src", tmp_path / "out")


def test_output_through_a_link_to_an_empty_folder(tmp_path):
    make_cub(tmp_path / "src")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "data").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "big" / "data")
    summary = datasets.prepare("cub", tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out").is_symlink() and summary["train"]["path"] == str(tmp_path / "out" / "train.txt")
    assert len((tmp_path / "big" / "data" / "train.txt").read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out", "src"]
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["data"]


def test_output_that_is_a_dangling_link_is_refused_before_any_work(tmp_path, monkeypatch):
    make_cub(tmp_path / "src")
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "data")
    before = tree_digest(tmp_path / "src")
    monkeypatch.setattr(datasets, "_checked_splits", lambda *_: pytest.fail("the archive was read"))
    with pytest.raises(CaffeCompatError) as err:
        datasets.prepare("cub", tmp_path / "src", tmp_path / "out")
    assert str(err.value) == (f"{tmp_path / 'out'}: is a symbolic link to {tmp_path / 'gone' / 'data'}, which does "
                              f"not exist; give a new or empty folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"] and (tmp_path / "out").is_symlink()
    assert tree_digest(tmp_path / "src") == before


def test_the_loser_of_two_prepares_to_one_output_says_so(tmp_path, capsys, monkeypatch):
    make_cub(tmp_path / "src")
    out = tmp_path / "out"
    write_list = datasets._write_list

    def other_run_finishes_first(items, preprocess, staging, split, bar):
        if not out.exists():  # the winner renames its folder into place after our check
            out.mkdir()
            (out / datasets.MARKER).write_text("the other run's\n")
        return write_list(items, preprocess, staging, split, bar)

    monkeypatch.setattr(datasets, "_write_list", other_run_finishes_first)
    assert main(["prepare", "cub", "--source", str(tmp_path / "src"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"caffe-compat: error: {out}: was created by another writer while this run built it "
                       f"(another run to the same output?); it is left as it is and this run's result discarded")
    assert [p.name for p in out.iterdir()] == [datasets.MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
