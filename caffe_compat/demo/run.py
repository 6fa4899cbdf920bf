"""`caffe-compat demo`: the product's main path on real data, end to end, nothing
downloaded. A LeNet embedder written as Caffe prototxts is trained with the paper's
loss (LiftedStructSimilaritySoftmaxLoss) by Caffe's SGD solver, on scikit-learn's
handwritten digits stored in LMDBs in the paper's pair layout (see digits.py),
evaluated before and after training as the paper evaluates (Recall@K, NMI), exported
to ONNX and checked in ONNX Runtime, and drawn as figures. Everything stays in the
work folder."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..errors import CaffeCompatError
from ..io.atomic import temporary_of, write_text

DEFAULT_WORKDIR = "caffe-compat-demo"
DEFAULT_ITERATIONS = 500
BATCH = 64  # 32 same-class pairs
EMBEDDING = 64
RECALL_K = (1, 2, 4, 8)
SEED = 1

# LeNet (Caffe's examples/mnist) with a 64-d fc_embedding and the paper's loss. Both
# phases read LMDBs of Datum records; TEST is the net features are extracted with.
NET = """name: "lenet_embedder"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{train}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{test}" batch_size: 100 backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: 20 kernel_size: 5 stride: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: 50 kernel_size: 5 stride: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "fc_embedding" type: "InnerProduct" bottom: "ip1" top: "fc_embedding" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: {embedding} weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "loss" type: "LiftedStructSimilaritySoftmaxLoss" bottom: "fc_embedding" bottom: "label" top: "loss"
  lifted_struct_sim_softmax_loss_param {{ margin: 1 }} include {{ phase: TRAIN }} }}
"""

# LeNet's solver with a tenth of its learning rate: at 0.01 the lifted loss diverges.
SOLVER = """net: "{net}"
base_lr: 0.001
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: {iterations}
snapshot: 0
snapshot_after_train: false
snapshot_prefix: "{prefix}"
random_seed: {seed}
solver_mode: CPU
"""

# Everything the demo writes, so that a rerun replaces its own files and nothing else.
OUTPUTS = ("train_lmdb", "held_out_lmdb", "unseen_lmdb", "lenet_embedder.prototxt", "deploy.prototxt",
           "solver.prototxt", "init.caffemodel", "trained.caffemodel", "train_log.csv", "features_held_out.npz",
           "features_unseen.npz", "results.json", "embedder.onnx", "figures")
# What those folders hold, and the snapshot an interrupted training writes (snapshot_prefix).
INSIDE = {"train_lmdb": ("data.mdb", "lock.mdb"), "held_out_lmdb": ("data.mdb", "lock.mdb"),
          "unseen_lmdb": ("data.mdb", "lock.mdb"),
          "figures": ("training_loss.png", "recall_at_k.png", "retrieval_unseen.png")}
SNAPSHOT = re.compile(r"snapshot_iter_\d+\.(caffemodel|solverstate\.pt)")
# Written into the work folder first: only a folder holding it is the demo's to empty on a rerun
# (a Caffe project's own solver.prototxt or figures/ carry the same names).
MARKER = ".caffe-compat-demo"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _not_the_demos(folder: Path) -> List[str]:
    """The entries of `folder` (and of its LMDB and figure folders) the demo does not
    write; a killed write's temporary counts as its output's."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = temporary_of(entry.name) or entry.name
        if name == MARKER or SNAPSHOT.fullmatch(name):
            continue
        if name not in OUTPUTS or entry.is_symlink() or entry.is_dir() != (name in INSIDE):
            foreign.append(entry.name)
        elif entry.is_dir():
            foreign += [f"{entry.name}/{inner.name}" for inner in sorted(entry.iterdir())
                        if (temporary_of(inner.name) or inner.name) not in INSIDE[name]]
    return foreign


