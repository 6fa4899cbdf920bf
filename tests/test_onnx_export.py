"""ONNX export: checked models whose ONNX Runtime outputs match Caffe's recorded numbers
(1e-5 relative for a layer fixture or a few layers, 1e-4 through GoogLeNet: the reference
README's tolerances) and our PyTorch net (1e-5 relative), for every layer fixture, GoogLeNet
and the paper's embedder; symbolic batch; the deploy-net rewrite; metadata; the CLI."""
import glob
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from caffe_compat.cli.main import main
from caffe_compat.converters.artifact import load as load_model
from caffe_compat.converters.onnx import L2_SUFFIX, default_outputs, export_onnx, load_for_export
from caffe_compat.converters.preprocess import preprocess_metadata
from caffe_compat.deploy import deploy_net
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.files import read_binaryproto, read_prototxt, with_weights, write_caffemodel
from caffe_compat.layers import REGISTRY
from caffe_compat.net import CaffeNet
from conftest import PAPER_MODEL, REFERENCE, require
import layer_harness

if importlib.util.find_spec("onnxruntime") is None and not os.environ.get("CI"):
    pytest.skip("needs onnxruntime (pip install 'caffe-compat[onnxruntime]')", allow_module_level=True)
import onnxruntime as ort  # noqa: E402  (CI always has it: there a missing runtime fails)

LAYER_CASES = sorted(Path(p).stem for p in glob.glob(str(REFERENCE / "layers" / "*.npz")))
PAPER = PAPER_MODEL
EXTRACT = PAPER / "extract_googlenet_ebay_feature_embed64.prototxt"
TRAIN_VAL = PAPER / "train_val_googlenet_finetune_liftedstructsim_softmax_pair_m128_multilabel_embed64.prototxt"
TORCH_RTOL = 1e-5
CAFFE_LAYER_RTOL = 1e-5  # one or a few layers
CAFFE_RTOL = 1e-4  # through the whole of GoogLeNet
ZERO_ATOL = 1e-7  # where the reference is exactly zero


def run_onnx(model: onnx.ModelProto, feeds: dict) -> dict:
    """The model's outputs by name, from layer_harness.run_onnx fed by input name."""
    outputs = layer_harness.run_onnx(model, [feeds[i.name] for i in model.graph.input])
    return dict(zip((o.name for o in model.graph.output), outputs))


def assert_close(ours, ref, rtol, what):
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64).reshape(ours.shape)
    assert (np.isnan(ours) == np.isnan(ref)).all(), f"{what}: NaN in different places"
    err = np.abs(ours - ref)[~np.isnan(ref)]
    scale = np.abs(ref[~np.isnan(ref)]).max() if err.size else 0.0
    if scale == 0:
        assert err.max(initial=0) <= ZERO_ATOL, f"{what}: {err.max()} where the reference is zero"
    else:
        assert err.max() / scale <= rtol, f"{what}: relative error {err.max() / scale:.3e} > {rtol}"


def torch_outputs(net: CaffeNet, feeds: dict, blobs) -> dict:
    with torch.no_grad():
        values = net({k: torch.from_numpy(v) for k, v in feeds.items()}, blobs=list(blobs))
    return {k: v.numpy() for k, v in values.items()}


def check(model: onnx.ModelProto):
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- layer fixtures

def _lacking_emitters(net: CaffeNet) -> dict:
    return {node.name: node.type for node in net.graph.layers
            if node.type != "Input" and REGISTRY[node.type].to_onnx is None}


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_case(case, opset):
    folder = require(REFERENCE / "layers")
    weights = folder / f"{case}.caffemodel"
    net, _ = load_for_export(folder / f"{case}.prototxt", weights if weights.exists() else None)
    ref = dict(np.load(folder / f"{case}.npz"))
    outputs = [k[len("blob/"):] for k in ref if k.startswith("blob/") and k[len("blob/"):] not in net.input_names]
    lacking = _lacking_emitters(net)
    if lacking:
        # One error naming every layer that has no ONNX mapping.
        with pytest.raises(CaffeCompatError, match="no ONNX mapping") as err:
            export_onnx(net, outputs, opset=opset)
        for name, layer_type in lacking.items():
            assert f"'{name}' ({layer_type})" in str(err.value)
        return
    model = check(export_onnx(net, outputs, opset=opset))
    feeds = {i.name: ref[f"input/{i.name}"] for i in model.graph.input}
    ours = run_onnx(model, feeds)
    theirs = torch_outputs(net, feeds, outputs)
    for blob in outputs:
        assert_close(ours[blob], ref[f"blob/{blob}"], CAFFE_LAYER_RTOL, f"{case} {blob} vs Caffe")
        assert_close(ours[blob], theirs[blob], TORCH_RTOL, f"{case} {blob} vs PyTorch")


