"""LRN forward+backward against a ReLU of the same size, at GoogLeNet's two LRN shapes
(and the first in channels_last): the layer as it runs (the C kernel on CPU), its
PyTorch form (one autograd Function, what runs without a C compiler) and the unfused
autograd chain (square, window pool, pow, mul). Interleaved repeats in one process;
medians. Prints a markdown table and writes the section "## LRN" of
benchmarks/RESULTS.md (unless --no-write)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from caffe_compat.layers import lrn
from caffe_compat.layers.lrn import AcrossChannelLRN
from bench_common import load_at_end, machine_line, write_section

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
    layer = AcrossChannelLRN(5, 1e-4, 0.75, 1.0)
    if args.device == "cpu" and lrn._kernel() is None:
        raise SystemExit("the LRN C kernel did not build here: this would time the PyTorch form twice")

    def pytorch_form(x):
        return lrn._LRNFunction.apply(x, lrn.channel_window_sum, 5, 1e-4, 0.75, 1.0, 5)

    candidates = {"ReLU": torch.relu, "unfused": unfused, "PyTorch form": pytorch_form, "layer": layer}
    rows = ["| input (N, C, H, W) | ReLU ms | LRN unfused ms | LRN PyTorch form ms | LRN layer ms "
            "| layer / ReLU | PyTorch form / ReLU | unfused / ReLU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for channels, memory_format in ((64, torch.contiguous_format), (192, torch.contiguous_format),
                                    (64, torch.channels_last)):
        shape = (args.batch, channels, 56, 56)
        x = torch.randn(shape, device=args.device).contiguous(memory_format=memory_format).requires_grad_()
        top_diff = torch.randn(shape, device=args.device).contiguous(memory_format=memory_format)
        times = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, fn in candidates.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(fwd_bwd_seconds(fn, x, top_diff))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        label = f"{shape}" + (" channels_last" if memory_format == torch.channels_last else "")
        rows.append(f"| {label} | {ms['ReLU']:.1f} | {ms['unfused']:.1f} | {ms['PyTorch form']:.1f} "
                    f"| {ms['layer']:.1f} | {ms['layer'] / ms['ReLU']:.2f}x | {ms['PyTorch form'] / ms['ReLU']:.2f}x "
                    f"| {ms['unfused'] / ms['ReLU']:.2f}x |")
    text = "\n".join([SECTION, "", f"`python benchmarks/lrn.py --device {args.device}`: forward + backward "
                      f"(local_size 5, alpha 1e-4, beta 0.75, ACROSS_CHANNELS), {args.repeats} interleaved repeats, "
                      "medians. The layer runs the C kernel on CPU (`caffe_compat/layers/lrn_kernel.c`).", "",
                      machine_line(load_average_start), "", *rows, "",
                      load_at_end()]) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
