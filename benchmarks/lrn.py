"""LRN forward+backward against a ReLU of the same size and against the unfused
autograd chain (square, window pool, pow, mul), at GoogLeNet's two LRN shapes.
Interleaved repeats in one process; medians. Prints a markdown table and writes the
section "## LRN" of benchmarks/RESULTS.md (unless --no-write)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from caffe_compat.layers.lrn import AcrossChannelLRN
from bench_common import machine_line, write_section

SECTION = "## LRN"


def unfused(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """What the layer computed before the fused function (and what autograd differentiates)."""
    squares = (x * x).flatten(2).unsqueeze(1)
    mean = F.avg_pool2d(squares, (size, 1), stride=1, padding=((size - 1) // 2, 0), count_include_pad=True)
    return x * (mean.reshape(x.shape) * alpha + k).pow(-beta)


def fwd_bwd_seconds(fn, x, top_diff):
    start = time.perf_counter()
    y = fn(x)
    torch.autograd.grad(y, x, top_diff)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_average_start = os.getloadavg()
    fused = AcrossChannelLRN(5, 1e-4, 0.75, 1.0)
    candidates = {"ReLU": torch.relu, "LRN unfused": unfused, "LRN fused": fused}
    rows = ["| input (N, C, H, W) | ReLU ms | LRN unfused ms | LRN fused ms | fused / ReLU | unfused / ReLU |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for channels in (64, 192):
        shape = (args.batch, channels, 56, 56)
        x = torch.randn(shape, device=args.device, requires_grad=True)
        top_diff = torch.randn(shape, device=args.device)
        times = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, fn in candidates.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(fwd_bwd_seconds(fn, x, top_diff))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows.append(f"| {shape} | {ms['ReLU']:.1f} | {ms['LRN unfused']:.1f} | {ms['LRN fused']:.1f} "
              f"| {ms['LRN fused'] / ms['ReLU']:.2f}x | {ms['LRN unfused'] / ms['ReLU']:.2f}x |")
    text = "\n".join([SECTION, "", f"`python benchmarks/lrn.py --device {args.device}`: forward + backward "
                      f"(local_size 5, ACROSS_CHANNELS), {args.repeats} interleaved repeats, medians.", "",
                      machine_line(load_average_start), "", *rows, "",
                      "Load average at the end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + "."]) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