def test_in_place_versions_get_fresh_names():
    folder = require(REFERENCE / "layers")
    net, _ = load_for_export(folder / "inplace_chain.prototxt", folder / "inplace_chain.caffemodel")
    model = check(export_onnx(net, ["conv", "ip"]))
    written = [name for node in model.graph.node for name in node.output]
    # conv, then ReLU and Dropout rewriting it: the last version keeps the blob's name.
    assert {"conv:conv", "conv:relu", "conv", "ip"} <= set(written)
    assert len(written) == len(set(written))
    assert [o.name for o in model.graph.output] == ["conv", "ip"]


# ---------------------------------------------------------------- GoogLeNet

@pytest.fixture(scope="module")
def googlenet():
    nets = require(REFERENCE / "nets")
    net, metadata = load_for_export(nets / "googlenet_deploy.prototxt", nets / "googlenet_deploy.caffemodel")
    return net, metadata, dict(np.load(nets / "googlenet_deploy.npz"))


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("blob", ["prob", "loss3/classifier"])
def test_googlenet_matches_caffe_and_pytorch(googlenet, blob, opset):
    net, metadata, ref = googlenet
    model = check(export_onnx(net, [blob], opset=opset, metadata=metadata))
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == [blob]
    feeds = {"data": ref["input/data"]}
    ours = run_onnx(model, feeds)[blob]
    assert_close(ours, ref[f"blob/{blob}"], CAFFE_RTOL, f"{blob} vs Caffe")
    assert_close(ours, torch_outputs(net, feeds, [blob])[blob], TORCH_RTOL, f"{blob} vs PyTorch")


def test_googlenet_every_recorded_blob(googlenet):
    net, _, ref = googlenet
    blobs = [k[len("blob/"):] for k in ref if k.startswith("blob/")]
    ours = run_onnx(check(export_onnx(net, blobs)), {"data": ref["input/data"]})
    for blob in blobs:
        assert_close(ours[blob], ref[f"blob/{blob}"], CAFFE_RTOL, blob)


def test_default_output_and_cut(googlenet):
    net, _, ref = googlenet
    assert default_outputs(net) == ["prob"]
    model = check(export_onnx(net, ["pool1/norm1"]))
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "MaxPool", "LRN"]
    ours = run_onnx(model, {"data": ref["input/data"]})["pool1/norm1"]
    assert_close(ours, ref["blob/pool1/norm1"], CAFFE_LAYER_RTOL, "pool1/norm1")  # four layers deep


