"""Weights that do not fit the net, parameters that cannot be shared, and nets too big
for memory: each is one clear error (exit 2 from the CLI) before anything big is
allocated, never a net of filler noise."""
import shutil
import textwrap

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.files import (read_caffemodel, read_prototxt, weights_of, with_weights, write_caffemodel,
                                  write_prototxt)
from caffe_compat.io.schema import messages
from caffe_compat.layers import fillers
from caffe_compat.deploy import parse_input_shapes
from caffe_compat.loading import load_net
from caffe_compat.memory import parse_size
from caffe_compat.net import CaffeNet
from conftest import REFERENCE, require, run_cli, run_python

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
TWO_CONVS = INPUT + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
"""
OTHER = INPUT + """
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 5 } }
"""


def parse(text: str):
    net = messages("bvlc").NetParameter()
    text_format.Parse(text, net)
    return net


def files_of(folder, name: str, text: str):
    """NAME.prototxt and NAME.caffemodel (the net's filler weights)."""
    prototxt, caffemodel = folder / f"{name}.prototxt", folder / f"{name}.caffemodel"
    prototxt.write_text(text)
    net = CaffeNet(build_graph(parse(text)))
    write_caffemodel(with_weights(parse(text), net.caffe_weights()), caffemodel)
    return prototxt, caffemodel


def conv_weights(*layers):
    shapes = {"conv1": [(4, 3, 3, 3), (4,)], "conv2": [(2, 4, 3, 3), (2,)]}
    return {name: [np.full(s, 0.5, np.float32) for s in shapes[name]] for name in layers}


# ---------------------------------------------------------------- weights that do not fit

def test_weights_sharing_no_layer_name_both_files(tmp_path):
    net, _ = files_of(tmp_path, "conv", TWO_CONVS)
    _, other = files_of(tmp_path, "other", OTHER)
    with pytest.raises(CaffeCompatError, match="shares no layer") as err:
        load_net(net, other)
    assert str(net) in str(err.value) and str(other) in str(err.value)
    assert "conv1" in str(err.value) and "fc" in str(err.value)


@pytest.mark.parametrize("verb", ["convert", "export-onnx"])
def test_cli_refuses_weights_sharing_no_layer(tmp_path, verb):
    net, _ = files_of(tmp_path, "conv", TWO_CONVS)
    _, other = files_of(tmp_path, "other", OTHER)
    result = run_cli(verb, net, other, "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "shares no layer" in lines[0], result.stderr
    assert "conv.prototxt" in lines[0] and "other.caffemodel" in lines[0]
    assert not (tmp_path / "out").exists()


def test_weights_holding_nothing_are_refused():
    with pytest.raises(CaffeCompatError, match="shares no layer.*the weights hold no layer with blobs"):
        CaffeNet(build_graph(parse(TWO_CONVS)), {})


def test_inspect_refuses_weights_sharing_no_layer(tmp_path, capsys):
    net, weights = files_of(tmp_path, "conv", TWO_CONVS)
    _, other = files_of(tmp_path, "other", OTHER)
    assert main(["inspect", str(net), str(other)]) == 2
    stderr = capsys.readouterr().err
    assert "shares no layer" in stderr and "conv.prototxt" in stderr and "other.caffemodel" in stderr
    assert main(["inspect", str(net), str(weights)]) == 0


def test_partial_weights_list_the_layers_left_out():
    with pytest.raises(CaffeCompatError, match=r"no weights for 1 of the 2 layers.*: conv2 .*--allow-missing-weights"):
        CaffeNet(build_graph(parse(TWO_CONVS)), conv_weights("conv1"))


def test_allow_missing_weights_warns_once_with_the_count():
    torch.manual_seed(0)
    with pytest.warns(UserWarning) as caught:
        net = CaffeNet(build_graph(parse(TWO_CONVS)), conv_weights("conv1"), allow_missing_weights=True)
    assert [str(w.message) for w in caught if "get no weights" in str(w.message)] == [
        "the weights: 1 layer(s) of net '' get no weights and keep their filler values: conv2"]
    weights = net.caffe_weights()
    assert np.all(weights["conv1"][0] == 0.5)
    assert weights["conv2"][0].std() > 0.01  # its gaussian filler, not zeros or left-over memory


def test_layers_only_in_the_weights_are_one_note():
    weights = {**conv_weights("conv1", "conv2"), "loss": [np.zeros(3, np.float32)], "aux": [np.zeros(1, np.float32)]}
    with pytest.warns(UserWarning, match=r"2 layer\(s\) not in the TEST net were skipped.*loss, aux"):
        net = CaffeNet(build_graph(parse(TWO_CONVS)), weights)
    assert np.all(net.caffe_weights()["conv2"][1] == 0.5)


def test_load_caffe_weights_after_building_checks_the_same(tmp_path):
    net = CaffeNet(build_graph(parse(TWO_CONVS)))
    with pytest.raises(CaffeCompatError, match="'other.caffemodel' shares no layer"):
        net.load_caffe_weights({"fc": [np.zeros((5, 192), np.float32)]}, source="other.caffemodel")
    with pytest.raises(CaffeCompatError, match="no weights for 1 of the 2"):
        net.load_caffe_weights(conv_weights("conv2"))
    with pytest.warns(UserWarning, match="1 layer"):
        net.load_caffe_weights(conv_weights("conv2"), allow_missing=True)
    assert np.all(net.caffe_weights()["conv2"][0] == 0.5)


def test_a_shared_blob_is_set_through_the_layer_that_has_weights():
    text = INPUT + """
    layer { name: "a" type: "Convolution" bottom: "data" top: "a" param { name: "w" } param { name: "b" }
      convolution_param { num_output: 4 kernel_size: 3 } }
    layer { name: "b" type: "Convolution" bottom: "data" top: "b" param { name: "w" } param { name: "b" }
      convolution_param { num_output: 4 kernel_size: 3 } }"""
    weights = {"a": [np.full((4, 3, 3, 3), 0.5, np.float32), np.zeros(4, np.float32)]}
    net = CaffeNet(build_graph(parse(text)), weights)  # 'b' shares both blobs of 'a': nothing is missing
    assert np.all(net.caffe_weights()["b"][0] == 0.5)


def test_given_weights_skip_the_fillers(monkeypatch):
    real = []

    def counting_fill(*args, **kwargs):
        values = fill(*args, **kwargs)
        real.append(not values.is_meta)
        return values

    fill = fillers.fill
    monkeypatch.setattr(fillers, "fill", counting_fill)
    CaffeNet(build_graph(parse(TWO_CONVS)), conv_weights("conv1", "conv2"))
    assert real and not any(real)  # sized on the meta device, never drawn
    real.clear()
    CaffeNet(build_graph(parse(TWO_CONVS)))
    assert real.count(True) == 4


def test_train_refuses_weights_sharing_no_layer_and_takes_the_flag(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "solver"
    shutil.copytree(require(REFERENCE / "nets" / "solver"), folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    _, other = files_of(tmp_path, "other", OTHER)
    result = run_cli("train", "solver.prototxt", "--weights", other, "--max-iter", "1", cwd=folder)
    assert result.returncode == 2, result.stderr
    assert "shares no layer" in result.stderr and "other.caffemodel" in result.stderr
    init = read_caffemodel(folder / "init.caffemodel")
    partial = {name: arrays for name, arrays in weights_of(init).items() if name != "fc_embedding"}
    write_caffemodel(with_weights(init.net, partial), folder / "partial.caffemodel")
    monkeypatch.chdir(folder)
    assert main(["train", "solver.prototxt", "--weights", "partial.caffemodel", "--max-iter", "1"]) == 2
    assert "fc_embedding" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"1 layer\(s\) of net .* get no weights.*: fc_embedding"):
        assert main(["train", "solver.prototxt", "--weights", "partial.caffemodel", "--max-iter", "1",
                     "--allow-missing-weights"]) == 0


def test_extract_and_compare_refuse_weights_sharing_no_layer(tmp_path, capsys):
    solver = require(REFERENCE / "nets" / "solver")
    net_file = read_prototxt(solver / "train.prototxt")
    net_file.net.layer[0].include[0].phase = 1  # the Data layer in TEST, the loss dropped: an extraction net
    del net_file.net.layer[-1]
    write_prototxt(net_file.net, tmp_path / "extract.prototxt")
    _, other = files_of(tmp_path, "other", OTHER)
    assert main(["extract", str(tmp_path / "extract.prototxt"), str(other), "--data", str(solver / "train_lmdb"),
                 "-o", str(tmp_path / "f.npz")]) == 2
    stderr = capsys.readouterr().err
    assert "shares no layer" in stderr and "extract.prototxt" in stderr and "other.caffemodel" in stderr
    assert not (tmp_path / "f.npz").exists()
    case = require(REFERENCE / "layers") / "conv_basic"
    assert main(["compare", f"{case}.prototxt", str(other), f"{case}.npz"]) == 2
    stderr = capsys.readouterr().err
    assert "shares no layer" in stderr and "conv_basic.prototxt" in stderr and "other.caffemodel" in stderr


# ---------------------------------------------------------------- weights holding NaN or inf

def poisoned(path, layer: str, value: float):
    """A copy of the caffemodel at `path` with one value of `layer`'s first blob set to `value`."""
    model = read_caffemodel(path)
    weights = {name: [a.copy() for a in arrays] for name, arrays in weights_of(model).items()}
    weights[layer][0].reshape(-1)[1] = value
    out = path.with_name(f"{layer}_{value}.caffemodel")
    write_caffemodel(with_weights(model.net, weights), out)
    return out


def test_convert_warns_in_one_line_naming_the_first_layer(tmp_path):
    net, weights = files_of(tmp_path, "conv", TWO_CONVS)
    nan_weights = poisoned(poisoned(weights, "conv2", np.nan), "conv1", np.inf)
    result = run_cli("convert", net, nan_weights, "-o", tmp_path / "out.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"caffe-compat: warning: weights of layer 'conv1' ({nan_weights}) hold NaN/inf; "
                             f"outputs will not be finite\n")


def test_export_onnx_and_extract_warn_on_nan_weights(tmp_path):
    net, weights = files_of(tmp_path, "conv", TWO_CONVS)
    nan_weights = poisoned(weights, "conv2", np.nan)
    message = rf"weights of layer 'conv2' \({nan_weights}\) hold NaN/inf; outputs will not be finite"
    with pytest.warns(UserWarning, match=message):
        assert main(["export-onnx", str(net), str(nan_weights), "-o", str(tmp_path / "out.onnx")]) == 0
    solver = require(REFERENCE / "nets" / "solver")
    net_file = read_prototxt(solver / "train.prototxt")
    net_file.net.layer[0].include[0].phase = 1  # the Data layer in TEST, the loss dropped: an extraction net
    del net_file.net.layer[-1]
    write_prototxt(net_file.net, tmp_path / "extract.prototxt")
    shutil.copy(solver / "init.caffemodel", tmp_path / "init.caffemodel")
    nan_weights = poisoned(tmp_path / "init.caffemodel", "fc_embedding", np.nan)
    with pytest.warns(UserWarning, match=rf"weights of layer 'fc_embedding' \({nan_weights}\) hold NaN/inf"):
        assert main(["extract", str(tmp_path / "extract.prototxt"), str(nan_weights), "--data",
                     str(solver / "train_lmdb"), "-o", str(tmp_path / "f.npz")]) == 0


def test_finite_weights_give_no_such_warning(tmp_path, recwarn):
    net, weights = files_of(tmp_path, "conv", TWO_CONVS)
    load_net(net, weights)
    # Finite, but its squares overflow float32: still finite weights.
    load_net(net, poisoned(weights, "conv1", 1e30))
    assert not [w for w in recwarn if "NaN" in str(w.message)]


# ---------------------------------------------------------------- shared params

def test_param_name_on_a_layer_without_parameters_is_an_error():
    text = INPUT + """
    layer { name: "relu" type: "ReLU" bottom: "data" top: "r" param { name: "w" } }
    layer { name: "conv" type: "Convolution" bottom: "r" top: "c" param { name: "w" }
      convolution_param { num_output: 4 kernel_size: 3 } }"""
    with pytest.raises(CaffeCompatError, match=r"layer 'relu' \(ReLU\): 1 param specification\(s\) for 0"):
        CaffeNet(build_graph(parse(text)))
    shared_with_relu = text.replace('param { name: "w" } }\n    layer { name: "conv"', '}\n    layer { name: "conv"')
    CaffeNet(build_graph(parse(shared_with_relu)))  # the name alone, on the conv, is fine


# ---------------------------------------------------------------- resource bombs

HUGE_FC = INPUT.replace("dim: 8 dim: 8", "dim: 8 dim: 4") + """
layer { name: "ip_huge" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 10000000 } }
"""
HUGE_CONV = INPUT + """
layer { name: "conv_huge" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4000000000 kernel_size: 3 } }
"""


def test_a_net_bigger_than_max_memory_names_the_layer_and_size():
    with pytest.raises(CaffeCompatError, match=r"layer 'ip_huge' \(InnerProduct\): its parameters need 3\.6 GiB.*"
                                               r"max_memory.*1\.0 GiB"):
        CaffeNet(build_graph(parse(HUGE_FC)), max_memory="1G")


def test_a_net_bigger_than_the_machine_fails_before_allocating():
    # 4e9 x 3 x 3 x 3 weights and 4e9 biases, float32: more than any machine running these tests has free
    with pytest.raises(CaffeCompatError, match=r"layer 'conv_huge' \(Convolution\).*417\.2 GiB.*memory available"):
        CaffeNet(build_graph(parse(HUGE_CONV)))


def test_under_an_address_space_limit_the_error_is_ours():
    code = textwrap.dedent(f"""
        import resource, sys
        from google.protobuf import text_format
        from caffe_compat.errors import CaffeCompatError
        from caffe_compat.graph import build_graph
        from caffe_compat.io.schema import messages
        from caffe_compat.net import CaffeNet
        text = {HUGE_FC!r}.replace("dim: 2 dim: 3 dim: 8 dim: 4", "dim: 1 dim: 5 dim: 8 dim: 8")
        small, net = messages("bvlc").NetParameter(), messages("bvlc").NetParameter()
        text_format.Parse(text.replace("10000000", "1"), small)
        text_format.Parse(text, net)
        CaffeNet(build_graph(small))  # every module the build needs is imported before the limit
        used = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (used + 2 ** 30, resource.RLIM_INFINITY))
        for max_memory in (None, "1T"):  # the check, then (told there is room) the allocator's refusal
            try:
                CaffeNet(build_graph(net), max_memory=max_memory)
            except CaffeCompatError as err:
                print(err)
        sys.exit(2)
    """)
    result = run_python(code, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    # 10M x 320 weights and 10M biases: 12.0 GiB, where 1 GiB of address space is left
    assert "layer 'ip_huge' (InnerProduct): its parameters need 12.0 GiB" in result.stdout
    assert "more than the memory available (1.0 GiB)" in result.stdout
    assert "layer 'ip_huge' (InnerProduct): cannot allocate its parameters" in result.stdout


def test_cli_max_memory_refuses_and_bad_sizes_are_one_line(tmp_path, capsys):
    prototxt = tmp_path / "huge.prototxt"
    prototxt.write_text(HUGE_FC)
    out = str(tmp_path / "m.pt")
    assert main(["convert", str(prototxt), "--random-init", "--max-memory", "1G", "-o", out]) == 2
    stderr = capsys.readouterr().err
    assert "'ip_huge'" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    for option, value in (("--max-memory", "lots"), ("--input-shape", "data=1,x"), ("--input-shape", "1,3,0,8")):
        assert main(["convert", str(prototxt), "--random-init", option, value, "-o", out]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and option in lines[0] and repr(value) in lines[0], lines
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("shape", [(2, -3, 8, 8), ("2", 3), 7, (2.5, 3)])
def test_an_input_shape_that_is_not_sizes_names_the_input(shape):
    with pytest.raises(CaffeCompatError, match="input 'data' has shape"):
        CaffeNet(build_graph(parse(TWO_CONVS)), input_shapes={"data": shape})


def test_sizes_and_shapes_parse():
    assert parse_size("8G") == 8 * 2 ** 30 and parse_size("1.5GB") == 3 * 2 ** 29 and parse_size("4096") == 4096
    assert parse_size("512m") == 512 * 2 ** 20
    with pytest.raises(CaffeCompatError):
        parse_size("0")
    assert parse_input_shapes(["data=1,3,227,227", "label=1"]) == {"data": (1, 3, 227, 227), "label": (1,)}
    with pytest.raises(CaffeCompatError):
        parse_input_shapes(["=1,3"])
    # Without BLOB= (export-onnx's form) the entry shapes the net's image input.
    assert parse_input_shapes(["2,3,8,8"], parse(TWO_CONVS)) == {"data": (2, 3, 8, 8)}
    with pytest.raises(CaffeCompatError, match="or N,C,H,W for the image input"):
        parse_input_shapes(["2,3,8,8"])


def test_allow_missing_weights_is_reproducible_and_states_its_seed(tmp_path):
    """Layers the weights leave unset draw their fillers from --seed (default 0): two runs
    write the same caffemodel, another seed another one, and the seed is stated."""
    prototxt, _ = files_of(tmp_path, "two", TWO_CONVS)
    partial = tmp_path / "partial.caffemodel"
    write_caffemodel(with_weights(parse(TWO_CONVS), conv_weights("conv1")), partial)

    def convert(out, *more):
        result = run_cli("convert", prototxt, partial, "--allow-missing-weights", "-o", out, *more, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stderr, weights_of(read_caffemodel(tmp_path / out))["conv2"][0]

    note, first = convert("a.caffemodel")
    assert "drawn with --seed 0" in note
    _, again = convert("b.caffemodel")
    note, other = convert("c.caffemodel", "--seed", "5")
    assert "drawn with --seed 5" in note
    assert np.array_equal(first, again) and not np.array_equal(first, other)
