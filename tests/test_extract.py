"""`caffe-compat extract`: one blob per record, in dataset order, with labels."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from caffe_compat.cli.main import main
from caffe_compat.deploy import deploy_net
from caffe_compat.graph import build_graph
from caffe_compat.io.datum import datum_to_array, parse_datum
from caffe_compat.io.files import read_caffemodel, read_prototxt, weights_of, write_prototxt
from caffe_compat.net import CaffeNet
from caffe_compat.errors import CaffeCompatError
from conftest import REFERENCE, require

lmdb = pytest.importorskip("lmdb", reason="lmdb is in the test extra")


def _test_phase_net(tmp_path, batch_size):
    """The solver fixture's embedder with its Data layer moved to the TEST phase."""
    net_file = read_prototxt(require(REFERENCE / "nets" / "solver" / "train.prototxt"))
    net = net_file.net
    data = net.layer[0]
    data.include[0].phase = 1  # TEST
    data.data_param.batch_size = batch_size
    del net.layer[-1]  # the loss
    write_prototxt(net, tmp_path / "extract.prototxt")
    return tmp_path / "extract.prototxt"


def _records(source):
    with lmdb.open(str(source), readonly=True, lock=False) as env, env.begin() as txn:
        return [datum_to_array(parse_datum(v, k.decode()), k.decode()) for k, v in txn.cursor()]


def _expected_embeddings(weights, records):
    """The embedder run directly on the records, transformed as its transform_param says."""
    net_file = read_prototxt(REFERENCE / "nets" / "solver" / "train.prototxt")
    deployed = deploy_net(net_file.net, input_shape=(len(records), *records[0][0].shape))
    net = CaffeNet(build_graph(deployed, "TEST", net_file.dialect), weights).eval()
    mean = np.array([128, 120, 110], np.float32)[:, None, None]
    batch = np.stack([(a.astype(np.float32) - mean) * 0.0078125 for a, _ in records])
    with torch.no_grad():
        return net(data=torch.from_numpy(batch))["fc_embedding"].numpy()


def test_extract_lmdb_in_order_without_the_wrapped_repeats(tmp_path):
    source = require(REFERENCE / "nets" / "solver" / "train_lmdb")
    model = REFERENCE / "nets" / "solver" / "final.caffemodel"
    net = _test_phase_net(tmp_path, batch_size=24)  # 64 records: the third batch wraps around
    result = subprocess.run([sys.executable, "-m", "caffe_compat", "extract", str(net), str(model), "--data",
                             str(source), "-o", str(tmp_path / "f.npz")], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    features = np.load(tmp_path / "f.npz")
    records = _records(source)
    assert features["embeddings"].shape == (64, 8) and features["embeddings"].dtype == np.float32
    assert features["labels"].tolist() == [label for _, label in records] and features["labels"].dtype == np.int64
    expected = _expected_embeddings(weights_of(read_caffemodel(model)), records)
    np.testing.assert_allclose(features["embeddings"], expected, rtol=1e-5, atol=1e-6)


def test_extract_image_list_records_paths(tmp_path):
    source = require(REFERENCE / "nets" / "solver" / "train_lmdb")
    records = _records(source)[:5]
    lines = []
    for i, (array, label) in enumerate(records):
        Image.fromarray(array.transpose(1, 2, 0)[:, :, ::-1]).save(tmp_path / f"{i}.png")  # BGR -> RGB file
        lines.append(f"{tmp_path / f'{i}.png'} {label}\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    net = _test_phase_net(tmp_path, batch_size=2)
    from caffe_compat.tools.extract import extract_features
    weights = weights_of(read_caffemodel(REFERENCE / "nets" / "solver" / "final.caffemodel"))
    features = extract_features(read_prototxt(net), weights, tmp_path / "list.txt")
    assert features["paths"].tolist() == [str(tmp_path / f"{i}.png") for i in range(5)]
    assert features["labels"].tolist() == [label for _, label in records]
    np.testing.assert_allclose(features["embeddings"], _expected_embeddings(weights, records), rtol=1e-5, atol=1e-6)


def test_extract_errors_name_the_problem(tmp_path, capsys):
    net = _test_phase_net(tmp_path, batch_size=4)
    model = REFERENCE / "nets" / "solver" / "final.caffemodel"
    os.mkfifo(tmp_path / "fifo.txt")
    for args, needle in [(["--data", str(tmp_path / "missing")], "no such LMDB folder or image list"),
                         (["--data", str(tmp_path / "fifo.txt")], "not a readable image list: not a regular file "
                                                                  "(a FIFO)"),
                         (["--data", str(REFERENCE / "nets" / "solver" / "train_lmdb"), "--blob", "nope"],
                          "has no blob 'nope'")]:
        code, lines = run_here(capsys, "extract", net, model, *args, "-o", tmp_path / "f.npz")
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "f.npz").exists()


def _image_folder(tmp_path, records):
    """The records as PNG files under tmp_path/imgs, and a list of relative paths."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    lines = []
    for i, (array, label) in enumerate(records):
        Image.fromarray(array.transpose(1, 2, 0)[:, :, ::-1]).save(tmp_path / "imgs" / f"{i}.png")
        lines.append(f"imgs/{i}.png {label}\n")
    return "".join(lines)


def run_here(capsys, *args):
    """`caffe-compat ARGS` in this process: (exit code, stderr lines)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_relative_workdir_paths_resolve_from_the_npz_and_root_rule(tmp_path, capsys, monkeypatch):
    source = require(REFERENCE / "nets" / "solver" / "train_lmdb")
    records = _records(source)[:4]
    model = REFERENCE / "nets" / "solver" / "final.caffemodel"
    net_file = read_prototxt(_test_phase_net(tmp_path, batch_size=3))
    net_file.net.layer[0].type = "ImageData"  # a root_folder that must not win over --data's folder
    net_file.net.layer[0].ClearField("data_param")
    net_file.net.layer[0].image_data_param.root_folder = "/cvgl/u/hsong/"
    write_prototxt(net_file.net, tmp_path / "extract.prototxt")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "list.txt").write_text(_image_folder(tmp_path / "data", records))
    # Relative everything, as reproduce's default workdir: paths must resolve from the npz.
    monkeypatch.chdir(tmp_path)
    code, err = run_here(capsys, "extract", "extract.prototxt", model, "--data", "data/list.txt",
                         "-o", "work/out/f.npz")
    assert code == 0, err
    npz = tmp_path / "work" / "out" / "f.npz"
    paths = np.load(npz)["paths"].tolist()
    assert paths == [str(tmp_path / "data" / "imgs" / f"{i}.png") for i in range(4)]  # not under the npz: absolute
    # Progress: whole lines in a log, ending with the count.
    assert not any("\r" in line for line in err) and err[-1].startswith("extract: 4/4 (100%)")

    # --root: the list's paths resolve against it; the npz beside the images stores them relative.
    (tmp_path / "elsewhere.txt").write_text((tmp_path / "data" / "list.txt").read_text())
    from caffe_compat.tools.extract import extract_features, save_features
    weights = weights_of(read_caffemodel(model))
    features = extract_features(read_prototxt(tmp_path / "extract.prototxt"), weights, tmp_path / "elsewhere.txt",
                                root=tmp_path / "data")
    save_features(features, tmp_path / "data" / "g.npz")
    assert np.load(tmp_path / "data" / "g.npz")["paths"].tolist() == [f"imgs/{i}.png" for i in range(4)]
    np.testing.assert_allclose(features["embeddings"], _expected_embeddings(weights, records), rtol=1e-5, atol=1e-6)
    with pytest.raises(CaffeCompatError, match="--root is not a folder"):
        extract_features(read_prototxt(tmp_path / "extract.prototxt"), weights, tmp_path / "elsewhere.txt",
                         root=tmp_path / "nope")