def test_batch_1_and_5(googlenet):
    net, _, ref = googlenet
    model = check(export_onnx(net, ["loss3/classifier"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (one,) = session.run(None, {"data": ref["input/data"]})
    assert_close(one, ref["blob/loss3/classifier"], CAFFE_RTOL, "batch 1")
    batch = np.random.default_rng(5).uniform(-60, 60, (5, 3, 224, 224)).astype(np.float32)
    (five,) = session.run(None, {"data": batch})
    assert five.shape == (5, 1000)
    assert_close(five, torch_outputs(net, {"data": batch}, ["loss3/classifier"])["loss3/classifier"],
                 TORCH_RTOL, "batch 5")


def test_static_batch(googlenet):
    net, _, _ = googlenet
    model = check(export_onnx(net, ["prob"], static_batch=True))
    shape = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert shape(model.graph.input[0]) == [1, 3, 224, 224] and shape(model.graph.output[0]) == [1, 1000]


def test_opset_out_of_range(googlenet):
    with pytest.raises(CaffeCompatError, match="opset 12"):
        export_onnx(googlenet[0], opset=12)


def test_unknown_output_blob(googlenet):
    with pytest.raises(CaffeCompatError, match="'nope'"):
        export_onnx(googlenet[0], ["prob", "nope"])


# ---------------------------------------------------------------- the paper's embedder

@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """The paper's extraction net with random weights from its fillers, saved as a caffemodel."""
    net_file = read_prototxt(require(EXTRACT))
    torch.manual_seed(0)
    net = CaffeNet(build_graph(deploy_net(net_file.net), "TEST", net_file.dialect))
    weights = tmp_path_factory.mktemp("paper") / "embed64.caffemodel"
    write_caffemodel(with_weights(net_file.net, net.caffe_weights()), weights)
    return net, weights


def test_paper_embedder_l2_normalized(paper_files, tmp_path):
    net, weights = paper_files
    out = tmp_path / "embed64.onnx"
    with pytest.warns(UserWarning, match=r"mean file /cvgl/\S+: not readable here, so no mean is recorded; "
                                         r"give --mean-value"):
        assert main(["export-onnx", str(EXTRACT), str(weights), "-o", str(out), "--l2-normalize"]) == 0
    model = check(onnx.load(str(out)))
    output = "fc_embedding" + L2_SUFFIX
    assert [o.name for o in model.graph.output] == [output]
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 227, 227]
    batch = np.random.default_rng(0).uniform(-120, 130, (3, 3, 227, 227)).astype(np.float32)
    ours = run_onnx(model, {"data": batch})[output]
    embedding = torch_outputs(net, {"data": batch}, ["fc_embedding"])["fc_embedding"]
    expected = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    assert ours.shape == (3, 64)
    assert_close(ours, expected, TORCH_RTOL, "normalized embedding")
    props = {p.key: p.value for p in model.metadata_props}
    assert props["preprocess.crop_size"] == "227" and props["preprocess.channel_order"] == "BGR"
    assert props["preprocess.input"] == "data"  # the data layer's top, which the export takes as its input
    assert props["preprocess.mean_file"] == "/cvgl/u/hsong/cache/imagenet_mean.binaryproto"
    assert "not readable" in props["preprocess.mean_file_error"]
    assert props["source.prototxt_sha256"] == hashlib.sha256(EXTRACT.read_bytes()).hexdigest()


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_l2_normalize_keeps_zero_rows(tmp_path, opset):
    proto = tmp_path / "relu.prototxt"
    proto.write_text('name: "r" layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } }\n'
                     'layer { name: "relu" type: "ReLU" bottom: "x" top: "y" }\n')
    net = CaffeNet(build_graph(read_prototxt(proto).net, "TEST"))
    model = check(export_onnx(net, ["y"], opset=opset, l2_normalize=True))
    rows = np.array([[-1, -2, -3, -4], [3, -1, 4, 0]], dtype=np.float32)
    ours = run_onnx(model, {"x": rows})["y" + L2_SUFFIX]
    np.testing.assert_allclose(ours, [[0, 0, 0, 0], [0.6, 0, 0.8, 0]], atol=1e-7)


def test_train_val_exports_its_embedding(paper_files, tmp_path):
    # The training net: TRAIN-only Data layer and the lifted loss on its label.
    _, weights = paper_files
    out = tmp_path / "train_val.onnx"
    with pytest.warns(UserWarning, match="not readable here, so no mean is recorded"):
        assert main(["export-onnx", str(require(TRAIN_VAL)), str(weights), "-o", str(out)]) == 0
    model = check(onnx.load(str(out)))
    assert [o.name for o in model.graph.output] == ["fc_embedding"]
    assert "Dropout" not in {n.op_type for n in model.graph.node}


# ---------------------------------------------------------------- deploy nets and metadata

def test_deploy_net_of_the_training_net():
    net = deploy_net(read_prototxt(require(TRAIN_VAL)).net)
    first = net.layer[0]
    assert (first.type, list(first.top), list(first.input_param.shape[0].dim)) == ("Input", ["data"],
                                                                                   [128, 3, 227, 227])
    assert not len(first.include)  # the Input serves both phases
    assert "loss" not in [layer.name for layer in net.layer]
    assert "label" not in {b for layer in net.layer for b in list(layer.bottom) + list(layer.top)}


def test_deploy_net_input_shape_and_errors(tmp_path):
    folder = require(REFERENCE / "nets" / "data_layer")
    net_param = read_prototxt(folder / "data.prototxt").net
    with pytest.raises(CaffeCompatError, match="'data2'.*--input-shape"):
        deploy_net(net_param)
    shaped = deploy_net(net_param, (2, 3, 24, 24))
    assert [list(layer.input_param.shape[0].dim) for layer in shaped.layer] == [[2, 3, 24, 24]] * 2
    proto = tmp_path / "label_user.prototxt"
    proto.write_text('layer { name: "d" type: "Data" top: "data" top: "label" transform_param { crop_size: 4 } }\n'
                     'layer { name: "cat" type: "Concat" bottom: "data" bottom: "label" top: "both" }\n')
    with pytest.raises(CaffeCompatError, match="'cat'.*'label'"):
        deploy_net(read_prototxt(proto).net)


def test_net_built_with_data_layers_exports_through_its_deploy_net(tmp_path):
    folder = require(REFERENCE / "nets" / "data_layer")
    proto = tmp_path / "with_data.prototxt"
    proto.write_text(
        f'layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}\n'
        f'  transform_param {{ crop_size: 24 scale: 0.5 mean_file: "{folder / "mean.binaryproto"}" }}\n'
        f'  data_param {{ source: "{folder / "train_lmdb"}" batch_size: 4 backend: LMDB }} }}\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
        '  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    net = CaffeNet(build_graph(read_prototxt(proto).net, "TEST"))
    model = check(export_onnx(net))
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["ip"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["preprocess.crop_size"] == "24" and props["preprocess.mean_file_shape"] == "3,32,30"
    batch = np.random.default_rng(1).uniform(-1, 1, (2, 3, 24, 24)).astype(np.float32)
    with torch.no_grad():
        expected = net.layers["ip"](torch.from_numpy(batch)).numpy()
    assert_close(run_onnx(model, {"data": batch})["ip"], expected, TORCH_RTOL, "ip")


def test_preprocess_metadata_from_mean_file_and_values():
    folder = require(REFERENCE / "nets" / "data_layer")
    net_param = read_prototxt(folder / "data.prototxt").net
    props = preprocess_metadata(net_param, folder)
    mean = read_binaryproto(folder / "mean.binaryproto").reshape(3, -1).mean(1)
    np.testing.assert_allclose([float(v) for v in props["preprocess.mean"].split(",")], mean, rtol=1e-6)
    assert props["preprocess.mean_file_shape"] == "3,32,30"
    assert props["preprocess.scale"] == "0.5" and props["preprocess.crop_size"] == "24"
    del net_param.layer[0]
    props = preprocess_metadata(net_param)
    assert props["preprocess.mean"] == "104.0,117.0,123.0" and "preprocess.crop_size" not in props


# ---------------------------------------------------------------- command line

def test_model_round_trip(tmp_path):
    nets = require(REFERENCE / "nets")
    proto, weights = nets / "googlenet_deploy.prototxt", nets / "googlenet_deploy.caffemodel"
    model_file, direct, via_model = tmp_path / "g.model", tmp_path / "direct.onnx", tmp_path / "via_model.onnx"
    assert main(["convert", str(proto), str(weights), "-o", str(model_file)]) == 0
    assert main(["export-onnx", str(model_file), "-o", str(via_model), "--output", "loss3/classifier"]) == 0
    assert main(["export-onnx", str(proto), str(weights), "-o", str(direct), "--output", "loss3/classifier"]) == 0
    feeds = {"data": np.load(nets / "googlenet_deploy.npz")["input/data"]}
    a = run_onnx(check(onnx.load(str(direct))), feeds)["loss3/classifier"]
    b = run_onnx(check(onnx.load(str(via_model))), feeds)["loss3/classifier"]
    np.testing.assert_array_equal(a, b)


def test_cli_unsupported_layers_one_line(tmp_path, capsys):
    folder = require(REFERENCE / "layers")
    out = tmp_path / "loss.onnx"
    code = main(["export-onnx", str(folder / "softmax_loss.prototxt"), str(folder / "softmax_loss.caffemodel"),
                 "-o", str(out), "--output", "loss"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert "softmax_loss.prototxt" in err[0] and "'loss' (SoftmaxWithLoss)" in err[0]


def test_cli_static_batch_and_input_shape(tmp_path):
    nets = require(REFERENCE / "nets")
    out = tmp_path / "g.onnx"
    assert main(["export-onnx", str(nets / "googlenet_deploy.prototxt"), str(nets / "googlenet_deploy.caffemodel"),
                 "-o", str(out), "--static-batch", "--input-shape", "4,3,224,224", "--opset", "13"]) == 0
    model = check(onnx.load(str(out)))
    assert model.opset_import[0].version == 13
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [4, 1000]


# ---------------------------------------------------------------- 0-d and 1-d inputs, recorded preprocessing

def test_zero_and_one_d_inputs_export_and_run(tmp_path):
    # A Scale by a 0-d blob and a Bias by a 1-d one: their second bottoms as graph inputs.
    proto = tmp_path / "scalar_inputs.prototxt"
    proto.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }\n'
                     'layer { name: "s" type: "Input" top: "s" input_param { shape { } } }\n'
                     'layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 3 } } }\n'
                     'layer { name: "scale" type: "Scale" bottom: "x" bottom: "s" top: "y" }\n'
                     'layer { name: "bias" type: "Bias" bottom: "y" bottom: "b" top: "z" }\n')
    net = CaffeNet(build_graph(read_prototxt(proto).net, "TEST"))
    model = check(export_onnx(net, ["z"]))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"x": ["N", 3, 4, 5], "s": [], "b": [3]}
    rng = np.random.default_rng(12)
    for batch in (2, 5):
        feeds = {"x": rng.normal(size=(batch, 3, 4, 5)).astype(np.float32), "s": np.array(-2.5, np.float32),
                 "b": np.array([1, 2, 3], np.float32)}
        ours = run_onnx(model, feeds)["z"]
        assert_close(ours, feeds["x"] * -2.5 + feeds["b"][None, :, None, None], TORCH_RTOL, f"batch {batch}")
        assert_close(ours, torch_outputs(net, feeds, ["z"])["z"], TORCH_RTOL, f"batch {batch} vs PyTorch")


def _props(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_deploy_net_records_caffe_convention_and_what_the_user_gives(tmp_path, capsys):
    nets = require(REFERENCE / "nets")
    proto, weights = nets / "googlenet_deploy.prototxt", nets / "googlenet_deploy.caffemodel"
    plain, given = tmp_path / "plain.onnx", tmp_path / "given.onnx"
    assert main(["export-onnx", str(proto), str(weights), "-o", str(plain), "--output", "prob"]) == 0
    props = _props(plain)
    assert (props["preprocess.channel_order"], props["preprocess.pixel_range"], props["preprocess.input"]) == \
        ("BGR", "0-255", "data")
    assert "preprocess.mean" not in props and props["preprocess.unstated"].startswith("mean: ")
    assert props["preprocess.scale"] == "1.0"  # Caffe's default: the input as given
    assert main(["export-onnx", str(proto), str(weights), "-o", str(given), "--output", "prob",
                 "--mean-value", "104", "117", "123", "--scale", "1", "--crop-size", "224"]) == 0
    props = _props(given)
    assert props["preprocess.mean"] == "104.0,117.0,123.0" and props["preprocess.mean_kind"] == "mean_value"
    assert props["preprocess.scale"] == "1.0" and props["preprocess.crop_size"] == "224"
    assert "preprocess.unstated" not in props
    capsys.readouterr()
    assert main(["export-onnx", str(proto), str(weights), "-o", str(tmp_path / "x.onnx"), "--mean-value", "1", "2"]) == 2
    assert "give 1 or 3 values" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_mean_file_override_and_model_records_travel_to_onnx(tmp_path):
    folder = require(REFERENCE / "nets" / "data_layer")
    nets = REFERENCE / "nets"
    model, out = tmp_path / "g.safetensors", tmp_path / "g.onnx"
    assert main(["convert", str(nets / "googlenet_deploy.prototxt"), str(nets / "googlenet_deploy.caffemodel"),
                 "-o", str(model), "--mean-file", str(folder / "mean.binaryproto")]) == 0
    assert main(["export-onnx", str(model), "-o", str(out), "--output", "prob", "--scale", "0.5"]) == 0
    props = _props(out)
    mean = read_binaryproto(folder / "mean.binaryproto").reshape(3, -1).mean(1)
    np.testing.assert_allclose([float(v) for v in props["preprocess.mean"].split(",")], mean, rtol=1e-6)
    assert props["preprocess.mean_file_shape"] == "3,32,30" and props["preprocess.scale"] == "0.5"
    assert "preprocess.unstated" not in props


def test_one_channel_data_layer_records_gray(tmp_path):
    proto = tmp_path / "gray.prototxt"
    proto.write_text('layer { name: "d" type: "Data" top: "data" top: "label" transform_param { scale: 0.5 } '
                     'data_param { source: "absent_lmdb" batch_size: 2 } }\n')
    net_param = read_prototxt(proto).net
    from caffe_compat.converters.preprocess import PreprocessOverrides
    props = preprocess_metadata(net_param, overrides=PreprocessOverrides(mean_values=[7]),
                                input_shapes={"data": (2, 1, 28, 28)})
    assert props["preprocess.channel_order"] == "gray" and props["preprocess.mean"] == "7.0"
    assert preprocess_metadata(net_param, input_shapes={"data": (2, 3, 28, 28)})["preprocess.channel_order"] == "BGR"


def test_an_input_blob_is_not_an_output(tmp_path):
    proto = tmp_path / "relu.prototxt"
    proto.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } }\n'
                     'layer { name: "relu" type: "ReLU" bottom: "x" top: "y" }\n')
    net = CaffeNet(build_graph(read_prototxt(proto).net, "TEST"))
    with pytest.raises(CaffeCompatError, match="'x' is an input of the net"):
        export_onnx(net, ["x"])
    # Rewritten in place by a layer, the input's blob is something the net computes.
    proto.write_text(proto.read_text().replace('top: "y"', 'top: "x"'))
    net = CaffeNet(build_graph(read_prototxt(proto).net, "TEST"))
    model = check(export_onnx(net, ["x"]))
    rows = np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], np.float32)
    np.testing.assert_array_equal(run_onnx(model, {"x": rows})[model.graph.output[0].name], np.maximum(rows, 0))


