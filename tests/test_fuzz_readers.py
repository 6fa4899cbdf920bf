"""Damaged files, generated: every reader gives a result or CaffeCompatError, never
another exception, and never hangs. Mutations (bit flips, truncation, inserted and
deleted bytes, splices of another file) of the Caffe reference fixtures and of small
files made here; derandomized, so CI runs the same examples every time."""
import functools
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_compat.errors import CaffeCompatError
from caffe_compat.io.blobs import array_to_blob
from caffe_compat.io.datum import array_to_datum, datum_to_array, parse_datum
from caffe_compat.io.files import read_binaryproto, read_caffemodel, read_prototxt, read_solver, weights_of
from caffe_compat.io.schema import messages
from conftest import REFERENCE, bounded

EXAMPLE_SECONDS = 10  # far above any real read of these small files: only a hang reaches it
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _v1_double_caffemodel() -> bytes:
    net = messages("bvlc").NetParameter(name="v1")
    layer = net.layers.add(name="ip", bottom=["x"], top=["y"])
    layer.type = messages("bvlc").V1LayerParameter.INNER_PRODUCT
    blob = layer.blobs.add(num=1, channels=1, height=2, width=3)
    blob.double_data.extend([0.5, -1, 2, 3, 4, 5])
    return net.SerializeToString()


def _small_caffemodel() -> bytes:
    net = messages("bvlc").NetParameter(name="small")
    net.layer.add(name="data", type="Input", top=["x"]).input_param.shape.add(dim=[2, 3])
    ip = net.layer.add(name="ip", type="InnerProduct", bottom=["x"], top=["y"])
    ip.inner_product_param.num_output = 4
    array_to_blob(np.arange(12, dtype=np.float32).reshape(4, 3), ip.blobs.add())
    array_to_blob(np.ones(4, np.float32), ip.blobs.add())
    return net.SerializeToString()


def _fixture(relative: str) -> bytes:
    path = REFERENCE / relative
    return path.read_bytes() if path.exists() else b""


def _seeds(*relatives, generated=()):
    """Seed files: the fixtures that are present (CI always has them) and generated ones."""
    found = [data for data in map(_fixture, relatives) if data] + list(generated)
    assert found
    return found


CAFFEMODELS = _seeds("layers/conv_basic.caffemodel", "nets/v1_legacy/v1.caffemodel",
                     "nets/solver/init.caffemodel", "layers/batchnorm_scale.caffemodel",
                     generated=[_v1_double_caffemodel(), _small_caffemodel()])
PROTOTXTS = _seeds("layers/conv_basic.prototxt", "nets/v1_legacy/v1.prototxt", "nets/solver/train.prototxt",
                   generated=[b'name: "n" input: "x" input_dim: 1 input_dim: 2 input_dim: 1 input_dim: 1\n'
                              b'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }  # "quoted" \\\n'])
SOLVERS = _seeds("nets/solver/solver.prototxt",
                 generated=[b'net: "train.prototxt"\nbase_lr: 0.01\nlr_policy: "step"\nstepsize: 3\n'
                            b'max_iter: 10\nsnapshot_prefix: "snaps/run"\n'])
_mean = messages("bvlc").BlobProto(num=1, channels=3, height=2, width=2)
_mean.data.extend(np.linspace(0, 1, 12).tolist())
BINARYPROTOS = _seeds("nets/data_layer/mean.binaryproto", generated=[_mean.SerializeToString()])
_float_datum = array_to_datum(np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4), 3)
DATUMS = [array_to_datum(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 7).SerializeToString(),
          _float_datum.SerializeToString()]


