"""GoogLeNet: how long loading and converting the Caffe files takes, and how fast the
converted net runs against a hand-written PyTorch GoogLeNet carrying the same weights.

    python benchmarks/googlenet.py [--reference DIR] [--repeats N] [--profile] [--no-write]

Prints a table and writes the section "## GoogLeNet conversion and forward" of
benchmarks/RESULTS.md (other sections are left as they are).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

# Before torch starts OpenMP: idle threads that spin instead of sleeping make forward
# times vary twentyfold on a machine whose cores other processes share.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench_common import load_at_end, time_in_turn, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT / "tests" / "fixtures" / "caffe-reference"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## GoogLeNet conversion and forward"
CPU_THREADS = 2
CAFFE_CPU_IMAGES_PER_S = 11.9  # real Caffe, batch 16, 2 cores of this kind of machine
LOAD_GOAL_S = 0.5


# ---------------------------------------------------------------- the hand-written GoogLeNet

class Inception(nn.Module):
    def __init__(self, channels: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int, pool_proj: int):
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv2d(channels, c1, 1), nn.ReLU(inplace=True))
        self.branch3 = nn.Sequential(nn.Conv2d(channels, c3_reduce, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(c3_reduce, c3, 3, padding=1), nn.ReLU(inplace=True))
        self.branch5 = nn.Sequential(nn.Conv2d(channels, c5_reduce, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(c5_reduce, c5, 5, padding=2), nn.ReLU(inplace=True))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, padding=1, ceil_mode=True),
                                         nn.Conv2d(channels, pool_proj, 1), nn.ReLU(inplace=True))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


# Caffe name, then (input channels, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
INCEPTIONS = {
    "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class HandWrittenGoogLeNet(nn.Module):
    """BVLC GoogLeNet (deploy) as one would write it in PyTorch; returns (logits, prob)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.Conv2d(64, 64, 1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0), nn.MaxPool2d(3, 2, ceil_mode=True))
        pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.body = nn.Sequential(
            Inception(*INCEPTIONS["3a"]), Inception(*INCEPTIONS["3b"]), pool,
            Inception(*INCEPTIONS["4a"]), Inception(*INCEPTIONS["4b"]), Inception(*INCEPTIONS["4c"]),
            Inception(*INCEPTIONS["4d"]), Inception(*INCEPTIONS["4e"]), pool,
            Inception(*INCEPTIONS["5a"]), Inception(*INCEPTIONS["5b"]),
            nn.AvgPool2d(7, 1), nn.Dropout(0.4))
        self.classifier = nn.Linear(1024, 1000)

    def forward(self, x):
        logits = self.classifier(torch.flatten(self.body(self.stem(x)), 1))
        return logits, F.softmax(logits, 1)

    def caffe_layer_convs(self) -> Dict[str, nn.Module]:
        """The Caffe layer each weighted module takes its blobs from."""
        names = {"conv1/7x7_s2": self.stem[0], "conv2/3x3_reduce": self.stem[4], "conv2/3x3": self.stem[6],
                 "loss3/classifier": self.classifier}
        inceptions = [m for m in self.body if isinstance(m, Inception)]
        for key, block in zip(INCEPTIONS, inceptions):
            prefix = f"inception_{key}/"
            names.update({prefix + "1x1": block.branch1[0], prefix + "3x3_reduce": block.branch3[0],
                          prefix + "3x3": block.branch3[2], prefix + "5x5_reduce": block.branch5[0],
                          prefix + "5x5": block.branch5[2], prefix + "pool_proj": block.branch_pool[1]})
        return names


def hand_written_from(weights: Dict[str, List[np.ndarray]]) -> HandWrittenGoogLeNet:
    net = HandWrittenGoogLeNet().eval()
    with torch.no_grad():
        for name, module in net.caffe_layer_convs().items():
            weight, bias = weights[name]
            module.weight.copy_(torch.from_numpy(weight).reshape(module.weight.shape))
            module.bias.copy_(torch.from_numpy(bias).reshape(module.bias.shape))
    return net


# ---------------------------------------------------------------- (a) loading and converting