@pytest.mark.parametrize("layer_type, params", [("LSTM", ""), ("RNN", ""), ("LSTM", "expose_hidden: true")])
def test_three_step_recurrent_net_exports_checked_and_equal(tmp_path, layer_type, params):
    # The Scan's outputs need shapes ONNX can infer, or the checker refuses the net's outputs.
    def given(name, *dims):
        shape = " ".join(f"dim: {d}" for d in dims)
        return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}'

    states = [f"s{k}" for k in range(2 if layer_type == "LSTM" else 1)] if "expose_hidden" in params else []
    lines = [given("x", 3, 2, 4), given("cont", 3, 2)] + [given(s, 1, 2, 5) for s in states]
    tops = ["h"] + [f"{s}_final" for s in states]
    wiring = " ".join([f'bottom: "{b}"' for b in ["x", "cont", *states]] + [f'top: "{t}"' for t in tops])
    lines.append(f'layer {{ name: "rec" type: "{layer_type}" {wiring} recurrent_param {{ num_output: 5 {params} '
                 'weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "constant" value: 0.1 } } }')
    proto = tmp_path / "rec.prototxt"
    proto.write_text("\n".join(lines) + "\n")
    model_file, out = tmp_path / "rec.pt", tmp_path / "rec.onnx"
    assert main(["convert", str(proto), "--random-init", "-o", str(model_file)]) == 0
    assert main(["export-onnx", str(model_file), "-o", str(out), "--output", "h"]) == 0
    model = check(onnx.load(str(out)))
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(3, 2, 4)).astype(np.float32),
             "cont": np.array([[0, 0], [1, 1], [0, 1]], np.float32)}
    feeds.update({s: rng.normal(size=(1, 2, 5)).astype(np.float32) for s in states})
    expected = torch_outputs(load_model(model_file), feeds, ["h"])["h"]
    assert_close(run_onnx(model, feeds)["h"], expected, TORCH_RTOL, f"{layer_type} {params}")