@st.composite
def damaged(draw, seeds):
    """A seed with one to four mutations."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "byte"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[at:] = other[start:start + draw(st.integers(1, 256))]
        else:  # bytes that mean something to one of the formats
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, ord('"'), ord("{"), ord("}"), ord("\\")]))
    return bytes(data)


def _strings_are_text(message) -> bool:
    """Every string field of `message`, anywhere in it, holds str (upb hands invalid UTF-8 over as bytes)."""
    for field, value in message.ListFields():
        items = value if isinstance(value, (list, tuple)) or hasattr(value, "extend") else [value]
        if field.type == field.TYPE_STRING and not all(isinstance(v, str) for v in items):
            return False
        if field.message_type is not None and not all(_strings_are_text(v) for v in items):
            return False
    return True


def _clean(read, data: bytes, path: Path):
    """read(path) with `data` in the file: a result or CaffeCompatError, within the bound."""
    path.write_bytes(data)
    with bounded(EXAMPLE_SECONDS), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(path)
        except CaffeCompatError as err:
            assert "\n" not in str(err)
            return err


def _net_and_weights(path):
    net_file = read_caffemodel(path)
    return net_file, weights_of(net_file)


@FUZZ
@given(data=damaged(CAFFEMODELS))
def test_damaged_caffemodels(data, tmp_path):
    result = _clean(_net_and_weights, data, tmp_path / "net.caffemodel")
    if not isinstance(result, CaffeCompatError):
        net_file, weights = result
        assert _strings_are_text(net_file.net)
        assert all(isinstance(name, str) for name in weights)
        assert all(isinstance(a, np.ndarray) for arrays in weights.values() for a in arrays)


@FUZZ
@given(data=damaged(PROTOTXTS))
def test_damaged_prototxts(data, tmp_path):
    result = _clean(read_prototxt, data, tmp_path / "net.prototxt")
    assert isinstance(result, CaffeCompatError) or _strings_are_text(result.net)


@FUZZ
@given(data=damaged(SOLVERS))
def test_damaged_solvers(data, tmp_path):
    result = _clean(read_solver, data, tmp_path / "solver.prototxt")
    assert isinstance(result, CaffeCompatError) or _strings_are_text(result)


@FUZZ
@given(data=damaged(BINARYPROTOS))
def test_damaged_binaryprotos(data, tmp_path):
    result = _clean(read_binaryproto, data, tmp_path / "mean.binaryproto")
    assert isinstance(result, (np.ndarray, CaffeCompatError))


@FUZZ
@given(data=damaged(DATUMS))
def test_damaged_datum_records(data):
    with bounded(EXAMPLE_SECONDS):
        try:
            array, label = datum_to_array(parse_datum(data, "key 00000007"), "key 00000007")
        except CaffeCompatError as err:
            assert "key 00000007" in str(err)
        else:
            assert array.ndim == 3 and isinstance(label, int)


_SMALL_PROTOTXT = (b'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                   b'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                   b'inner_product_param { num_output: 4 } }\n')
NETS = [(_SMALL_PROTOTXT, _small_caffemodel())] + [
    (_fixture(f"layers/{name}.prototxt"), _fixture(f"layers/{name}.caffemodel"))
    for name in ("conv_basic", "batchnorm_scale") if _fixture(f"layers/{name}.caffemodel")]


@functools.lru_cache(maxsize=None)
def _warm_up(prototxt: bytes) -> None:
    """Load the intact net once, unbounded: the first load imports torch and the layers."""
    from caffe_compat.loading import load_net
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "net.prototxt").write_bytes(prototxt)
        (Path(folder) / "net.caffemodel").write_bytes(dict(NETS)[prototxt])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_net(Path(folder) / "net.prototxt", Path(folder) / "net.caffemodel")


@st.composite
def damaged_net(draw):
    """A net's prototxt and its caffemodel, damaged."""
    prototxt, caffemodel = draw(st.sampled_from(NETS))
    return prototxt, draw(damaged([caffemodel]))


@settings(FUZZ, max_examples=60)
@given(net=damaged_net())
def test_damaged_weights_through_load_net(net, tmp_path):
    pytest.importorskip("torch")
    from caffe_compat.loading import load_net
    prototxt, caffemodel = net
    (tmp_path / "net.prototxt").write_bytes(prototxt)
    _warm_up(prototxt)
    _clean(lambda p: load_net(tmp_path / "net.prototxt", p), caffemodel, tmp_path / "net.caffemodel")
