"""Building a net with its weights: the two-pass build (sized on the meta device, layers
whose weights are given materialised empty and filled from them) against filling every
layer from its fillers and then copying the weights over it (what `CaffeNet(graph)` +
`load_caffe_weights` does, and what the net did before the two passes).

    python benchmarks/net_build.py [--repeats 5] [--no-write]

Nets: VGG-16 (the deploy net of benchmarks/load_weights.py, 138 M parameters, random
weights in memory; as it is, with no fillers, and with its train_val's gaussian fillers)
and the paper's GoogLeNet embedder (caffe_compat.evaluation.recipes, 6.0 M, xavier fillers).
The three ways are interleaved in one process, each first in turn; medians of --repeats. Writes the section
"## Building a net with its weights" of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from google.protobuf import text_format  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_weights import vgg16_prototxt  # noqa: E402
from bench_common import machine_line, write_section  # noqa: E402

from caffe_compat.deploy import feed_absent_sources  # noqa: E402
from caffe_compat.graph import build_graph  # noqa: E402
from caffe_compat.io.schema import messages  # noqa: E402
from caffe_compat.net import CaffeNet  # noqa: E402
from caffe_compat.evaluation.recipes import paper_net  # noqa: E402

SECTION = "## Building a net with its weights"
WAYS = ("two passes, weights given", "fillers, then weights copied", "fillers only (no weights)")


def graphs():
    vgg = messages("bvlc").NetParameter()
    text_format.Parse(vgg16_prototxt(), vgg)
    gaussian = messages("bvlc").NetParameter()
    gaussian.CopyFrom(vgg)
    for layer in gaussian.layer:  # VGG's train_val fillers; the deploy net has none (constant 0)
        param = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
        if layer.type in ("Convolution", "InnerProduct"):
            param.weight_filler.type, param.weight_filler.std = "gaussian", 0.01
    paper, _ = feed_absent_sources(paper_net(64, "TEST"), "TEST")
    return {"VGG-16 deploy": build_graph(vgg), "VGG-16, gaussian fillers": build_graph(gaussian),
            "paper GoogLeNet embed64": build_graph(paper, dialect="lifted")}


def build(graph, weights, way: str) -> CaffeNet:
    if way == WAYS[0]:
        return CaffeNet(graph, weights)
    net = CaffeNet(graph)
    if way == WAYS[1]:
        net.load_caffe_weights(weights)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    load = os.getloadavg()
    torch.set_num_threads(2)
    rows = []
    for name, graph in graphs().items():
        rng = np.random.default_rng(0)
        weights = {layer: [rng.standard_normal(a.shape, dtype=np.float32) for a in arrays]
                   for layer, arrays in CaffeNet(graph).caffe_weights().items()}
        count = sum(a.size for arrays in weights.values() for a in arrays)
        times = {way: [] for way in WAYS}
        for repeat in range(args.repeats):
            for way in WAYS[repeat % 3:] + WAYS[:repeat % 3]:  # each way first in turn: no order effect
                start = time.perf_counter()
                net = build(graph, weights, way)
                times[way].append(time.perf_counter() - start)
                del net
        base = statistics.median(times[WAYS[1]])
        for way in WAYS:
            median = statistics.median(times[way])
            rows.append(f"| {name} ({count / 1e6:.1f} M) | {way} | {median:.3f} s | {median / base:.2f} |")
            print(rows[-1])
    text = "\n".join([
        SECTION, "",
        f"`python benchmarks/net_build.py --repeats {args.repeats}`: median seconds to build the net, the ways "
        f"interleaved in one process (2 torch threads); ratio to filling then copying. What the two passes "
        f"save is drawing random fillers (gaussian, xavier) for layers whose weights are given; a deploy net "
        f"without fillers (constant 0) has nothing to save.",
        machine_line(load) + " The machine was shared with other engineers' test runs, so the "
        "seconds are noisy; the ratios, measured side by side, less so.", "",
        "| net | way | time | ratio |", "| --- | --- | --- | --- |", *rows, ""])
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the section '{SECTION}'")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    main()