def prepare_workdir(workdir) -> Path:
    """The work folder, made ready: a new or empty folder, or a previous demo's (its MARKER
    and only what the demo writes), emptied. Any other folder is refused, nothing touched."""
    folder = Path(workdir)
    if folder.exists() and not folder.is_dir():
        raise CaffeCompatError(f"--workdir {folder}: is a file, not a folder")
    try:
        if folder.is_dir() and any(folder.iterdir()):
            mine = (folder / MARKER).is_file()
            foreign = _not_the_demos(folder) if mine else sorted(p.name for p in folder.iterdir())
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                whose = "files the demo did not write" if mine else f"files and no {MARKER} (not a demo's folder)"
                raise CaffeCompatError(f"--workdir {folder}: holds {whose}: {shown}; the demo writes only into a "
                                       f"new or empty folder or a previous demo's; give another --workdir")
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / MARKER, "caffe-compat demo's work folder: a rerun of the demo empties it\n")
        for entry in folder.iterdir():
            if entry.name == MARKER:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as err:
        raise CaffeCompatError(f"--workdir {folder}: cannot write there: {err.strerror or err}") from None
    return folder


def run_demo(workdir=DEFAULT_WORKDIR, iterations: int = DEFAULT_ITERATIONS) -> int:
    if iterations < 1:
        raise CaffeCompatError(f"--iterations {iterations}: must be at least 1")
    import torch

    # LeNet's layers are too small to share among threads: on a busy 2-core machine one
    # thread trained it 8x faster than two (benchmarks/demo.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(workdir, iterations)
    finally:
        torch.set_num_threads(threads)


def _run(workdir, iterations: int) -> int:
    start = time.perf_counter()
    folder = prepare_workdir(workdir).resolve()
    data = _write_data(folder, iterations)
    if not _write_net(folder, iterations):
        return 1

    _step("4. the embedder with random weights, as Caffe's fillers draw them (the 'before')")
    before = _evaluate_both(folder, "init.caffemodel", save=False)

    _step(f"5. train with Caffe's SGD solver: {iterations} iterations of {BATCH} images "
          f"({BATCH // 2} same-class pairs), the lifted structured loss, margin 1")
    _train(folder, iterations)

    _step("6. the trained embedder (the 'after')")
    after = _evaluate_both(folder, "trained.caffemodel", save=True)

    _step("7. before and after, as the paper reports them (%)")
    print(comparison_table(before, after, iterations))
    print(reading(before, after))
    write_text(folder / "results.json", json.dumps({"iterations": iterations, "before": before, "after": after},
                                                   indent=2) + "\n")

    _step("8. export the trained embedder to ONNX at fc_embedding and run it in ONNX Runtime")
    onnx_ok = _check_onnx(folder, data["unseen"])

    _step("9. figures")
    _figures(folder, data["unseen"], iterations)

    _step(f"10. what the demo wrote in {folder} ({time.perf_counter() - start:.0f} s in all)")
    print(listing(folder))
    return 0 if onnx_ok else 1


def _write_data(folder: Path, iterations: int) -> Dict[str, list]:
    from .digits import TRAIN_CLASSES, load_splits, pair_records, rendered
    from ..io.datum import write_datum_lmdb

    _step("1. the data: scikit-learn's handwritten digits (bundled with the package), each drawn at a random "
          "place and contrast on a 28x28 canvas of noise over a random background level")
    splits = load_splits(seed=0)
    records = {
        "train": pair_records(splits, iterations * BATCH, seed=1),
        "held_out": rendered(splits, splits.held_out, seed=2),
        "unseen": rendered(splits, splits.unseen, seed=3),
    }
    for name, items in records.items():
        write_datum_lmdb(folder / f"{name}_lmdb", items)
    seen = "-".join(map(str, (TRAIN_CLASSES[0], TRAIN_CLASSES[-1])))
    print(f"train_lmdb: {len(records['train'])} records in same-class pairs, drawn from {len(splits.train)} "
          f"images of classes {seen}\n"
          f"held_out_lmdb: {len(records['held_out'])} other images of classes {seen} (never trained on)\n"
          f"unseen_lmdb: {len(records['unseen'])} images of classes 5-9 (the paper's test: classes never seen)")
    return records


