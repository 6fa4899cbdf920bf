"""Readers and writers: every reference file parses, legacy nets upgrade as Caffe's,
dialects are detected, round trips are exact, bad input fails clearly."""
import glob
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.datum import datum_to_array, parse_datum
from caffe_compat.io.files import (read_binaryproto, read_caffemodel, read_net, read_prototxt, read_solver,
                                   weights_of, with_weights, write_caffemodel, write_prototxt)
from caffe_compat.io.schema import messages
from conftest import REFERENCE, require

NET_PROTOTXTS = sorted(p for p in glob.glob(str(REFERENCE / "**" / "*.prototxt"), recursive=True)
                       if not p.endswith("solver.prototxt"))
CAFFEMODELS = sorted(glob.glob(str(REFERENCE / "**" / "*.caffemodel"), recursive=True))


def _ids(paths):
    return [p.split("caffe-reference/")[-1] for p in paths]


def test_fixtures_are_listed(reference):
    # Guards the parametrized tests below from silently running over nothing.
    assert len(NET_PROTOTXTS) >= 38 and len(CAFFEMODELS) >= 38


@pytest.mark.parametrize("path", NET_PROTOTXTS, ids=_ids(NET_PROTOTXTS))
def test_prototxt_parses_and_round_trips(path, tmp_path):
    net_file = read_prototxt(require(Path(path)))
    assert len(net_file.net.layer) > 0
    write_prototxt(net_file.net, tmp_path / "back.prototxt")
    back = read_prototxt(tmp_path / "back.prototxt")
    assert back.dialect == net_file.dialect
    assert back.net == net_file.net


@pytest.mark.parametrize("path", CAFFEMODELS, ids=_ids(CAFFEMODELS))
def test_caffemodel_parses_and_round_trips(path, tmp_path):
    net_file = read_caffemodel(require(Path(path)))
    weights = weights_of(net_file)
    write_caffemodel(with_weights(net_file.net, weights), tmp_path / "back.caffemodel")
    back = read_caffemodel(tmp_path / "back.caffemodel")
    assert back.dialect == net_file.dialect
    back_weights = weights_of(back)
    assert back_weights.keys() == weights.keys()
    for name in weights:
        for a, b in zip(weights[name], back_weights[name]):
            assert a.shape == b.shape and np.array_equal(a, b)


def test_solver_caffemodels_are_lifted_dialect_with_margin_one(reference):
    for name in ("init.caffemodel", "final.caffemodel"):
        net_file = read_caffemodel(reference / "nets" / "solver" / name)
        assert net_file.dialect == "lifted"
        losses = [l for l in net_file.net.layer if l.type == "LiftedStructSimilaritySoftmaxLoss"]
        assert len(losses) == 1 and losses[0].lifted_struct_sim_softmax_loss_param.margin == 1.0


def test_dialect_of_prototxts(reference):
    assert read_prototxt(reference / "layers" / "lifted_margin_half_far.prototxt").dialect == "lifted"
    assert read_prototxt(reference / "layers" / "conv_basic.prototxt").dialect == "bvlc"
    half = read_prototxt(reference / "layers" / "lifted_margin_half_far.prototxt")
    assert half.net.layer[-1].lifted_struct_sim_softmax_loss_param.margin == 0.5


def test_dialect_override_reads_field_145_the_other_way(reference):
    # Read as BVLC, the fork's margin at field 145 is no BlobShape: it must be reported, not lost.
    with pytest.warns(UserWarning, match="field"):
        net_file = read_caffemodel(reference / "nets" / "solver" / "init.caffemodel", dialect="bvlc")
    assert net_file.dialect == "bvlc" and net_file.unknown


def test_v1_legacy_is_upgraded_as_caffe_does(reference):
    net_file = read_prototxt(reference / "nets" / "v1_legacy" / "v1.prototxt")
    assert net_file.upgraded and not len(net_file.net.layers) and not len(net_file.net.input)
    types = [l.type for l in net_file.net.layer]
    assert types[0] == "Input" and net_file.net.layer[0].top[0] == "data"
    assert list(net_file.net.layer[0].input_param.shape[0].dim) == [2, 3, 12, 12]
    assert "Convolution" in types and "ReLU" in types and "Pooling" in types and "InnerProduct" in types
    weights = weights_of(read_caffemodel(reference / "nets" / "v1_legacy" / "v1.caffemodel"))
    assert weights["fc"][0].shape == (1, 1, 5, 100)  # legacy 4-D dims, as stored


