"""`caffe-compat time` and `caffe-compat test` on a small classifier fed by a tiny LMDB."""
import re

import numpy as np
import pytest
import torch

from caffe_compat.tools.timing import load_for_running, score_net, time_net
from conftest import run_cli

pytest.importorskip("lmdb", reason="the test extra installs lmdb")

RECORDS, BATCH = 12, 4

NET = """name: "tiny_classifier"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""


@pytest.fixture
def classifier(tmp_path):
    from caffe_compat.io.datum import write_datum_lmdb
    from caffe_compat.io.files import read_prototxt, with_weights, write_caffemodel
    from caffe_compat.loading import load_net

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (RECORDS, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(RECORDS) % 3
    write_datum_lmdb(tmp_path / "lmdb", zip(images, labels.tolist()))
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(NET.format(source=tmp_path / "lmdb", batch=BATCH))
    torch.manual_seed(0)
    weights = load_net(net_path).caffe_weights()
    write_caffemodel(with_weights(read_prototxt(net_path).net, weights), tmp_path / "net.caffemodel")
    return net_path, tmp_path / "net.caffemodel", images, labels, weights


def _reference_scores(images, labels, weights):
    """Accuracy and mean SoftmaxWithLoss of the whole LMDB, computed here with torch."""
    x = torch.from_numpy(images).float() * 0.00390625
    conv_w, conv_b = (torch.from_numpy(a) for a in weights["conv"])
    ip_w, ip_b = (torch.from_numpy(a) for a in weights["ip"])
    hidden = torch.relu(torch.nn.functional.conv2d(x, conv_w, conv_b)).flatten(1)
    logits = hidden @ ip_w.T + ip_b
    target = torch.from_numpy(labels)
    accuracy = float((logits.argmax(1) == target).double().mean())
    losses = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none").reshape(-1, BATCH)
    return accuracy, float(losses.mean(1).mean())


def test_test_prints_each_batch_and_the_means(classifier):
    net_path, weights_path, images, labels, weights = classifier
    lines = []
    result = score_net(net_path, weights_path, iterations=RECORDS // BATCH, emit=lines.append)
    accuracy, loss = _reference_scores(images, labels, weights)
    assert lines[0] == "Running for 3 iterations."
    assert [line.split(" = ")[0] for line in lines[1:7]] == ["Batch 0, accuracy", "Batch 0, loss",
                                                             "Batch 1, accuracy", "Batch 1, loss",
                                                             "Batch 2, accuracy", "Batch 2, loss"]
    assert result["outputs"]["accuracy"] == [pytest.approx(accuracy, abs=1e-6)]
    assert result["outputs"]["loss"] == [pytest.approx(loss, rel=1e-5)]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert lines[-3] == f"Loss: {result['loss']:.6g}"
    assert lines[-2] == f"accuracy = {result['outputs']['accuracy'][0]:.6g}"
    mean_loss = result["outputs"]["loss"][0]
    assert lines[-1] == f"loss = {mean_loss:.6g} (* 1 = {mean_loss:.6g} loss)"


def test_test_summarises_a_blob_larger_than_a_scalar(classifier, tmp_path):
    """An embedding-like output is one line per batch (shape, mean, range), not one per
    element; --all-values prints each element, as caffe test does."""
    net_path, weights_path, *_ = classifier
    text = net_path.read_text()
    headless = tmp_path / "headless.prototxt"
    headless.write_text(text[:text.index('layer { name: "loss"')])
    lines = []
    result = score_net(headless, weights_path, iterations=2, emit=lines.append)
    ip_lines = [line for line in lines if re.match(r"(Batch \d+, )?ip[: ]", line)]
    assert [line.split(":")[0] for line in ip_lines] == ["Batch 0, ip", "Batch 1, ip", "ip"]
    assert f"shape {BATCH}x3, mean " in ip_lines[0]
    assert len(result["outputs"]["ip"]) == BATCH * 3
    every = []
    score_net(headless, weights_path, iterations=2, emit=every.append, all_values=True)
    assert sum(line.startswith("Batch 0, ip = ") for line in every) == BATCH * 3


def test_test_prints_output_names_escaped(classifier):
    net_path, weights_path, *_ = classifier
    net_path.write_text(net_path.read_text().replace('top: "accuracy"', 'top: "acc\\nforged\\x1b[31m"'))
    lines = []
    score_net(net_path, weights_path, iterations=1, emit=lines.append)
    assert not any("\x1b" in line or "\n" in line for line in lines)
    assert lines[1].startswith("Batch 0, acc\\nforged\\x1b[31m = ") and lines[-2].startswith("acc\\nforged\\x1b[31m = ")


def test_time_prints_every_layer_and_the_totals(classifier, tmp_path):
    net_path, weights_path, *_ = classifier
    result = run_cli("time", net_path, weights_path, "--iterations", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[:3] == ["Performing Forward", out[1], "Performing Backward"] and out[1].startswith("Initial loss: ")
    assert out[3:5] == ["*** Benchmark begins ***", "Testing for 3 iterations."]
    assert len([line for line in out if line.startswith("Iteration: ")]) == 3
    for layer in ("data", "conv", "relu", "ip", "loss"):  # TRAIN phase: no accuracy layer
        assert sum(bool(re.fullmatch(rf" *{layer}\t(forward|backward): \S+ ms\.", line)) for line in out) == 2
    assert not any("accuracy" in line for line in out)
    assert re.fullmatch(r"Average Forward-Backward: \S+ ms\.", out[-3]) and out[-1] == "*** Benchmark ends ***"
    data_backward = next(line for line in out if re.fullmatch(r" *data\tbackward: .*", line))
    assert data_backward.endswith("backward: 0 ms.")  # nothing flows back into a data layer


def test_time_backward_reaches_every_layer_with_parameters(classifier):
    net_path, weights_path, *_ = classifier
    summary = time_net(net_path, weights_path, iterations=2, emit=lambda line: None)
    backward = {name: b for name, _, b in summary["layers"]}
    assert backward["conv"] > 0 and backward["ip"] > 0 and backward["loss"] > 0


def test_batch_size_overrides_inputs_and_data_layers(classifier, tmp_path):
    net_path, *_ = classifier
    net, inputs = load_for_running(net_path, None, "TRAIN", "cpu", batch_size=6)
    try:
        assert net.blob_shapes["data"][0] == 6
    finally:
        from caffe_compat.data import close_data_layers

        close_data_layers(net)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }\n'
                      'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                      'inner_product_param { num_output: 3 } }')
    net, inputs = load_for_running(deploy, None, "TEST", "cpu", batch_size=7)
    assert inputs["x"].shape == (7, 5) and not inputs["x"].any()  # zeros, as Caffe's blobs start


def test_bad_input_is_one_line(classifier, tmp_path, capsys):
    from caffe_compat.cli.main import main

    net_path, weights_path, *_ = classifier
    absent = tmp_path / "absent.prototxt"
    absent.write_text(net_path.read_text().replace(str(tmp_path / "lmdb"), "nowhere_lmdb"))
    for args, message in ((["test", absent, weights_path], "layer 'data' (Data): source 'nowhere_lmdb' is absent"),
                          (["time", net_path, "--iterations", 0], "--iterations 0: must be at least 1"),
                          (["time", net_path, "--batch-size", 0], "--batch-size 0: must be at least 1"),
                          (["time", net_path, "--device", "gpu"], "--device 'gpu'")):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