def _write_net(folder: Path, iterations: int) -> bool:
    """The prototxts, and the initial caffemodel read back; False if it differs."""
    from ..deploy import deploy_net
    from ..tools.inspect import format_inspection, inspect_net
    from ..io.files import read_caffemodel, read_prototxt, weights_of, with_weights, write_caffemodel, write_prototxt
    from ..loading import load_net

    _step("2. the net and its solver as Caffe files")
    net_path = folder / "lenet_embedder.prototxt"
    write_text(net_path, NET.format(train=folder / "train_lmdb", test=folder / "held_out_lmdb", batch=BATCH,
                                    embedding=EMBEDDING))
    write_text(folder / "solver.prototxt", SOLVER.format(net=net_path, iterations=iterations,
                                                         prefix=folder / "snapshot", seed=SEED))
    net_file = read_prototxt(net_path)
    write_prototxt(deploy_net(net_file.net, (1, 1, 28, 28)), folder / "deploy.prototxt")
    print(f"lenet_embedder.prototxt (TRAIN and TEST phases, dialect {net_file.dialect}), solver.prototxt, "
          f"deploy.prototxt (its inference net, Input layer instead of Data)")

    _step("3. initial weights from the prototxt's fillers, written as a caffemodel and read back")
    import torch

    torch.manual_seed(SEED)
    weights = load_net(folder / "deploy.prototxt").caffe_weights()
    write_caffemodel(with_weights(net_file.net, weights), folder / "init.caffemodel")
    back = weights_of(read_caffemodel(folder / "init.caffemodel"))
    same = weights.keys() == back.keys() and all(
        np.array_equal(a, b) for name in weights for a, b in zip(weights[name], back[name]))
    print(f"init.caffemodel: {sum(a.size for blobs in weights.values() for a in blobs):,} values; "
          f"weights identical: {same}")
    if not same:
        print("round trip FAILED")
        return False
    print(format_inspection(inspect_net(folder / "deploy.prototxt", folder / "init.caffemodel")))
    return True


def _evaluate_both(folder: Path, weights_name: str, save: bool) -> Dict[str, dict]:
    from ..tools.extract import extract_features, save_features
    from ..io.files import read_caffemodel, read_prototxt, weights_of
    from ..evaluation.metrics import evaluate

    net_file = read_prototxt(folder / "lenet_embedder.prototxt")
    weights = weights_of(read_caffemodel(folder / weights_name))
    results = {}
    for split, what in (("held_out", "held-out images of the training classes 0-4"),
                        ("unseen", "unseen classes 5-9")):
        features = extract_features(net_file, weights, folder / f"{split}_lmdb")
        if save:
            save_features(features, folder / f"features_{split}.npz")
        results[split] = evaluate(features["embeddings"], features["labels"], RECALL_K)
        recall = results[split]["recall"]
        print(f"{what}: Recall@1 {100 * recall['1']:.1f}%, NMI {100 * results[split]['nmi']:.1f}% "
              f"({results[split]['n']} images)")
    return results


def _train(folder: Path, iterations: int) -> None:
    import torch

    from ..solver import train

    torch.manual_seed(SEED)
    start = time.perf_counter()
    train(folder / "solver.prototxt", weights=folder / "init.caffemodel", output=folder / "trained.caffemodel",
          log_path=folder / "train_log.csv", device="cpu")
    print(f"trained in {time.perf_counter() - start:.1f} s; the loss of every iteration is in train_log.csv")


def comparison_table(before: Dict[str, dict], after: Dict[str, dict], iterations: int) -> str:
    columns = [f"R@{k}" for k in RECALL_K] + ["NMI"]
    lines = [f"{'':<30}" + "".join(f"{c:>8}" for c in columns)]
    for split, title in (("held_out", "held-out images, classes 0-4"), ("unseen", "unseen classes 5-9")):
        lines.append(title)
        for name, result in (("random weights", before[split]), (f"after {iterations} iterations", after[split])):
            values = [result["recall"][str(k)] for k in RECALL_K] + [result["nmi"]]
            lines.append(f"  {name:<28}" + "".join(f"{100 * v:8.1f}" for v in values))
    return "\n".join(lines)