def _load_timings(prototxt: Path, caffemodel: Path) -> Dict[str, float]:
    """One load, stage by stage (what `load_net` does, with a clock between the steps)."""
    from caffe_compat.graph import build_graph
    from caffe_compat.io.files import read_caffemodel, read_prototxt, weights_of
    from caffe_compat.net import CaffeNet

    times = {}
    start = time.perf_counter()
    net_file = read_prototxt(prototxt)
    times["read prototxt"] = time.perf_counter() - start
    mark = time.perf_counter()
    weights = weights_of(read_caffemodel(caffemodel))
    times["read caffemodel"] = time.perf_counter() - mark
    mark = time.perf_counter()
    graph = build_graph(net_file.net, "TEST", net_file.dialect)
    net = CaffeNet(graph)
    times["build CaffeNet"] = time.perf_counter() - mark
    mark = time.perf_counter()
    net.load_caffe_weights(weights)
    times["copy weights"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return times


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def _load_memory_probe(prototxt: str, caffemodel: str) -> None:
    """Run in a fresh process: peak memory of one `load_net` after the imports."""
    import caffe_compat.loading as loading

    baseline_rss = _rss_kib("VmRSS")
    tracemalloc.start()
    net = loading.load_net(prototxt, caffemodel)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = _rss_kib("VmHWM")
    weights_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    print(json.dumps({"rss_peak_delta_mb": (peak_rss - baseline_rss) / 1024,
                      "tracemalloc_peak_mb": traced_peak / 2**20, "weights_mb": weights_bytes / 2**20}))


def measure_loading(prototxt: Path, caffemodel: Path, repeats: int) -> Dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_timings(prototxt, caffemodel)  # first run pays for lazy imports and caches
        runs = [_load_timings(prototxt, caffemodel) for _ in range(repeats)]
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    probe = subprocess.run([sys.executable, __file__, "--memory-probe", str(prototxt), str(caffemodel)],
                           capture_output=True, text=True, check=True)
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    return {"stages": stages, "best_total": min(r["total"] for r in runs), **memory}


# ---------------------------------------------------------------- (b, c) forward throughput

def measure_forward(ours: nn.Module, theirs: nn.Module, batch: int, device: str, seconds: float,
                    channels_last: bool = False) -> Dict[str, object]:
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, 224, 224, generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        ours_out = ours(images, blobs=["loss3/classifier"])
        theirs_logits, theirs_prob = theirs(images)
        difference = max((ours_out["loss3/classifier"] - theirs_logits).abs().max().item(),
                         (ours_out["prob"] - theirs_prob).abs().max().item())
        times = time_in_turn({"ours": lambda: ours(images), "hand": lambda: theirs(images)}, seconds, sync)
        speeds = {name: {"median": batch / statistics.median(t), "best": batch / min(t)} for name, t in times.items()}
        faulted = ({name: _faulted_mb(lambda: net(images)) for name, net in (("ours", ours), ("hand", theirs))}
                   if device == "cpu" else None)
    return {"batch": batch, "device": device, "channels_last": channels_last, **speeds,
            "faulted_mb": faulted, "max_abs_diff": difference}


def _faulted_mb(run: Callable[[], object]) -> float:
    """Memory the kernel mapped in (minor page faults) during one run: allocations the
    allocator could not serve from memory freed earlier."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / 2**20


def _layer_times(events, repeats: int) -> Dict[Tuple[str, str], float]:
    """(net, kind) -> ms per forward in the `NET::KIND` ranges, less the ranges nested in
    them (the hand-written Inception range keeps its torch.cat; a net's own range keeps
    what runs between its layers)."""
    def is_layer(event) -> bool:
        return "::" in event.name and event.name.split("::")[0] in ("ours", "hand")

    def nested_total(event) -> float:
        return sum(child.cpu_time_total if is_layer(child) else nested_total(child) for child in event.cpu_children)

    times: Dict[Tuple[str, str], float] = {}
    for event in events:
        if is_layer(event):
            key = tuple(event.name.split("::", 1))
            times[key] = times.get(key, 0.0) + (event.cpu_time_total - nested_total(event)) / 1000 / repeats
    return times


def profile_layers(ours: nn.Module, theirs: nn.Module, batch: int, repeats: int) -> List[Tuple[str, float, float]]:
    """Time per kind of layer in each net (torch.profiler, one range per module, the two
    nets run in turn): (kind, ours ms, hand-written ms) per forward, ours' largest
    excess first."""
    from torch.profiler import ProfilerActivity, profile, record_function

    caffe_kinds = {"Convolution": "conv", "ReLU": "relu", "MaxPooling": "max pool", "AvePooling": "avg pool",
                   "AcrossChannelLRN": "lrn", "Concat": "concat", "InnerProduct": "linear", "Dropout": "dropout",
                   "Softmax": "softmax"}
    torch_kinds = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "max pool", nn.AvgPool2d: "avg pool",
                   nn.LocalResponseNorm: "lrn", Inception: "concat", nn.Linear: "linear", nn.Dropout: "dropout"}
    kind_of = {"ours": lambda m: caffe_kinds.get(type(m).__name__), "hand": lambda m: torch_kinds.get(type(m))}
    handles = []
    for tag, net in (("ours", ours), ("hand", theirs)):
        for module in net.modules():
            kind = "between layers" if module is net else kind_of[tag](module)
            if kind is None:
                continue
            ranges = []
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=f"{tag}::{kind}", ranges=ranges: ranges.append(record_function(name).__enter__())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, ranges=ranges: ranges.pop().__exit__(None, None, None)))
    images = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        ours(images)
        theirs(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                ours(images)
                theirs(images)
    for handle in handles:
        handle.remove()
    times = _layer_times(prof.events(), repeats)
    kinds = sorted({kind for _, kind in times}, key=lambda k: times.get(("hand", k), 0.0) - times.get(("ours", k), 0.0))
    # The hand-written softmax runs in its forward: it counts as "between layers" there.
    return [(k, times.get(("ours", k), 0.0), times.get(("hand", k), 0.0)) for k in kinds]


# ---------------------------------------------------------------- report

def machine() -> Dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown"
    info = {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
            "date": datetime.date.today().isoformat(),
            "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _faulted_cell(faulted) -> str:
    return "-" if faulted is None else f"{faulted['ours']:.0f} / {faulted['hand']:.0f}"


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _goals(loading, forward) -> List[str]:
    batch16 = next(r for r in forward if r["device"] == "cpu" and r["batch"] == 16)
    slower = [f"batch {r['batch']} {r['device']}" for r in forward if r["ours"]["median"] < r["hand"]["median"]]
    return [f"- load + convert under {LOAD_GOAL_S} s: {_verdict(loading['stages']['total'] < LOAD_GOAL_S)} "
            f"({loading['stages']['total']:.3f} s median)",
            f"- CPU batch 16 at least {2 * CAFFE_CPU_IMAGES_PER_S:.1f} img/s: "
            f"{_verdict(batch16['ours']['median'] >= 2 * CAFFE_CPU_IMAGES_PER_S)} ({batch16['ours']['median']:.1f} median)",
            "- no slower than the hand-written net: "
            + (_verdict(True) if not slower else f"NOT met at {', '.join(slower)} (medians)")]


def _forward_rows(results: List[Dict[str, object]]) -> List[str]:
    rows = ["| device | batch | layout | ours img/s (median / best) | hand-written img/s (median / best) "
            "| ours / hand (median) | page-faulted MB per forward (ours / hand) | max abs diff |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["ours"]["median"] / r["hand"]["median"]
        rows.append(f"| {r['device']} | {r['batch']} | {'channels_last' if r['channels_last'] else 'NCHW'} "
                    f"| {r['ours']['median']:.1f} / {r['ours']['best']:.1f} "
                    f"| {r['hand']['median']:.1f} / {r['hand']['best']:.1f} | {ratio:.2f} "
                    f"| {_faulted_cell(r['faulted_mb'])} | {r['max_abs_diff']:.2e} |")
    return rows


def report(info, loading, forward, profiled) -> str:
    stages = loading["stages"]
    lines = [SECTION, "",
             "`python benchmarks/googlenet.py`: BVLC GoogLeNet (deploy, 1x3x224x224 input, 7.0 M parameters) from "
             "the reference fixture.", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
             f"### Load and convert (prototxt + caffemodel -> CaffeNet; goal under {LOAD_GOAL_S} s)", "",
             "| stage | median s |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in stages.items()]
    lines += ["", f"Best total {loading['best_total']:.3f} s. Peak memory of one load after the imports: RSS "
              f"+{loading['rss_peak_delta_mb']:.0f} MB, tracemalloc (Python and numpy allocations) "
              f"{loading['tracemalloc_peak_mb']:.0f} MB, for {loading['weights_mb']:.0f} MB of weights.", "",
              f"### Forward (eval, torch.inference_mode; CPU with torch.set_num_threads({CPU_THREADS}))", "",
              f"Goals: at least {2 * CAFFE_CPU_IMAGES_PER_S:.1f} img/s on CPU at batch 16 (twice real Caffe's "
              f"{CAFFE_CPU_IMAGES_PER_S} img/s there), and no slower than the hand-written GoogLeNet "
              "(nn.Conv2d, MaxPool2d(ceil_mode=True), LocalResponseNorm, AvgPool2d, Linear; same weights).", ""]
    lines += _forward_rows(forward)
    lines += ["", load_at_end(), ""]
    lines += _goals(loading, forward)
    if not torch.cuda.is_available():
        lines += ["", "No CUDA device on this machine: the batch 16/128 channels_last GPU rows were not measured."]
    if profiled:
        lines += ["", f"### Where the time goes (torch.profiler, CPU, batch {profiled[0]}, ms per forward)", "",
                  "| layer kind | ours | hand-written | ours - hand |", "|---|---|---|---|"]
        lines += [f"| {k} | {a:.1f} | {b:.1f} | {a - b:+.1f} |" for k, a, b in profiled[1]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--repeats", type=int, default=5, help="timed loads")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per net and batch size")
    parser.add_argument("--profile", action="store_true", help="profile layer kinds even when ours is faster")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--memory-probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        _load_memory_probe(*args.memory_probe)
        return 0

    from caffe_compat.io.files import read_caffemodel, weights_of
    from caffe_compat.loading import load_net

    prototxt = args.reference / "nets" / "googlenet_deploy.prototxt"
    caffemodel = prototxt.with_suffix(".caffemodel")
    torch.set_num_threads(CPU_THREADS)
    info = machine()
    print("\n".join(f"{k}: {v}" for k, v in info.items()))

    loading = measure_loading(prototxt, caffemodel, args.repeats)
    print(f"\nload + convert: {loading['best_total']:.3f} s best, "
          + ", ".join(f"{k} {v:.3f}" for k, v in loading["stages"].items()) + " (medians)")
    print(f"peak memory: RSS +{loading['rss_peak_delta_mb']:.0f} MB, "
          f"tracemalloc {loading['tracemalloc_peak_mb']:.0f} MB, weights {loading['weights_mb']:.0f} MB")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_net(prototxt, caffemodel).eval()
    theirs = hand_written_from(weights_of(read_caffemodel(caffemodel)))
    forward = [measure_forward(ours, theirs, batch, "cpu", args.seconds) for batch in (1, 16)]
    print()
    print("\n".join(_forward_rows(forward)))

    profiled = None
    slower = [r for r in forward if r["ours"]["median"] < r["hand"]["median"]]
    if slower or args.profile:
        batch = slower[-1]["batch"] if slower else 16
        profiled = (batch, profile_layers(ours, theirs, batch, repeats=3))
        print(f"\ntime per layer kind, batch {batch}, ms per forward (ours, hand-written, difference):")
        for kind, a, b in profiled[1]:
            print(f"  {kind:<22} {a:8.1f} {b:8.1f} {a - b:+8.1f}")

    if torch.cuda.is_available():
        ours.to("cuda", memory_format=torch.channels_last)
        theirs.to("cuda", memory_format=torch.channels_last)
        gpu = [measure_forward(ours, theirs, batch, "cuda", args.seconds, channels_last=True) for batch in (16, 128)]
        print("\n".join(_forward_rows(gpu)[2:]))
        forward += gpu

    if not args.no_write:
        write_section(SECTION, report(info, loading, forward, profiled))
        print(f"\nwrote the section '{SECTION}' of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
