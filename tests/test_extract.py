"""`caffe-compat extract`: one blob per record, in dataset order, with labels."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from caffe_compat.deploy import deploy_net
from caffe_compat.graph import build_graph
from caffe_compat.io.datum import datum_to_array, parse_datum
from caffe_compat.io.files import read_caffemodel, read_prototxt, weights_of, write_prototxt
from caffe_compat.net import CaffeNet
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
    assert features["labels"].tolist() == [label for _, label in records]
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
    from caffe_compat.extract import extract_features
    weights = weights_of(read_caffemodel(REFERENCE / "nets" / "solver" / "final.caffemodel"))
    features = extract_features(read_prototxt(net), weights, tmp_path / "list.txt")
    assert features["paths"].tolist() == [str(tmp_path / f"{i}.png") for i in range(5)]
    assert features["labels"].tolist() == [label for _, label in records]
    np.testing.assert_allclose(features["embeddings"], _expected_embeddings(weights, records), rtol=1e-5, atol=1e-6)


def test_extract_errors_name_the_problem(tmp_path):
    net = _test_phase_net(tmp_path, batch_size=4)
    model = REFERENCE / "nets" / "solver" / "final.caffemodel"
    for args, needle in [(["--data", str(tmp_path / "missing")], "no such LMDB folder or image list"),
                         (["--data", str(REFERENCE / "nets" / "solver" / "train_lmdb"), "--blob", "nope"],
                          "has no blob 'nope'")]:
        result = subprocess.run([sys.executable, "-m", "caffe_compat", "extract", str(net), str(model), *args,
                                 "-o", str(tmp_path / "f.npz")], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert not (tmp_path / "f.npz").exists()
