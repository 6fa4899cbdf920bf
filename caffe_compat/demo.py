"""`caffe-compat demo`: the product's main path on a built-in example, end to end,
with nothing downloaded: a small embedder in the paper's style is written as Caffe
files, read back and inspected."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from google.protobuf import text_format

from .inspect import format_inspection, inspect_net
from .io.files import read_caffemodel, read_prototxt, weights_of, with_weights, write_caffemodel, write_prototxt
from .io.schema import messages

# The paper's embedder shrunk: conv, ReLU, max pool, LRN, conv, global average pool,
# fc_embedding (lr_mult 10/20), the lifted loss in TRAIN.
DEMO_NET = """
name: "demo_embedder"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 8 dim: 3 dim: 32 dim: 32 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 8 } } include { phase: TRAIN } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 stride: 2
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 32 kernel_size: 3 pad: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc_embedding" type: "InnerProduct" bottom: "pool2" top: "fc_embedding"
  param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 }
  inner_product_param { num_output: 16 weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0 } } }
layer { name: "loss" type: "LiftedStructSimilaritySoftmaxLoss" bottom: "fc_embedding" bottom: "label" top: "loss"
  lifted_struct_sim_softmax_loss_param { margin: 1 } include { phase: TRAIN } }
"""

DEMO_BLOB_SHAPES = {
    "conv1": [(16, 3, 3, 3), (16,)],
    "conv2": [(32, 16, 3, 3), (32,)],
    "fc_embedding": [(16, 32), (16,)],
}


def demo_net():
    net = messages("lifted").NetParameter()
    text_format.Parse(DEMO_NET, net)
    return net


def demo_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {name: [(rng.standard_normal(shape) * 0.1).astype(np.float32) for shape in shapes]
            for name, shapes in DEMO_BLOB_SHAPES.items()}


def _step(title: str) -> None:
    print(f"\n== {title}")


def run_demo(workdir: Optional[str] = None) -> int:
    with tempfile.TemporaryDirectory(prefix="caffe-compat-demo-") as tmp:
        folder = Path(workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        _step(f"1. write a small embedder as Caffe files in {folder}")
        net = demo_net()
        weights = demo_weights()
        write_prototxt(net, folder / "demo.prototxt")
        write_caffemodel(with_weights(net, weights), folder / "demo.caffemodel")
        print(f"wrote demo.prototxt and demo.caffemodel ({(folder / 'demo.caffemodel').stat().st_size:,} bytes)")

        _step("2. read both back (no Caffe needed) and check the round trip")
        text_back = read_prototxt(folder / "demo.prototxt")
        model_back = read_caffemodel(folder / "demo.caffemodel")
        back = weights_of(model_back)
        same = all(np.array_equal(a, b) for name in weights for a, b in zip(weights[name], back[name]))
        print(f"prototxt dialect: {text_back.dialect}; caffemodel dialect: {model_back.dialect}; "
              f"weights identical: {same}")
        if not same or text_back.net != net:
            print("round trip FAILED")
            return 1

        _step("3. inspect")
        print(format_inspection(inspect_net(folder / "demo.prototxt", folder / "demo.caffemodel", phase="TRAIN")))
    return 0
