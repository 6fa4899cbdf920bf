"""`caffe-compat demo`: the product's main path on a built-in example, end to end,
with nothing downloaded: Caffe files written, read back and inspected; the paper's
GoogLeNet embedder trained a few iterations on generated images as Caffe would train
it; features extracted and evaluated as the paper does; the trained embedder exported
to ONNX and checked in ONNX Runtime."""
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


IMAGE_SIZE = 240  # stored images; the paper's net crops 227
TRAIN_CLASSES, TEST_CLASSES, IMAGES_PER_CLASS = 6, 4, 6
BATCH = 12
ITERATIONS = 3


def synthetic_images(classes: range, per_class: int, seed: int):
    """BGR uint8 C x H x W images, consecutive same-class pairs (the paper's LMDB layout):
    each class is a colour and a stripe orientation; images vary by phase and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    images = []
    for pair in range(per_class // 2):
        for c in classes:
            colour = np.array([(37 * c) % 200 + 40, (91 * c) % 200 + 40, (53 * c) % 200 + 40], np.float32)
            angle = np.pi * c / 7.0
            for _ in range(2):
                stripes = np.sin(2 * np.pi * 6 * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
                image = colour[:, None, None] * (0.75 + 0.25 * stripes) + rng.normal(0, 8, (3, IMAGE_SIZE, IMAGE_SIZE))
                images.append((np.clip(image, 0, 255).astype(np.uint8), c))
    return images


def _write_mean(images, path: Path) -> None:
    from .io.blobs import array_to_blob

    blob = messages("bvlc").BlobProto()
    array_to_blob(np.mean([a for a, _ in images], axis=0, dtype=np.float64)[None].astype(np.float32), blob)
    path.write_bytes(blob.SerializeToString())


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
        return _train_evaluate_export(folder)


def _train_evaluate_export(folder: Path) -> int:
    import time

    import torch

    from .evaluate import format_table
    from .extract import extract_features
    from .io.datum import write_datum_lmdb
    from .io.files import read_caffemodel
    from .metrics import evaluate
    from .recipes import paper_net, paper_solver
    from .solver import train

    _step(f"4. generate a dataset: {TRAIN_CLASSES} training and {TEST_CLASSES} unseen test classes, "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} BGR images in LMDBs of Datum records")
    train_images = synthetic_images(range(TRAIN_CLASSES), IMAGES_PER_CLASS, seed=1)
    test_images = synthetic_images(range(TRAIN_CLASSES, TRAIN_CLASSES + TEST_CLASSES), IMAGES_PER_CLASS, seed=2)
    for name, images in (("train_lmdb", train_images), ("test_lmdb", test_images)):
        if (folder / name).exists():
            import shutil
            shutil.rmtree(folder / name)
        print(f"{name}: {write_datum_lmdb(folder / name, images)} records")
    _write_mean(train_images, folder / "mean.binaryproto")

    _step(f"5. train the paper's GoogLeNet embedder (64-d, lifted loss, SGD as Caffe) for {ITERATIONS} "
          f"iterations of {BATCH} images (random initial weights: no ImageNet weights are shipped)")
    train_net = paper_net(64, "TRAIN", source=str(folder / "train_lmdb"), batch_size=BATCH,
                          mean_file=str(folder / "mean.binaryproto"))
    write_prototxt(train_net, folder / "train_val.prototxt")
    solver = paper_solver(str(folder / "train_val.prototxt"), max_iter=ITERATIONS, snapshot=0,
                          snapshot_prefix=str(folder / "snapshot"))
    solver.display = 1
    solver.random_seed = 1
    write_prototxt(solver, folder / "solver.prototxt")
    torch.manual_seed(1)
    start = time.perf_counter()
    train(folder / "solver.prototxt", output=folder / "trained.caffemodel", log_path=folder / "log.csv",
          device="cpu")
    print(f"trained in {time.perf_counter() - start:.1f} s; loss per iteration in log.csv")

    _step("6. extract fc_embedding for the unseen test classes (TEST phase: centre crop, no dropout)")
    extract_net = paper_net(64, "TEST", source=str(folder / "test_lmdb"), batch_size=BATCH,
                            mean_file=str(folder / "mean.binaryproto"))
    write_prototxt(extract_net, folder / "extract.prototxt")
    trained = weights_of(read_caffemodel(folder / "trained.caffemodel"))
    features = extract_features(read_prototxt(folder / "extract.prototxt"), trained, folder / "test_lmdb")
    print(f"embeddings {features['embeddings'].shape}, labels {sorted(set(features['labels'].tolist()))}")

    _step("7. evaluate as the paper's MATLAB code does (Recall@K, k-means NMI, pair F1)")
    print(format_table(evaluate(features["embeddings"], features["labels"], (1, 2, 4, 8))))

    _step("8. export the trained embedder to ONNX at fc_embedding and check it in ONNX Runtime")
    return _check_onnx(folder, test_images)


def _check_onnx(folder: Path, test_images) -> int:
    import torch

    from .converters.onnx import load_for_export, write_onnx

    net, metadata = load_for_export(folder / "extract.prototxt", folder / "trained.caffemodel")
    model = write_onnx(net.eval(), folder / "embedder.onnx", outputs=["fc_embedding"], metadata=metadata)
    recorded = {p.key: p.value for p in model.metadata_props}
    print("preprocessing recorded in the model: " + ", ".join(
        f"{k.split('.', 1)[1]}={v}" for k, v in recorded.items() if k.startswith("preprocess.")
        and k != "preprocess.mean_file"))
    try:
        import onnxruntime
    except ImportError:
        print("wrote embedder.onnx; onnxruntime is not installed, so it was not run "
              "(pip install 'caffe-compat[onnxruntime]')")
        return 0
    offset = (IMAGE_SIZE - 227) // 2
    batch = np.stack([a[:, offset:offset + 227, offset:offset + 227] for a, _ in test_images[:4]]).astype(np.float32)
    batch -= batch.mean()
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.inference_mode():
        reference = net(torch.from_numpy(batch))["fc_embedding"].numpy()
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"wrote embedder.onnx ({(folder / 'embedder.onnx').stat().st_size:,} bytes); ONNX Runtime vs "
          f"PyTorch on 4 images: relative error {error:.2e}")
    return 0 if error < 1e-4 else 1