def test_v1_blobs_lr_become_param_specs():
    net = messages("bvlc").NetParameter()
    text_format.Parse('layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" blobs_lr: 1 blobs_lr: 2 '
                      'weight_decay: 1 weight_decay: 0 param: "w" inner_product_param { num_output: 3 } } '
                      'input: "x" input_dim: 1 input_dim: 4 input_dim: 1 input_dim: 1', net)
    from caffe_compat.io.upgrade import upgrade_net
    assert upgrade_net(net)
    ip = net.layer[1]
    assert ip.type == "InnerProduct" and ip.inner_product_param.num_output == 3
    assert [(p.name, p.lr_mult, p.decay_mult) for p in ip.param] == [("w", 1, 1), ("", 2, 0)]
    assert net.layer[0].type == "Input" and list(net.layer[0].input_param.shape[0].dim) == [1, 4, 1, 1]


def test_mean_file_and_solver_and_datum(reference):
    mean = read_binaryproto(reference / "nets" / "data_layer" / "mean.binaryproto")
    assert mean.shape == (1, 3, 32, 30) and mean.dtype == np.float32
    solver = read_solver(reference / "nets" / "solver" / "solver.prototxt")
    assert solver.net == "train.prototxt" and solver.lr_policy == "step" and solver.max_iter == 10
    lmdb = pytest.importorskip("lmdb", reason="lmdb is in the test extra")
    env = lmdb.open(str(reference / "nets" / "data_layer" / "train_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        records = list(txn.cursor())
    assert len(records) == 20
    array, label = datum_to_array(parse_datum(records[0][1], "record 0"), "record 0")
    assert array.shape == (3, 32, 30) and array.dtype == np.uint8 and isinstance(label, int)


def test_float_and_encoded_datums():
    Datum = messages("bvlc").Datum
    d = Datum(channels=1, height=2, width=2, label=4)
    d.float_data.extend([0.5, 1, 2, 3])
    array, label = datum_to_array(d, "x")
    assert array.dtype == np.float32 and array.shape == (1, 2, 2) and label == 4
    PIL = pytest.importorskip("PIL.Image", reason="Pillow is in the test extra")
    import io
    rgb = np.zeros((3, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    buf = io.BytesIO()
    PIL.fromarray(rgb).save(buf, format="PNG")
    enc = Datum(channels=3, height=3, width=5, encoded=True, data=buf.getvalue(), label=1)
    array, _ = datum_to_array(enc, "x")
    assert array.shape == (3, 3, 5) and array[2].min() == 200 and array[0].max() == 0  # BGR order


def test_weights_round_trip_with_double_data(tmp_path):
    net = messages("bvlc").NetParameter()
    net.layer.add(name="ip", type="InnerProduct")
    weights = {"ip": [np.arange(6, dtype=np.float64).reshape(2, 3), np.ones(2, np.float32)]}
    write_caffemodel(with_weights(net, weights), tmp_path / "w.caffemodel")
    back = weights_of(read_caffemodel(tmp_path / "w.caffemodel"))
    assert back["ip"][0].dtype == np.float64 and np.array_equal(back["ip"][0], weights["ip"][0])


def test_read_net_tells_text_from_binary(reference):
    assert read_net(reference / "layers" / "conv_basic.caffemodel").net.layer[1].name == "conv"
    assert read_net(reference / "layers" / "conv_basic.prototxt").net.layer[1].name == "conv"


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"layer { name: 'a' type: 'ReLU' bottom: 'x' top: 'x' ", "not a valid prototxt"),
    (b"this is not a net", "not a valid prototxt"),
    (b"layer { name: 'c' convolution_param { num_output: 'many' } }", "not a valid prototxt"),
    (b"\x0a\x05\x00\x01\x02garbage\xff\xfe", "binary"),
])
def test_bad_prototxt(tmp_path, content, message):
    path = tmp_path / "net.prototxt"
    path.write_bytes(content)
    with pytest.raises(CaffeCompatError, match=message) as err:
        read_prototxt(path)
    assert str(path) in str(err.value)


def test_bad_caffemodels(tmp_path, reference):
    data = (reference / "layers" / "conv_basic.caffemodel").read_bytes()
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffeCompatError, match="truncated"):
        read_caffemodel(truncated)
    with pytest.raises(CaffeCompatError, match="text prototxt"):
        read_caffemodel(reference / "layers" / "conv_basic.prototxt")
    with pytest.raises(CaffeCompatError, match="directory"):
        read_caffemodel(tmp_path)
    with pytest.raises(CaffeCompatError, match="no such file"):
        read_caffemodel(tmp_path / "missing.caffemodel")