def test_mean_overrides_for_a_net_whose_mean_file_is_elsewhere(tmp_path, capsys):
    source = require(REFERENCE / "nets" / "solver" / "train_lmdb")
    model = REFERENCE / "nets" / "solver" / "final.caffemodel"
    net_file = read_prototxt(_test_phase_net(tmp_path, batch_size=32))
    transform = net_file.net.layer[0].transform_param
    del transform.mean_value[:]
    transform.mean_file = "/cvgl/u/hsong/cache/imagenet_mean.binaryproto"  # as the paper's prototxt has it
    write_prototxt(net_file.net, tmp_path / "paper_like.prototxt")
    records = _records(source)  # before the net opens the LMDB: lmdb allows one open per process
    base = ["extract", tmp_path / "paper_like.prototxt", model, "--data", source, "-o", tmp_path / "f.npz"]
    code, lines = run_here(capsys, *base)
    assert code == 2 and len(lines) == 1 and "give --mean-file PATH or --mean-value" in lines[0]
    code, lines = run_here(capsys, *base, "--mean-value", "128", "120", "110")
    assert code == 0, lines
    expected = _expected_embeddings(weights_of(read_caffemodel(model)), records)
    np.testing.assert_allclose(np.load(tmp_path / "f.npz")["embeddings"], expected, rtol=1e-5, atol=1e-6)


def test_extract_command_line_mistakes_before_any_work(tmp_path, capsys):
    net = _test_phase_net(tmp_path, batch_size=4)
    model = REFERENCE / "nets" / "solver" / "final.caffemodel"
    source = require(REFERENCE / "nets" / "solver" / "train_lmdb")
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.jpg 1\n")
    for args, needle in [(["-o", tmp_path / "f.npz", "--data", tmp_path / "latin1.txt"], "not a readable image list"),
                         (["-o", tmp_path / "folder"], "is a directory; give a file name"),
                         (["-o", tmp_path / "f.npz", "--mean-value", "1", "2"], "give 1 or 3 values"),
                         (["-o", tmp_path / "f.npz", "--root", tmp_path], "--root applies to image lists"),
                         (["-o", tmp_path / "f.npz", "--batch-size", "0"], "must be positive"),
                         (["-o", tmp_path / "f.npz", "--device", "tpu"], "not a device")]:
        code, lines = run_here(capsys, "extract", net, model, "--data", source, *args)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "f.npz").exists()
