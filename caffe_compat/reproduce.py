"""`caffe-compat reproduce`: the paper's protocol end to end: prepare a dataset's
official archive, fine-tune the paper's GoogLeNet embedder from ImageNet weights with
the paper's solver, extract the test split's embeddings, evaluate, and print the
result beside the published numbers."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .datasets import prepare
from .errors import CaffeCompatError
from .evaluate import format_table
from .extract import extract_features, point_at, save_features
from .io.files import NetFile, read_caffemodel, weights_of, write_prototxt
from .metrics import evaluate
from .recipes import paper_net, paper_solver
from .solver import train

PathLike = Union[str, Path]

# Recall@K (%) of the lifted structured loss at 64-d embeddings. CUB-200-2011 and Online
# Products as later papers read them off the paper's figures; Cars196 as later work
# tabulates it (not checked against the paper's figure here). NMI/F1 appear in the
# paper only as curves over embedding sizes, so no single figure is quoted.
PUBLISHED = {
    "cub": {"recall_k": (1, 2, 4, 8), "recall": (47.2, 58.9, 70.2, 80.2)},
    "cars": {"recall_k": (1, 2, 4, 8), "recall": (49.0, 60.3, 72.1, 81.5)},
    "sop": {"recall_k": (1, 10, 100, 1000), "recall": (62.1, 79.8, 91.3, 97.4)},
}
EMBEDDINGS = (64, 128, 256, 512)


def _list_net(net, list_file: Path, batch_size: int, phase: str):
    """The recipe net fed from a prepared image list (paths relative to the list's folder)."""
    net, layer = point_at(net, list_file, batch_size, phase)
    layer.image_data_param.root_folder = str(list_file.parent) + "/"
    return net


def reproduce(dataset: str, source: PathLike, weights: PathLike, workdir: PathLike, embedding: int = 64,
              device: Optional[str] = None, max_iter: int = 20000, batch_size: int = 128,
              extract_batch_size: int = 26, mean_file: Optional[PathLike] = None) -> dict:
    if dataset not in PUBLISHED:
        raise CaffeCompatError(f"dataset: unknown name {dataset!r} (one of {', '.join(PUBLISHED)})")
    if embedding not in EMBEDDINGS:
        raise CaffeCompatError(f"embedding: {embedding} is not one of the paper's sizes {EMBEDDINGS}")
    if batch_size % 2:
        raise CaffeCompatError(f"batch size {batch_size}: must be even (the paper's batches are pairs)")
    workdir = Path(workdir)
    data_dir = workdir / "data"
    splits = prepare(dataset, source, data_dir, "list")
    print(f"prepared {dataset}: " + ", ".join(f"{s} {i['images']} images / {i['classes']} classes"
                                                for s, i in splits.items()))
    # The paper trains on same-class pairs; with image lists the "pairs" sampler builds them.
    train_net = _list_net(paper_net(embedding, "TRAIN", mean_file=None), Path(splits["train"]["path"]),
                          batch_size, "TRAIN")
    _set_mean(train_net, mean_file)
    write_prototxt(train_net, workdir / "train_val.prototxt")
    solver = paper_solver(str(workdir / "train_val.prototxt"), max_iter=max_iter,
                          snapshot=min(10000, max_iter), snapshot_prefix=str(workdir / "snapshot"))
    write_prototxt(solver, workdir / "solver.prototxt")
    final = workdir / f"{dataset}_embed{embedding}.caffemodel"
    train(workdir / "solver.prototxt", weights=weights, device=device, output=final,
          log_path=workdir / "train_log.csv", sampler="pairs")

    extract_net = _list_net(paper_net(embedding, "TEST", mean_file=None), Path(splits["test"]["path"]),
                            extract_batch_size, "TEST")
    _set_mean(extract_net, mean_file)
    write_prototxt(extract_net, workdir / "extract.prototxt")
    features = extract_features(NetFile(extract_net, "lifted", workdir / "extract.prototxt"),
                                weights_of(read_caffemodel(final)), Path(splits["test"]["path"]),
                                device=device or "cpu", batch_size=extract_batch_size)
    save_features(features, workdir / "features.npz")
    published = PUBLISHED[dataset]
    result = evaluate(features["embeddings"], features["labels"], published["recall_k"], device=device or "cpu")
    print(format_table(result))
    print(comparison_table(dataset, result))
    return result


def _set_mean(net, mean_file: Optional[PathLike]) -> None:
    """The paper subtracts Caffe's ImageNet mean image; without that file, its per-channel
    means (BGR 104, 117, 123) stand in."""
    for layer in net.layer:
        if layer.type in ("Data", "ImageData"):
            del layer.transform_param.mean_value[:]
            if mean_file:
                layer.transform_param.mean_file = str(Path(mean_file).resolve())
            else:
                layer.transform_param.ClearField("mean_file")
                layer.transform_param.mean_value.extend([104, 117, 123])


def comparison_table(dataset: str, result: dict) -> str:
    published = PUBLISHED[dataset]
    lines = [f"{'':<10}{'ours':>8}{'paper':>8}"]
    for k, theirs in zip(published["recall_k"], published["recall"]):
        ours = result["recall"].get(str(k))
        lines.append(f"{'R@' + str(k):<10}{(100 * ours if ours is not None else float('nan')):>8.1f}{theirs:>8.1f}")
    return "\n".join(lines)