def reading(before: Dict[str, dict], after: Dict[str, dict]) -> str:
    """What training changed, in points, for each split."""
    def change(split: str, metric: str) -> str:
        old = before[split]["recall"]["1"] if metric == "R@1" else before[split]["nmi"]
        new = after[split]["recall"]["1"] if metric == "R@1" else after[split]["nmi"]
        return f"{metric} {100 * (new - old):+.1f}"

    return (f"training changed: held-out 0-4 {change('held_out', 'R@1')}, {change('held_out', 'NMI')} points "
            f"(classes it trained on, images it never saw); unseen 5-9 {change('unseen', 'R@1')}, "
            f"{change('unseen', 'NMI')} points (zero-shot, from five training classes; the paper trains "
            f"on 98 to 11,318)")


def _check_onnx(folder: Path, records: List) -> bool:
    import torch

    from ..converters.onnx import load_for_export, write_onnx

    batch = np.stack([image for image, _ in records[:BATCH]]).astype(np.float32) * np.float32(0.00390625)
    net, metadata = load_for_export(folder / "lenet_embedder.prototxt", folder / "trained.caffemodel",
                                    input_shape=batch.shape)
    model = write_onnx(net.eval(), folder / "embedder.onnx", outputs=["fc_embedding"], metadata=metadata)
    recorded = {p.key: p.value for p in model.metadata_props if p.key.startswith("preprocess.")}
    print("preprocessing recorded in the model: " + ", ".join(f"{k.split('.', 1)[1]}={v}"
                                                               for k, v in recorded.items()))
    try:
        import onnxruntime
    except ImportError:
        print("wrote embedder.onnx; onnxruntime is not installed, so it was not run "
              "(pip install 'caffe-compat[onnxruntime]')")
        return True
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.inference_mode():
        reference = net(torch.from_numpy(batch))["fc_embedding"].numpy()
    difference = float(np.abs(ours - reference).max())
    scale = float(np.abs(reference).max())
    print(f"embedder.onnx ({(folder / 'embedder.onnx').stat().st_size:,} bytes): ONNX Runtime vs PyTorch on "
          f"{len(batch)} unseen images: max abs difference {difference:.2e} (values up to {scale:.2f})")
    return difference <= 1e-4 * max(scale, 1.0)


def _figures(folder: Path, unseen_records: List, iterations: int) -> None:
    from ..evaluation.evaluate import load_features
    from ..evaluation.figures import loss_curve, recall_curve, retrieval_figure

    figures = folder / "figures"
    results = json.loads((folder / "results.json").read_text())
    loss_curve(folder / "train_log.csv", figures / "training_loss.png",
               title=f"lenet_embedder, lifted structured loss, digits 0-4 ({iterations} iterations)")
    curves = {}
    for split, name in (("held_out", "held-out 0-4"), ("unseen", "unseen 5-9")):
        curves[f"{name}, random weights"] = results["before"][split]["recall"]
        curves[f"{name}, trained"] = results["after"][split]["recall"]
    recall_curve(curves, figures / "recall_at_k.png", title="Recall@K on the digits, before and after training",
                 paired=True)
    features = load_features(folder / "features_unseen.npz")
    retrieval_figure(features.embeddings, features.labels, [image[0] for image, _ in unseen_records],
                     figures / "retrieval_unseen.png", title="Unseen classes 5-9: nearest neighbours after training")
    print("\n".join(f"figures/{p.name}" for p in sorted(figures.iterdir())))


def listing(folder: Path) -> str:
    rows = []
    for name in OUTPUTS:
        path = folder / name
        if not path.exists():
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        label = name + ("/" if path.is_dir() else "")
        rows.append(f"  {label:<26}{size:>12,} bytes" + (f"  ({len(files)} files)" if path.is_dir() else ""))
    return "\n".join(rows)
