"""Training speed: one iteration (forward, backward, Caffe's SGD update) of the paper's
GoogLeNet embedder with the lifted loss, and the data pipeline alone (the Data layer over
an LMDB of 256x256 JPEG datums with crop 227, mirror and a mean file), which must
deliver at least twice what the model consumes.

    python benchmarks/train.py [--paper-model DIR] [--cpu-batch N] [--cuda-batch N]
                               [--iterations K] [--no-write]

The net is the paper's train_val prototxt with its Data layer replaced by an Input
(random weights from its fillers; batches of same-class pairs, as the paper's LMDB).
CPU runs use 2 threads; on CUDA the net runs channels_last under bfloat16 autocast.
Prints a table and writes the section "## Training" of benchmarks/RESULTS.md (other
sections are left as they are).
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAPER_MODEL = ROOT.parent / "shared" / "paper-model"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Training"
CPU_THREADS = 2
CROP = 227
IMAGE_SIDE = 256


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}, {cores} cores available{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}")


# ---------------------------------------------------------------- the model

def paper_net(paper_model: Path, batch: int):
    """The paper's TRAIN net with an Input (data, label) in place of its Data layer."""
    from caffe_compat.graph import build_graph
    from caffe_compat.io.files import read_prototxt
    from caffe_compat.net import CaffeNet

    path = next(paper_model.glob("train_val_*.prototxt"))
    net_file = read_prototxt(path)
    net = net_file.net
    data = next(layer for layer in net.layer if layer.type == "Data")
    data.type = "Input"
    data.ClearField("data_param")
    data.ClearField("transform_param")
    data.input_param.shape.add().dim.extend([batch, 3, CROP, CROP])
    data.input_param.shape.add().dim.extend([batch])
    return CaffeNet(build_graph(net, "TRAIN", net_file.dialect))


def paper_solver(paper_model: Path, net):
    from caffe_compat.io.files import read_solver
    from caffe_compat.solver import CaffeSolver, learnable_params

    param = read_solver(next(paper_model.glob("solver_*.prototxt")))
    return CaffeSolver(param, learnable_params(net))


