"""Hostile and damaged inputs, case by case: each ends in one CaffeCompatError line naming
the file and the layer, record or field; interrupted writes leave nothing behind; the
wire-format reader of caffemodels agrees with protobuf's own parse."""
import os
import subprocess
import sys

import numpy as np
import pytest

from caffe_compat.errors import CaffeCompatError
from caffe_compat.io import atomic, wire
from caffe_compat.io.blobs import array_to_blob, blob_to_array
from caffe_compat.io.datum import datum_to_array, parse_datum
from caffe_compat.io.files import (read_binaryproto, read_caffemodel, read_net, read_prototxt, read_solver,
                                   weights_of)
from caffe_compat.io.schema import messages
from caffe_compat.io.wire import length_delimited as _field
from conftest import run_cli, run_python
from test_io import CAFFEMODELS, _ids

NetParameter, BlobProto, Datum = (getattr(messages("bvlc"), n) for n in ("NetParameter", "BlobProto", "Datum"))


def _one_line_error(call, *match):
    with pytest.raises(CaffeCompatError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(m in message for m in match), message
    return message


# invalid UTF-8 in string fields

@pytest.mark.parametrize("layer, field", [
    (_field(1, b"conv\xff") + _field(2, b"ReLU"), "name"),
    (_field(1, b"conv") + _field(2, b"Re\xc3"), "type"),
    (_field(1, b"conv") + _field(3, b"ok") + _field(3, b"\xfe"), "bottom[1]"),
    (_field(1, b"conv") + _field(6, _field(1, b"w\x80")), "param[0].name"),
])
def test_invalid_utf8_in_caffemodel_strings_is_named(tmp_path, layer, field):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(_field(100, layer))
    _one_line_error(lambda: read_caffemodel(path), str(path), "layer[0]", f".{field}", "UTF-8")
    _one_line_error(lambda: read_net(path), str(path), "UTF-8")


def test_invalid_utf8_in_v1_layer_names_is_named(tmp_path):
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(_field(2, _field(4, b"\xc0\xafip")))  # V1LayerParameter.name is field 4
    _one_line_error(lambda: read_caffemodel(path), "layers[0]", ".name", "UTF-8")


def test_invalid_utf8_in_text_names_the_line(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_bytes(b'name: "n"\n' + b"# padding\n" * 500 + b'layer { name: "\xff" type: "ReLU" }\n')
    _one_line_error(lambda: read_prototxt(path), str(path), "line 502", "UTF-8")
    escaped = tmp_path / "escaped.prototxt"
    escaped.write_bytes(b'layer { name: "\\377" type: "ReLU" }\n')
    _one_line_error(lambda: read_prototxt(escaped), str(escaped), "not a valid prototxt")


# shapes

def _blob_net(tmp_path, fill, v1=False):
    net = NetParameter()
    layer = net.layers.add(name="ip") if v1 else net.layer.add(name="ip", type="InnerProduct")
    fill(layer.blobs.add())
    path = tmp_path / "w.caffemodel"
    path.write_bytes(net.SerializeToString())
    return path


@pytest.mark.parametrize("fill, match", [
    (lambda b: (b.shape.dim.extend([2 ** 40, 2 ** 40]), b.data.extend([1.0])), "more values than int64"),
    (lambda b: (b.shape.dim.extend([-1, -2]), b.data.extend([1.0, 2.0])), "negative dimension"),
    (lambda b: (b.shape.dim.extend([2, 3]), b.data.extend([1.0] * 5)), "holds 5 values but its shape (2, 3) needs 6"),
    (lambda b: (setattr(b, "num", -2), setattr(b, "channels", -1), b.data.extend([1.0, 2.0])), "negative dimension"),
    (lambda b: (b.shape.dim.extend([3]), b.double_data.extend([1.0] * 4)), "holds 4 values"),
])
def test_bad_blob_shapes_in_caffemodels(tmp_path, fill, match):
    path = _blob_net(tmp_path, fill)
    _one_line_error(lambda: read_caffemodel(path), str(path), "layer 'ip' blob 0", match)


def test_bad_blob_shapes_in_binaryprotos(tmp_path):
    path = tmp_path / "mean.binaryproto"
    for fill, match in [(lambda b: b.shape.dim.extend([2 ** 62, 4]), "more values than int64"),
                        (lambda b: (setattr(b, "num", -1), setattr(b, "channels", -3)), "negative dimension"),
                        (lambda b: b.shape.dim.extend([2, 2]), "holds 3 values")]:
        blob = BlobProto()
        fill(blob)
        blob.data.extend([1.0, 2.0, 3.0])
        path.write_bytes(blob.SerializeToString())
        _one_line_error(lambda: read_binaryproto(path), str(path), match)


@pytest.mark.parametrize("datum, match", [
    (Datum(channels=-1, height=-2, width=3, data=b"123456"), "negative dimension"),
    (Datum(channels=2 ** 31 - 1, height=2 ** 31 - 1, width=2 ** 31 - 1, data=b"1"), "more values than int64"),
    (Datum(channels=1, height=2, width=2, data=b"123"), "holds 3 values"),
])
def test_bad_datum_shapes_name_the_record(datum, match):
    where = "db/data.mdb key 00000042"
    _one_line_error(lambda: datum_to_array(parse_datum(datum.SerializeToString(), where), where), where, match)


# text that protobuf's parser would choke on

@pytest.mark.parametrize("reader, name", [(read_prototxt, "net.prototxt"), (read_solver, "solver.prototxt")])
def test_text_screened_before_parsing(tmp_path, reader, name):
    path = tmp_path / name
    cases = [
        (b'name: "x"\n\nname: "' + b"\\\\" * 20_000 + b"\n", "line 3", "never ends"),  # 17 s in protobuf
        (b'# ok\nname: "' + b"\\\\" * 20_000 + b'"\n', "line 2", "backslashes"),
        (b'name: "x"\n' + b" " * ((1 << 20) + 1) + b"\n", "line 2", "longer than"),
        (b"type: 'SGD\n", "line 1", "never ends"),
        (b'name: "' + b'\\"' * 20_000 + b"\n", "line 1", "never ends"),  # quadratic for a dialect regex
    ]
    for content, line, match in cases:
        path.write_bytes(content)
        _one_line_error(lambda: reader(path), str(path), line, match)


def test_screen_keeps_what_protobuf_accepts(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_bytes(b"name: 'it\\'s \"quoted\" # not a comment'  # a comment with a \" quote\n"
                     b'layer { name: "a\\\\b" type: "ReLU" bottom: "x" top: "x" }\n')
    net = read_prototxt(path).net
    assert net.name == "it's \"quoted\" # not a comment" and net.layer[0].name == "a\\b"


def test_long_parse_errors_are_cut_short(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_bytes(b'layer { name: "' + b"x" * 100_000 + b'" nonsense: 1 }\n')
    assert len(_one_line_error(lambda: read_prototxt(path), str(path))) < 1000


# atomic writes

def test_killed_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "model.caffemodel"
    script = ("import os, sys; from caffe_compat.io.atomic import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'half'); os.kill(os.getpid(), 9)\n")
    for _ in range(3):  # each attempt removes the one before's leftover
        assert run_python(script, target).returncode == -9
        assert len(list(tmp_path.iterdir())) == 1 and not target.exists()
    atomic.write_bytes(target, b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.caffemodel"] and target.read_bytes() == b"whole"


def test_live_writers_temporaries_are_left_alone(tmp_path):
    target = tmp_path / "out.txt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other_host = tmp_path / f".out.txt.caffe-compat-tmp-elsewhere-{dead.stdout.strip()}-0"
    other_host.write_text("another host's write in a shared folder")
    with atomic.atomic_path(target) as first:
        first.write_text("in flight")
        atomic.write_text(target, "other")  # this process is alive: its temporary stays
        assert first.exists()
    assert target.read_text() == "in flight" and other_host.exists()


def test_atomic_write_is_made_durable_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_text(tmp_path / "out.txt", "done")
    assert events == ["fsync", "replace", "fsync"]  # the file, then the folder


def test_unwritable_outputs_are_named(tmp_path):
    (tmp_path / "folder").mkdir()
    _one_line_error(lambda: atomic.write_text(tmp_path / "folder", "x"), "folder", "is a directory")
    (tmp_path / "plain").write_text("a file")
    _one_line_error(lambda: atomic.write_text(tmp_path / "plain" / "out.txt", "x"), "out.txt", "cannot be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "plain"]


# the wire-format reader

@pytest.mark.parametrize("path", CAFFEMODELS, ids=_ids(CAFFEMODELS))
def test_wire_reader_agrees_with_protobuf(path):
    data = open(path, "rb").read()
    net_file = read_caffemodel(path)
    full = messages(net_file.dialect).NetParameter.FromString(data)
    layers = list(full.layer) or list(full.layers)
    expected = {l.name: [blob_to_array(b) for b in l.blobs] for l in layers if len(l.blobs)}
    weights = weights_of(net_file)
    assert weights.keys() == expected.keys()
    for name, arrays in expected.items():
        for ours, theirs in zip(weights[name], arrays):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)
            assert not ours.flags.owndata  # a view over the mapped file, not a decoded copy


def test_wire_reader_unusual_encodings(tmp_path):
    values = np.arange(6, dtype="<f4")
    unpacked = b"".join(wire.encode_varint(5 << 3 | 5) + v.tobytes() for v in values)  # data, one by one
    shape = _field(7, _field(1, bytes([2, 3])))  # BlobShape.dim packed: 2, 3
    pieces = _field(5, values[:2].tobytes()) + _field(5, values[2:].tobytes())
    group = wire.encode_varint(50 << 3 | 3) + wire.encode_varint(1 << 3) + b"\x07" + wire.encode_varint(50 << 3 | 4)
    layer = (_field(1, b"a") + _field(7, shape + unpacked) + _field(7, pieces + shape) + group
             + _field(7, shape + _field(6, b"\0" * 24) + _field(5, values.tobytes())))
    path = tmp_path / "odd.caffemodel"
    path.write_bytes(_field(100, layer))
    with pytest.warns(UserWarning, match="field 50"):
        arrays = weights_of(read_caffemodel(path))["a"]
    assert len(arrays) == 3 and all(np.array_equal(a, values.reshape(2, 3)) for a in arrays)


def test_weights_are_read_only_views_and_copy_out_releases_their_pages(tmp_path):
    values = np.random.default_rng(0).standard_normal((3, 1 << 20)).astype(np.float32)  # 12 MiB, several chunks
    net = messages("bvlc").NetParameter()
    array_to_blob(values, net.layer.add(name="big", type="InnerProduct").blobs.add())
    array_to_blob(values[0].astype(np.float64), net.layer.add(name="double", type="Bias").blobs.add())
    path = tmp_path / "big.caffemodel"
    path.write_bytes(net.SerializeToString())
    weights = weights_of(read_caffemodel(path))
    view = weights["big"][0]
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1
    out = np.empty((values.size,), np.float32)
    wire.copy_out(view, out)
    assert np.array_equal(out, values.reshape(-1))
    assert np.array_equal(view, values)  # released pages read back from the file
    as_float = np.empty((1, 1 << 20), np.float32)
    wire.copy_out(weights["double"][0], as_float)
    assert np.array_equal(as_float[0], values[0])


@pytest.mark.parametrize("data, match", [
    (_field(100, _field(7, _field(5, b"\0" * 6))), "not a whole number"),
    (b"\xa2\x06\xff\xff\xff\xff\x0f", "past the end"),
    (b"\xa2\x06" + b"\xff" * 11, "longer than 10 bytes"),
    (wire.encode_varint(1 << 3 | 3) + b"\x08\x01", "never closed"),
    (b"\x0f\x00", "wire type 7"),
])
def test_malformed_wire_data_is_named(tmp_path, data, match):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(data)
    _one_line_error(lambda: read_caffemodel(path), str(path), "not a valid caffemodel", match)


# through the command line

def test_hostile_files_through_the_cli_are_one_line_exit_2(tmp_path, reference):
    prototxt = reference / "layers" / "conv_basic.prototxt"
    data = bytearray((reference / "layers" / "conv_basic.caffemodel").read_bytes())
    at = data.index(b"conv")
    data[at:at + 4] = b"c\xffnv"  # a layer name no longer UTF-8, lengths unchanged
    bad_name = tmp_path / "bad_name.caffemodel"
    bad_name.write_bytes(bytes(data))
    unterminated = tmp_path / "unterminated.prototxt"
    unterminated.write_bytes(b'layer { name: "' + b"\\\\" * 20_000 + b"\n")
    for args, needle in [(["inspect", prototxt, bad_name], "UTF-8"), (["inspect", unterminated], "line 1")]:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
