"""ONNX export benchmark: how long exporting BVLC GoogLeNet takes, and how fast ONNX
Runtime runs the paper's GoogLeNet embedder (227x227 crops -> fc_embedding, 64-d)
compared with PyTorch eager, at batch 1 and 16 on 2 CPU threads.

    python benchmarks/onnx_export.py [--seconds 10] [--results benchmarks/RESULTS.md]

Writes its numbers into the "## ONNX" section of RESULTS.md (other sections are left
as they are). The embedder has random weights from its fillers: speed does not depend
on the values.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from caffe_compat import __version__
from caffe_compat.converters.onnx import export_onnx, load_for_export
from caffe_compat.deploy import deploy_net
from caffe_compat.graph import build_graph
from caffe_compat.io.files import read_prototxt
from caffe_compat.net import CaffeNet

from bench_common import onnxruntime_options, write_section

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOOGLENET = SHARED / "caffe-reference" / "nets" / "googlenet_deploy"
EMBEDDER = SHARED / "paper-model" / "extract_googlenet_ebay_feature_embed64.prototxt"
THREADS = 2
BATCHES = (1, 16)
SECTION = "## ONNX"


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        model = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores available; "
            f"Python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}, "
            f"onnxruntime {ort.__version__}, numpy {np.__version__}, caffe-compat {__version__}")


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def images_per_second(run, batch: int, seconds: float) -> float:
    for _ in range(3):  # warm-up: allocators, ORT's first-run planning
        run()
    timings = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < 5:
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return batch / statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_before = load_average()

    # Export time: GoogLeNet with Caffe's weights, to prob.
    start = time.perf_counter()
    googlenet, metadata = load_for_export(GOOGLENET.with_suffix(".prototxt"), GOOGLENET.with_suffix(".caffemodel"))
    load_s = time.perf_counter() - start
    export_s = best_of(3, lambda: export_onnx(googlenet, ["prob"], metadata=metadata))
    model = export_onnx(googlenet, ["prob"], metadata=metadata)
    serialize_s = best_of(3, model.SerializeToString)
    size_mib = model.ByteSize() / 2**20

    # Inference: the paper's embedder.
    net_file = read_prototxt(EMBEDDER)
    torch.manual_seed(0)
    embedder = CaffeNet(build_graph(deploy_net(net_file.net), "TEST", net_file.dialect)).eval()
    options = onnxruntime_options(THREADS)
    session = ort.InferenceSession(export_onnx(embedder).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).uniform(-120, 130, (batch, 3, 227, 227)).astype(np.float32)
        tx = torch.from_numpy(x)

        def run_torch():
            with torch.no_grad():
                embedder(tx)

        onnx_ips = images_per_second(lambda: session.run(None, {"data": x}), batch, args.seconds)
        torch_ips = images_per_second(run_torch, batch, args.seconds)
        rows.append((batch, onnx_ips, torch_ips))
        print(f"batch {batch:>2}: onnxruntime {onnx_ips:7.1f} images/s, PyTorch eager {torch_ips:7.1f} images/s")

    lines = [
        SECTION,
        "",
        f"`python benchmarks/onnx_export.py --seconds {args.seconds:g}` ({time.strftime('%Y-%m-%d')}).",
        f"Machine: {machine()}. Load average (1 min) {load_before:.1f} before, {load_average():.1f} after: "
        f"above {THREADS} (this run's own threads) other processes shared the cores, and the rates are "
        f"lower bounds.",
        "",
        f"Export of BVLC GoogLeNet (`nets/googlenet_deploy`, to `prob`): loading prototxt + caffemodel "
        f"{load_s:.2f} s, `export_onnx` {export_s:.2f} s, serializing {serialize_s:.3f} s "
        f"({size_mib:.1f} MiB, {len(model.graph.node)} nodes).",
        "",
        f"The paper's GoogLeNet embedder (227x227 -> `fc_embedding`, 64-d), CPU, {THREADS} threads "
        f"(`intra_op_num_threads={THREADS}` / `torch.set_num_threads({THREADS})`), median time per batch:",
        "",
        "| batch | ONNX Runtime images/s | PyTorch eager images/s | ONNX Runtime / PyTorch |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {b} | {o:.1f} | {t:.1f} | {o / t:.2f}x |" for b, o, t in rows],
        "",
    ]
    write_section(SECTION, "\n".join(lines), args.results)
    print(f"wrote the {SECTION!r} section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