def test_blob_with_wrong_count_is_named(tmp_path):
    net = messages("bvlc").NetParameter()
    blob = net.layer.add(name="ip", type="InnerProduct").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1.0] * 5)
    (tmp_path / "w.caffemodel").write_bytes(net.SerializeToString())
    with pytest.raises(CaffeCompatError, match="layer 'ip' blob 0: holds 5 values"):
        weights_of(read_caffemodel(tmp_path / "w.caffemodel"))


def _graph(text, phase="TEST"):
    net = messages("bvlc").NetParameter()
    text_format.Parse(text, net)
    return build_graph(net, phase)


def test_graph_phase_filtering_and_outputs():
    g = _graph('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } } '
               'layer { name: "r" type: "ReLU" bottom: "x" top: "x" } '
               'layer { name: "d" type: "Dropout" bottom: "x" top: "y" include { phase: TRAIN } } '
               'layer { name: "s" type: "Sigmoid" bottom: "x" top: "z" exclude { phase: TRAIN } } '
               'layer { name: "st" type: "TanH" bottom: "x" top: "w" include { stage: "deploy" } } '
               'layer { name: "l" type: "EuclideanLoss" bottom: "x" bottom: "x" top: "loss" }')
    assert [n.name for n in g.layers] == ["in", "r", "s", "l"]
    assert g.outputs == ["z", "loss"] and g.layer("l").loss_weights == [1.0]
    assert [n.name for n in _graph("layer { name: 'in' type: 'Input' top: 'x' } "
                                   "layer { name: 'd' type: 'Dropout' bottom: 'x' top: 'y' include { phase: TRAIN } }",
                                   "TRAIN").layers] == ["in", "d"]


@pytest.mark.parametrize("text, message", [
    ('layer { name: "a" type: "ReLU" bottom: "nope" top: "y" }', "bottom 'nope' is produced by no layer"),
    ('layer { name: "in" type: "Input" top: "x" } layer { name: "a" type: "ReLU" bottom: "x" top: "y" } '
     'layer { name: "b" type: "TanH" bottom: "x" top: "y" }', "top 'y' is already produced by layer 'a'"),
    ('layer { name: "a" type: "ReLU" bottom: "y" top: "x" } layer { name: "b" type: "TanH" bottom: "x" top: "y" }',
     "produced only by a later layer 'b'"),
    ('layer { name: "in" type: "Input" top: "x" } layer { name: "in" type: "ReLU" bottom: "x" top: "x" }',
     "duplicate layer names"),
])
def test_graph_validation(text, message):
    with pytest.raises(CaffeCompatError, match=message):
        _graph(text)


def test_datum_lmdb_writer_grows_its_map_and_keeps_key_order(tmp_path):
    lmdb = pytest.importorskip("lmdb", reason="lmdb is in the test extra")
    from caffe_compat.io.datum import write_datum_lmdb
    images = [(np.full((3, 32, 32), i, np.uint8), i % 7) for i in range(60)]  # ~180 KB > the 64 KB map
    assert write_datum_lmdb(tmp_path / "db", iter(images), commit_every=8, initial_map_size=1 << 16) == 60
    with lmdb.open(str(tmp_path / "db"), readonly=True, lock=False) as env, env.begin() as txn:
        records = list(txn.cursor())
    assert [k for k, _ in records] == [f"{i:08d}".encode() for i in range(60)]
    array, label = datum_to_array(parse_datum(records[59][1], "59"), "59")
    assert array.min() == array.max() == 59 and label == 59 % 7
    with pytest.raises(CaffeCompatError, match="already exists"):
        write_datum_lmdb(tmp_path / "db", images)


def test_atomic_writes_leave_no_temporary_and_normal_permissions(tmp_path):
    import os
    from caffe_compat.io.atomic import atomic_path, write_text
    write_text(tmp_path / "out.txt", "done")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "half.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_an_empty_comment_line_is_a_comment(tmp_path):
    # PSPNet's deploy prototxts open with a line holding only '#'
    path = tmp_path / "net.prototxt"
    path.write_text('#\nname: "n" #\ninput: "data"\n')
    assert read_prototxt(path).net.name == "n"
    path.write_text('name: "n\ninput: "data"\n')
    with pytest.raises(CaffeCompatError, match="line 1: a string opened with \" never ends on its line"):
        read_prototxt(path)
