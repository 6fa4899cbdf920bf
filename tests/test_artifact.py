"""Model files (`convert -o MODEL.pt | MODEL.safetensors`): both containers round-trip,
carry the preprocessing, and every damaged or hostile file is one CaffeCompatError
naming the file (and the key) -- never silently changed weights."""
import io
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import caffe_compat
from caffe_compat.cli.main import main
from caffe_compat.converters.artifact import read_model, save_model, weights_sha256
from caffe_compat.errors import CaffeCompatError
from caffe_compat.loading import load_net
from conftest import REFERENCE, require


def run(capsys, *args):
    """`caffe-compat ARGS` in this process: (exit code, stdout, stderr lines)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()

SUFFIXES = [".pt", ".safetensors"]


@pytest.fixture(scope="module")
def conv_files():
    folder = require(REFERENCE / "layers")
    return folder / "conv_basic.prototxt", folder / "conv_basic.caffemodel"


@pytest.fixture(scope="module")
def models(conv_files, tmp_path_factory):
    """conv_basic converted to each container; its bytes and its weights."""
    folder = tmp_path_factory.mktemp("models")
    net = load_net(*conv_files)
    out = {}
    for suffix in SUFFIXES:
        path = folder / f"conv{suffix}"
        save_model(net, path, "bvlc", {"preprocess.channel_order": "BGR"})
        out[suffix] = path.read_bytes()
    return out, net.caffe_weights()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_cli_convert_round_trip_with_preprocessing(conv_files, tmp_path, capsys, suffix):
    model = tmp_path / f"conv{suffix}"
    code, out, err = run(capsys, "convert", *conv_files, "-o", model, "--mean-value", "104", "117", "123",
                         "--scale", "0.5")
    assert code == 0, err
    assert "preprocess: BGR 0-255 NCHW, mean 104.0,117.0,123.0 (mean_value), scale 0.5" in out
    net = caffe_compat.load(model)
    assert net.preprocess["preprocess.mean"] == "104.0,117.0,123.0" and net.preprocess["preprocess.scale"] == "0.5"
    assert "preprocess.unstated" not in net.preprocess
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(net(x)["conv"], load_net(*conv_files)(x)["conv"])
    back = tmp_path / "back.caffemodel"
    assert run(capsys, "convert", model, "-o", back)[0] == 0
    assert back.stat().st_size > 0


def test_deploy_net_without_overrides_says_what_is_unstated(conv_files, tmp_path, capsys):
    model = tmp_path / "conv.pt"
    assert run(capsys, "convert", *conv_files, "-o", model)[0] == 0
    recorded = caffe_compat.load(model).preprocess
    assert recorded["preprocess.channel_order"] == "BGR" and recorded["preprocess.pixel_range"] == "0-255"
    assert recorded["preprocess.input"] == "data" and recorded["preprocess.unstated"].startswith("mean: ")
    assert recorded["preprocess.scale"] == "1.0"


def test_bad_preprocess_options_one_line(conv_files, tmp_path, capsys):
    for args, needle in [(["--mean-value", "1", "2"], "give 1 or 3 values"),
                         (["--mean-value", "1", "--mean-file", "m.binaryproto"], "not both"),
                         (["--scale", "-1"], "must be positive"),
                         (["--mean-file", tmp_path / "none.binaryproto"], "none.binaryproto"),
                         (["-o", tmp_path / "m.onnx"], "ONNX is 'caffe-compat export-onnx'")]:
        code, _, lines = run(capsys, "convert", *conv_files, "-o", tmp_path / "m.pt", *args)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.onnx").exists()


def test_pickled_pt_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save({"format": "caffe-compat-model", "evil": random.Random(0)}, path)
    code, _, lines = run(capsys, "export-onnx", path, "-o", tmp_path / "x.onnx")
    assert code == 2 and len(lines) == 1, lines
    assert "pickled Python objects (random.Random)" in lines[0] and "weights_only" not in lines[0]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage that is no pickle")
    code, _, lines = run(capsys, "export-onnx", garbage, "-o", tmp_path / "x.onnx")
    assert code == 2 and len(lines) == 1 and "not a caffe-compat model, or damaged" in lines[0], lines
    assert "weights_only" not in lines[0] and "pickled Python objects" not in lines[0]


def _payload(models):
    return torch.load(io.BytesIO(models[0][".pt"]), weights_only=True)


_counter = iter(range(10**9))


def _write(data, suffix, folder):
    path = folder / f"m{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.pop("weights_sha256"), "key 'weights_sha256' is missing"),
    (lambda p: p.pop("net_prototxt"), "key 'net_prototxt' is missing"),
    (lambda p: p.update(phase=3), "key 'phase': expected str"),
    (lambda p: p.update(phase="VAL"), "key 'phase': 'VAL'"),
    (lambda p: p.update(dialect="caffe2"), "key 'dialect'"),
    (lambda p: p.update(weights=[]), "key 'weights': expected dict"),
    (lambda p: p.update(preprocess={"a": 1}), "key 'preprocess'"),
    (lambda p: p.update(format_version=1), "format version 1"),
    (lambda p: p["weights"]["conv"].__setitem__(0, torch.zeros(2, dtype=torch.int64)), "float32 or float64"),
    (lambda p: p["weights"]["conv"][0].mul_(2), "do not match their checksum"),
    (lambda p: p.update(net_prototxt=p["net_prototxt"].replace("conv", "c0nv", 1)), "net text does not match"),
])
def test_damaged_structure_names_file_and_key(models, tmp_path, change, needle):
    payload = _payload(models)
    change(payload)
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    with pytest.raises(CaffeCompatError, match="m.pt: .*" + needle.replace("(", r"\(").replace(")", r"\)")):
        caffe_compat.load(path)


def test_damaged_net_text_with_matching_checksum_is_a_clean_error(models, tmp_path):
    from caffe_compat.converters.artifact import text_sha256

    payload = _payload(models)
    payload["net_prototxt"] = payload["net_prototxt"][:-20] + "}}} {"
    payload["net_sha256"] = text_sha256(payload["net_prototxt"])
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(CaffeCompatError, match="key 'net_prototxt': not a valid net"):
        caffe_compat.load(tmp_path / "m.pt")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_40_bit_flips_never_change_the_weights_silently(models, tmp_path, suffix):
    data, weights = models[0][suffix], models[1]
    rng = random.Random(40)
    loaded = 0
    for trial in range(40):
        damaged = bytearray(data)
        position = rng.randrange(len(damaged))
        damaged[position] ^= 1 << rng.randrange(8)
        path = tmp_path / f"{trial}{suffix}"
        path.write_bytes(bytes(damaged))
        try:
            payload = read_model(path)
        except CaffeCompatError as err:
            assert str(path) in str(err)
            continue
        loaded += 1  # a flip in bytes nothing reads (zip padding, a name's case...): weights intact
        assert weights_sha256(payload["weights"]) == weights_sha256(weights)
    assert loaded < 40


def _safetensors_metadata_mutation(data, draw):
    """The safetensors header is JSON after an 8-byte length: mutate inside it."""
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    header = bytearray(data[8:8 + size])
    position = draw(st.integers(0, size - 1))
    header[position] = draw(st.integers(32, 126))
    return data[:8] + bytes(header) + data[8 + size:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data(), suffix=st.sampled_from(SUFFIXES))
def test_fuzz_mutated_model_files(models, tmp_path, data, suffix):
    original = models[0][suffix]
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "header"] if suffix == ".safetensors"
                                     else ["flip", "truncate", "splice"]))
    if kind == "flip":
        blob = bytearray(original)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "truncate":
        blob = original[:data.draw(st.integers(0, len(original) - 1))]
    elif kind == "splice":
        at = data.draw(st.integers(0, len(original)))
        blob = original[:at] + data.draw(st.binary(min_size=1, max_size=64)) + original[at:]
    else:
        blob = _safetensors_metadata_mutation(original, data.draw)
    path = _write(blob, suffix, tmp_path)
    try:
        net = caffe_compat.load(path)
    except CaffeCompatError:
        return
    assert weights_sha256(net.caffe_weights()) == weights_sha256(models[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_payload_structure(models, tmp_path, data):
    """Keys dropped or given values of other types, with checksums kept or recomputed."""
    from caffe_compat.converters.artifact import text_sha256

    payload = _payload(models)
    key = data.draw(st.sampled_from(sorted(payload) + ["weights/conv"]))
    value = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=30), st.lists(st.integers(), max_size=3),
                                st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
                                st.just(torch.zeros(3)), st.just("<drop>")))
    if key == "weights/conv":
        payload["weights"]["conv"] = value if value != "<drop>" else []
    elif value == "<drop>":
        del payload[key]
    else:
        payload[key] = value
    if data.draw(st.booleans()):  # reach past the checksums
        if isinstance(payload.get("net_prototxt"), str):
            payload["net_sha256"] = text_sha256(payload["net_prototxt"])
        weights = payload.get("weights")
        if isinstance(weights, dict) and all(isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v)
                                             for v in weights.values()):
            payload["weights_sha256"] = weights_sha256({k: [t.numpy() for t in v] for k, v in weights.items()})
    path = tmp_path / f"s{next(_counter)}.pt"
    torch.save(payload, path)
    try:
        caffe_compat.load(path)
    except CaffeCompatError:
        pass


def test_weights_checksum_sees_names_shapes_and_values():
    a = {"conv": [np.arange(6, dtype=np.float32).reshape(2, 3)]}
    assert weights_sha256(a) == weights_sha256({"conv": [np.arange(6, dtype=np.float32).reshape(2, 3)]})
    for other in ({"conv2": a["conv"]}, {"conv": [a["conv"][0].reshape(3, 2)]},
                  {"conv": [a["conv"][0].astype(np.float64)]}, {"conv": [a["conv"][0] + 1e-7]}):
        assert weights_sha256(other) != weights_sha256(a)


def test_convert_model_to_the_other_container_with_new_preprocessing(conv_files, tmp_path, capsys):
    first, second = tmp_path / "conv.pt", tmp_path / "conv.safetensors"
    assert run(capsys, "convert", *conv_files, "-o", first)[0] == 0
    code, out, err = run(capsys, "convert", first, "-o", second, "--mean-value", "128", "--scale", "0.0078125")
    assert code == 0, err
    assert "preprocess: BGR 0-255 NCHW, mean 128.0,128.0,128.0 (mean_value), scale 0.0078125" in out
    a, b = read_model(first), read_model(second)
    assert weights_sha256(a["weights"]) == weights_sha256(b["weights"]) and a["net_prototxt"] == b["net_prototxt"]
    assert "preprocess.mean" not in a["preprocess"] and b["preprocess"]["preprocess.mean"] == "128.0,128.0,128.0"


@pytest.mark.parametrize("declared", [
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }',
    'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8',  # the legacy fields
])
def test_an_input_shape_given_over_the_prototxts_survives_the_model_file(tmp_path, capsys, declared):
    net = tmp_path / "net.prototxt"
    net.write_text(declared + '\nlayer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                              'convolution_param { num_output: 2 kernel_size: 3 } }\n')
    for suffix in (".pt", ".safetensors"):
        model = tmp_path / f"m{suffix}"
        assert run(capsys, "convert", net, "--random-init", "--input-shape", "data=2,3,12,10", "-o", model)[0] == 0
        assert caffe_compat.load(model).blob_shapes["conv"] == (2, 2, 10, 8)