def measure_model(paper_model: Path, batch: int, device: str, iterations: int) -> Dict[str, float]:
    torch.manual_seed(0)
    net = paper_net(paper_model, batch)
    cuda = device == "cuda"
    images = torch.randn(batch, 3, CROP, CROP)
    labels = torch.arange(batch // 2).repeat_interleave(2).float()  # same-class pairs
    if cuda:
        net = net.to(device, memory_format=torch.channels_last)
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
    solver = paper_solver(paper_model, net)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def iteration() -> float:
        for p in solver.params:
            p.tensor.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = net.loss(net(data=images, label=labels))
        loss.backward()
        solver.step()
        return float(loss)

    iteration()  # warm-up: allocations, kernels, lazy inits
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        iteration()
        sync()
        times.append(time.perf_counter() - start)
    return {"batch": batch, "median": batch / statistics.median(times), "best": batch / min(times),
            "runs": len(times), "seconds_per_iteration": statistics.median(times)}


# ---------------------------------------------------------------- the data pipeline

def write_jpeg_lmdb(folder: Path, count: int) -> Path:
    """An LMDB of `count` encoded 256x256 JPEG Datums (as convert_imageset --encoded)."""
    import lmdb
    from PIL import Image

    from caffe_compat.io.schema import messages

    rng = np.random.default_rng(0)
    env = lmdb.open(str(folder / "jpeg_lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(count):
            # Smooth colour fields plus noise: JPEG sizes like photographs (~20-40 KB).
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(low).resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC), np.int16)
            pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            datum = messages("bvlc").Datum(data=buffer.getvalue(), encoded=True, label=i // 2)
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    mean = messages("bvlc").BlobProto()
    mean.shape.dim.extend([1, 3, IMAGE_SIDE, IMAGE_SIDE])
    mean.data.extend(np.full(3 * IMAGE_SIDE * IMAGE_SIDE, 117.0, np.float32).tolist())
    (folder / "mean.binaryproto").write_bytes(mean.SerializeToString())
    return folder / "jpeg_lmdb"


def measure_data(batch: int, count: int, batches: int, threads: Optional[int]) -> Dict[str, float]:
    from google.protobuf import text_format

    from caffe_compat.graph import build_graph
    from caffe_compat.io.schema import messages
    from caffe_compat.data import data_layers
    from caffe_compat.net import CaffeNet

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = write_jpeg_lmdb(folder, count)
        net = messages("bvlc").NetParameter()
        text_format.Parse(f'''layer {{ name: "data" type: "Data" top: "data" top: "label"
            transform_param {{ mirror: true crop_size: {CROP} mean_file: "{folder}/mean.binaryproto" }}
            data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}''', net)
        data_net = CaffeNet(build_graph(net, "TRAIN"))
        (_, layer), = data_layers(data_net)
        if threads:
            layer.threads = threads
        data_net.run({})  # starts the producer; the queue then fills
        layer.close()
        layer.prefetch = 1  # measure production, not a queue filled in advance
        start = time.perf_counter()
        for _ in range(batches):
            data_net.run({})
        elapsed = time.perf_counter() - start
        layer.close()
        return {"batch": batch, "images_per_s": batch * batches / elapsed, "threads": layer.threads}


# ---------------------------------------------------------------- the report

def write_section(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text, current)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    from caffe_compat.io.atomic import write_text

    write_text(RESULTS, updated)


def report(args, model_rows: List[Dict], data: Dict[str, float]) -> str:
    lines = [SECTION, "",
             f"`python benchmarks/train.py --cpu-batch {args.cpu_batch} --iterations {args.iterations}` "
             f"({datetime.date.today().isoformat()}).",
             f"Machine: {machine()}. Load average (1 min) {args.load_before:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after: other processes may share the cores, so these are lower bounds.",
             "",
             "One training iteration of the paper's GoogLeNet embedder (227x227 crops, `fc_embedding` 64-d, "
             "lifted loss, Caffe's SGD update with the paper's solver), random weights, median over the "
             "timed iterations:", "",
             "| device | batch | images/s (median) | images/s (best) | s / iteration |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in model_rows:
        lines.append(f"| {row['device']} | {row['batch']} | {row['median']:.2f} | {row['best']:.2f} | "
                     f"{row['seconds_per_iteration']:.2f} |")
    lines += ["",
              f"Data pipeline alone (`Data` layer, TRAIN: LMDB of {args.data_images} encoded 256x256 JPEG datums, "
              f"crop 227, mirror, mean file, batch {data['batch']}, {data['threads']} decode threads, "
              f"one batch prefetched): **{data['images_per_s']:.1f} images/s**.", ""]
    for row in model_rows:
        ratio = data["images_per_s"] / row["median"]
        verdict = "meets" if ratio >= 2 else "does NOT meet"
        lines.append(f"- {row['device']}: the pipeline delivers {ratio:.1f}x what the model consumes "
                     f"({verdict} the 2x goal).")
    notes = [note for note in args.notes if note]
    lines += [""] + [f"Note: {note}" for note in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-model", type=Path, default=DEFAULT_PAPER_MODEL)
    parser.add_argument("--cpu-batch", type=int, default=128,
                        help="batch on CPU (default the paper's 128: ~25 s per iteration and 6.6 GB on 2 cores)")
    parser.add_argument("--cuda-batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per device")
    parser.add_argument("--data-images", type=int, default=512, help="JPEG datums in the generated LMDB")
    parser.add_argument("--data-batches", type=int, default=8)
    parser.add_argument("--data-threads", type=int, help="decode threads (default: the layer's default)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(CPU_THREADS)
    args.load_before = os.getloadavg()[0]
    args.notes = []
    if args.cpu_batch != 128:
        args.notes.append(f"CPU batch {args.cpu_batch} instead of the paper's 128, to save time.")
    if not torch.cuda.is_available():
        args.notes.append("no CUDA device here: the CUDA row (channels_last, bfloat16 autocast, batch "
                          f"{args.cuda_batch}) is filled by running this script on a GPU machine.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [{"device": f"CPU ({CPU_THREADS} threads)",
                 **measure_model(args.paper_model, args.cpu_batch, "cpu", args.iterations)}]
        print(f"model, CPU: {rows[-1]['median']:.2f} images/s at batch {args.cpu_batch}", flush=True)
        if torch.cuda.is_available():
            rows.append({"device": "CUDA (channels_last, bf16 autocast)",
                         **measure_model(args.paper_model, args.cuda_batch, "cuda", max(args.iterations, 10))})
            print(f"model, CUDA: {rows[-1]['median']:.1f} images/s at batch {args.cuda_batch}", flush=True)
        data = measure_data(args.cuda_batch if torch.cuda.is_available() else 128, args.data_images,
                            args.data_batches, args.data_threads)
    print(f"data pipeline: {data['images_per_s']:.1f} images/s ({data['threads']} threads)")
    text = report(args, rows, data)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
