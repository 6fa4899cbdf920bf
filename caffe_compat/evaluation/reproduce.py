"""`caffe-compat reproduce`: the paper's protocol end to end: prepare a dataset's
official archive, fine-tune the paper's GoogLeNet embedder from ImageNet weights with
the paper's solver, extract the test split's embeddings, evaluate, and print the
result beside the published numbers.

Every input is checked before any work (arguments, device, --workdir, the archive's
index and images, the weights against the paper's net), then the whole run's time is
estimated from a measured forward+backward on a few images, and each stage says when
it starts. A finished preparation in --workdir/data (from an earlier run on the same
archive) is reused, and a run stopped during training (Ctrl-C, SIGTERM) continues from
its latest snapshot when the same command is run again."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, TextIO, Union

import torch

from ..deploy import deploy_net, override_mean
from ..devices import resolve_device
from ..errors import CaffeCompatError
from ..graph import build_graph
from ..io.files import NetFile, read_caffemodel, weights_of, write_prototxt
from ..net import CaffeNet
from ..solver import train
from ..tools.extract import extract_features, point_at, save_features
from .datasets import check_output, check_source, prepare, prepared
from .evaluate import format_table
from .metrics import evaluate
from .published import PUBLISHED
from .recipes import paper_net, paper_solver

PathLike = Union[str, Path]

EMBEDDINGS = (64, 128, 256, 512)
IMAGENET_MEAN_BGR = (104, 117, 123)  # the channel means of Caffe's imagenet_mean.binaryproto
NEW_LAYERS = ("fc_embedding",)  # the paper's own layer: ImageNet weights do not have it
TIMING_IMAGES = 8  # per-image cost falls with the batch: a small one gives an upper bound
STAGES = ("prepare", "train", "extract", "evaluate")
SNAPSHOT_PREFIX = "snapshot"


def _list_net(net, list_file: Path, batch_size: int, phase: str):
    """The recipe net fed from a prepared image list (paths relative to the list's folder)."""
    net, _ = point_at(net, list_file, batch_size, phase)
    return net


def _check_workdir(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise CaffeCompatError(f"{workdir}: --workdir is a file; give a folder")
    folder = workdir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CaffeCompatError(f"{workdir}: --workdir cannot be written ({folder} is not a writable folder)")


def _checked_net(weights: PathLike, embedding: int, device: torch.device, timing_images: int) -> CaffeNet:
    """The paper's extraction net on `device` (filler weights: only its cost matters here),
    after checking that `weights` fits it: every layer but fc_embedding, in its shape."""
    net_param = deploy_net(paper_net(embedding, "TEST", mean_file=None), (timing_images, 3, 227, 227))
    net = CaffeNet(build_graph(net_param, "TEST", "lifted"))
    given = weights_of(read_caffemodel(weights))
    wanted = {name: arrays for name, arrays in net.caffe_weights().items() if name not in NEW_LAYERS}
    if not set(wanted) & set(given):
        raise CaffeCompatError(f"{weights}: shares no layer with the paper's net (BVLC GoogLeNet and "
                               f"fc_embedding); is it bvlc_googlenet.caffemodel?")
    missing = sorted(set(wanted) - set(given))
    if missing:
        raise CaffeCompatError(f"{weights}: has no weights for {len(missing)} layer(s) of the paper's GoogLeNet: "
                               f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}")
    for name, arrays in wanted.items():
        have = [tuple(a.shape) for a in given[name]]
        want = [tuple(a.shape) for a in arrays]
        if have != want:
            raise CaffeCompatError(f"{weights}: layer '{name}' has blobs of shapes {have}; the paper's net "
                                   f"needs {want}")
    return net.to(device)


def _seconds_per_image(net: CaffeNet, device: torch.device, count: int) -> Dict[str, float]:
    """Measured forward+backward (train mode) and forward (inference) time per image, each
    after one warm-up pass, on `count` random images."""
    images = torch.rand(count, 3, 227, 227, device=device) * 255 - 117

    def timed(step) -> float:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / count

    def train_step():
        net.zero_grad(set_to_none=True)
        net(data=images)["fc_embedding"].square().sum().backward()

    def forward():
        with torch.inference_mode():
            net(data=images)

    net.train()
    train_cost = timed(train_step)
    net.eval()
    return {"train": train_cost, "forward": timed(forward)}


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def estimate_text(costs: Dict[str, float], device: torch.device, max_iter: int, batch_size: int,
                  test_images: int, timing_images: int = TIMING_IMAGES) -> str:
    training = costs["train"] * batch_size * max_iter
    extraction = costs["forward"] * test_images
    text = (f"estimate: about {_duration(training + extraction)} on {device}: training {max_iter} iterations x "
            f"{batch_size} images at {costs['train']:.3g} s per image forward+backward ({_duration(training)}), "
            f"extracting {test_images} images at {costs['forward']:.3g} s each ({_duration(extraction)}); "
            f"measured here on {timing_images} images (an upper bound: larger batches cost less per image), "
            f"preparation not included")
    if device.type == "cpu" and training + extraction > 3600:
        text += ". On a CPU that is long: use --device cuda, or --max-iter N for a shorter run"
    return text


def reproduce(dataset: str, source: PathLike, weights: PathLike, workdir: PathLike, embedding: int = 64,
              device: Optional[str] = None, max_iter: int = 20000, batch_size: int = 128,
              extract_batch_size: int = 26, mean_file: Optional[PathLike] = None,
              stream: Optional[TextIO] = None, timing_images: int = TIMING_IMAGES) -> dict:
    """Run the paper's protocol (see the module docstring), printing to `stream` (stdout).
    `timing_images`: the batch the estimate is measured on."""
    stream = stream or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if dataset not in PUBLISHED:
        raise CaffeCompatError(f"dataset: unknown name {dataset!r} (one of {', '.join(PUBLISHED)})")
    if embedding not in EMBEDDINGS:
        raise CaffeCompatError(f"embedding: {embedding} is not one of the paper's sizes {EMBEDDINGS}")
    if batch_size <= 0 or batch_size % 2:
        raise CaffeCompatError(f"batch size {batch_size}: must be positive and even (the paper's batches are pairs)")
    if max_iter <= 0 or extract_batch_size <= 0:
        raise CaffeCompatError(f"--max-iter {max_iter} and the extraction batch {extract_batch_size}: must be "
                               f"positive")
    if mean_file is not None and not Path(mean_file).is_file():
        raise CaffeCompatError(f"{mean_file}: no such mean file")
    torch_device = resolve_device(device or "cpu")
    workdir = Path(workdir)
    _check_workdir(workdir)
    data_dir = workdir / "data"
    splits = prepared(data_dir, dataset, source, "list")
    counts = check_source(dataset, source, "list")
    if splits is None:
        check_output(data_dir, Path(source))
    net = _checked_net(weights, embedding, torch_device, timing_images)
    say(f"checked: {dataset} archive ({_split_counts(counts)}), weights {weights}, --workdir {workdir}")
    say(estimate_text(_seconds_per_image(net, torch_device, timing_images), torch_device, max_iter, batch_size,
                      counts["test"]["images"], timing_images))
    del net

    def stage(name: str, what: str) -> None:
        say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")

    if splits is None:
        stage("prepare", f"{source} -> {data_dir}")
        splits = prepare(dataset, source, data_dir, "list")
    else:
        stage("prepare", f"reusing {data_dir} (prepared from this archive before)")
    say(f"prepared {dataset}: {_split_counts(splits)}")

    # The paper trains on same-class pairs; with image lists the "pairs" sampler builds them.
    train_net = _list_net(paper_net(embedding, "TRAIN", mean_file=None), Path(splits["train"]["path"]),
                          batch_size, "TRAIN")
    _set_mean(train_net, mean_file)
    write_prototxt(train_net, workdir / "train_val.prototxt")
    solver = paper_solver(str(workdir / "train_val.prototxt"), max_iter=max_iter,
                          snapshot=min(10000, max_iter), snapshot_prefix=str(workdir / SNAPSHOT_PREFIX))
    write_prototxt(solver, workdir / "solver.prototxt")
    final = workdir / f"{dataset}_embed{embedding}.caffemodel"
    resume = resume_point(workdir, final)
    stage("train", f"{max_iter} iterations at batch {batch_size} on {torch_device} -> {final}"
          + (f", resuming from {resume}" if resume else ""))
    trained = train(workdir / "solver.prototxt", weights=None if resume else weights, resume=resume, device=device,
                    output=final, log_path=workdir / "train_log.csv", sampler="pairs",
                    allow_missing_weights=True)  # fc_embedding is new: ImageNet weights leave it to its fillers
    if trained.stopped_early:
        snapshot = trained.snapshots[-1] if trained.snapshots else None
        say(f"stopped at iteration {trained.iterations}" + (f"; snapshot {snapshot}" if snapshot else "")
            + "; the same command continues from the latest snapshot")
        return {"stopped_early": True, "stop_signal": trained.stop_signal, "iterations": trained.iterations}

    extract_net = _list_net(paper_net(embedding, "TEST", mean_file=None), Path(splits["test"]["path"]),
                            extract_batch_size, "TEST")
    _set_mean(extract_net, mean_file)
    write_prototxt(extract_net, workdir / "extract.prototxt")
    stage("extract", f"{splits['test']['images']} test images -> {workdir / 'features.npz'}")
    features = extract_features(NetFile(extract_net, "lifted", workdir / "extract.prototxt"),
                                weights_of(read_caffemodel(final)), Path(splits["test"]["path"]),
                                device=str(torch_device), batch_size=extract_batch_size, show_progress=True)
    save_features(features, workdir / "features.npz")
    stage("evaluate", "Recall@K, NMI, F1")
    published = PUBLISHED[dataset]
    result = evaluate(features["embeddings"], features["labels"], published["recall_k"], device=str(torch_device))
    say(format_table(result))
    say(comparison_table(dataset, result))
    return result


def resume_point(workdir: Path, final: Path) -> Optional[Path]:
    """The latest solver state of an interrupted run in `workdir`: none once `final` (the
    trained weights) exists, as the run that wrote it finished."""
    if final.exists():
        return None
    states = []
    for path in workdir.glob(f"{SNAPSHOT_PREFIX}_iter_*.solverstate.pt"):
        iteration = path.name[len(SNAPSHOT_PREFIX) + len("_iter_"):-len(".solverstate.pt")]
        if iteration.isdigit():
            states.append((int(iteration), path))
    return max(states)[1] if states else None


def _split_counts(splits: Dict[str, dict]) -> str:
    return ", ".join(f"{split} {info['images']} images / {info['classes']} classes" for split, info in splits.items())


def _set_mean(net, mean_file: Optional[PathLike]) -> None:
    """The paper subtracts Caffe's ImageNet mean image; without that file, its per-channel
    means (BGR 104, 117, 123) stand in."""
    if mean_file:
        override_mean(net, mean_file=mean_file)
    else:
        override_mean(net, mean_values=IMAGENET_MEAN_BGR)


def comparison_table(dataset: str, result: dict) -> str:
    published = PUBLISHED[dataset]
    lines = [f"{'':<10}{'ours':>8}{'paper':>8}"]
    for k, theirs in zip(published["recall_k"], published["recall"]):
        ours = result["recall"].get(str(k))
        lines.append(f"{'R@' + str(k):<10}{(100 * ours if ours is not None else float('nan')):>8.1f}{theirs:>8.1f}")
    return "\n".join(lines)
