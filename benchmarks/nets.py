"""Inference on three nets, five runtimes side by side, each in its own process: real Caffe
(pycaffe), OpenCV 4's cv2.dnn, caffe-compat eager (`load_net(...).eval()` under
torch.no_grad()), `load_net(compile=True)`, and ONNX Runtime on our ONNX export. The
ratios of issue 22, re-measured by one command.

    python benchmarks/nets.py [--caffe-python "env PYTHONPATH=/path/to/caffe/python /usr/bin/python3"]
                              [--nets googlenet resnet ssd] [--candidates caffe opencv eager ...]
                              [--rounds 7] [--round-seconds 0.5] [--quick] [--no-write]

Nets: BVLC GoogLeNet (the fixture's weights; batches 1 and 16); KaimingHe's ResNet-50
deploy net at half width (every num_output halved; batches 1 and 8); chuanqi305's
MobileNet-SSD (batches 1 and 8). The last two get random weights written once by
`caffe-compat convert --random-init --seed 0`, which every candidate then reads.

Method: each candidate is a worker process (benchmarks/nets_worker.py) that imports its
runtime, loads the net and runs one forward (compiled's first run of a net compiles it:
minutes on two cores; inductor caches the code for the next run); then, per batch size,
the parent asks each worker in turn to time N forwards (N from one timed forward, to fill
`--round-seconds`), `--rounds` rounds, and reports the median seconds per forward. 2
threads everywhere (torch.set_num_threads, cv2.setNumThreads, ONNX Runtime's intra-op
threads, OpenBLAS and OpenMP through the environment). At batch 1 each worker also
reports its peak resident memory during inference (VmHWM, reset after loading) and its
resident size right after importing its runtime, and eager's time outside operators per
forward (wall minus the top-level aten operators' time, each forward in torch.profiler,
the median of at least 3 forwards).

Real Caffe runs under `--caffe-python` (a command: a Python that imports caffe, e.g. with
PYTHONPATH set through `env`, or a wrapper script); OpenCV needs
`pip install -r benchmarks/requirements.txt`. Without either, the other rows are printed
and the table says which candidate was skipped and why. Writes the section
"## Inference on three nets: real Caffe, OpenCV 4, caffe-compat, ONNX Runtime" of
benchmarks/RESULTS.md unless --no-write. `--quick` is a smoke run (2 short rounds).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench_common import cpu_name, write_section

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "nets_worker.py"
REFERENCE_NETS = ROOT / "tests" / "fixtures" / "caffe-reference" / "nets"
PUBLIC_NETS = ROOT / "tests" / "fixtures" / "public-nets"
RESNET_SOURCES = (PUBLIC_NETS / "ResNet-50-deploy.prototxt", Path("/tmp/resnet50.prototxt"))
SECTION = "## Inference on three nets: real Caffe, OpenCV 4, caffe-compat, ONNX Runtime"
THREADS = 2
CANDIDATES = {"caffe": "real Caffe", "opencv": "OpenCV 4", "eager": "caffe-compat eager",
              "compiled": "compiled", "onnxruntime": "ONNX Runtime (our export)"}
OURS = ("eager", "compiled", "onnxruntime")
RATIO_NAMES = {"eager": "eager", "compiled": "compiled", "onnxruntime": "ORT"}
OVERHEAD_GOAL = 2e-3  # seconds outside operators per eager forward on the ResNet at batch 1


def half_width(prototxt_text: str) -> str:
    """The same net with every num_output halved (at least 1): the ResNet of issue 22."""
    return re.sub(r"(\bnum_output\s*:\s*)(\d+)", lambda m: f"{m.group(1)}{max(1, int(m.group(2)) // 2)}",
                  prototxt_text)


def failure_reason(stderr: str) -> str:
    """The line of a dead worker's stderr that says why: glog's failed check or a Python
    exception's last line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Check failed" in line:
            return line[line.index("Check failed"):][:200]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b", line):
            return line[:200]
    return lines[-1][:200] if lines else "no message"


@dataclass
class Net:
    key: str
    label: str
    prototxt: Path
    weights: Path
    onnx: Path
    output: str
    chw: Tuple[int, int, int]
    batches: Tuple[int, ...]
    input_scale: float = 1.0


@dataclass
class Worker:
    candidate: str
    process: Optional[subprocess.Popen] = None
    stderr: Optional[Path] = None
    skipped: Optional[str] = None  # why there is no number
    facts: Dict[str, float] = field(default_factory=dict)

    def ask(self, **request) -> Optional[dict]:
        """Send one request and read its reply; None (and `skipped` set) if the worker died."""
        if self.skipped is not None:
            return None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.process.wait()
            self.skipped = f"worker died (exit {self.process.returncode}): {failure_reason(self.stderr.read_text())}"
            return None
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def prepare(keys: List[str], folder: Path, big_batches: Dict[str, int]) -> Tuple[List[Net], List[str]]:
    """The nets' files in `folder` (random weights, ONNX exports); and why any is left out."""
    import torch

    from caffe_compat.cli.main import main as cli
    from caffe_compat.converters.onnx import export_files
    from caffe_compat.loading import load_net

    from ssd import PROTOTXT as SSD_PROTOTXT, THRESHOLD as SSD_THRESHOLD

    nets, left_out = [], []
    for key in keys:
        if key == "googlenet":
            prototxt = REFERENCE_NETS / "googlenet_deploy.prototxt"
            net = Net(key, "GoogLeNet", prototxt, prototxt.with_suffix(".caffemodel"), folder / "googlenet.onnx",
                      "prob", (3, 224, 224), (1, big_batches[key]), input_scale=50.0)
        else:
            if key == "resnet":
                source = next((p for p in RESNET_SOURCES if p.exists()), None)
                if source is None:
                    left_out.append("ResNet-50: no deploy prototxt at " + " or ".join(map(str, RESNET_SOURCES)))
                    continue
                text = half_width(source.read_text())
                net = Net(key, "ResNet-50 at half width", folder / "resnet50_half.prototxt",
                          folder / "resnet50_half.caffemodel", folder / "resnet50_half.onnx", "prob",
                          (3, 224, 224), (1, big_batches[key]))
            else:  # SSD's evaluation threshold, so that NMS has candidates (see ssd.py)
                text = SSD_PROTOTXT.read_text().replace(*SSD_THRESHOLD)
                net = Net(key, "MobileNet-SSD", folder / "mobilenet_ssd.prototxt", folder / "mobilenet_ssd.caffemodel",
                          folder / "mobilenet_ssd.onnx", "detection_out", (3, 300, 300), (1, big_batches[key]))
            net.prototxt.write_text(text)
            if cli(["convert", str(net.prototxt), "--random-init", "--seed", "0", "-o", str(net.weights)]) != 0:
                raise SystemExit(f"could not write random weights for {net.prototxt}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_files(net.prototxt, net.weights, net.onnx, outputs=[net.output])
            if key == "ssd":  # every bias starts at 0: scale the images to bring the boxes near 1, as ssd.py does
                probe = load_net(net.prototxt, net.weights).eval()
                with torch.no_grad():
                    loc = probe(torch.rand(1, *net.chw, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                                blobs=["mbox_loc"])["mbox_loc"]
                net.input_scale = 1.0 / float(loc.abs().max())
        nets.append(net)
    return nets, left_out


def start_workers(net: Net, candidates: List[str], caffe_python: Optional[List[str]], logs: Path) -> List[Worker]:
    # OpenMP keeps its default wait policy, as users run it: PASSIVE would put torch's threads
    # to sleep between operators and double its time at batch 1.
    environment = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS),
                       MKL_NUM_THREADS=str(THREADS), GLOG_minloglevel="2")
    workers = []
    for candidate in candidates:
        worker = Worker(candidate)
        workers.append(worker)
        if candidate == "caffe" and caffe_python is None:
            worker.skipped = "no --caffe-python given"
            continue
        if candidate == "opencv" and importlib.util.find_spec("cv2") is None:
            worker.skipped = "cv2 not installed (pip install -r benchmarks/requirements.txt)"
            continue
        python = caffe_python if candidate == "caffe" else [sys.executable]
        worker.stderr = logs / f"{net.key}-{candidate}.log"
        with worker.stderr.open("w") as log:
            worker.process = subprocess.Popen(
                [*python, str(WORKER), candidate, str(net.prototxt), str(net.weights), str(net.onnx), net.output,
                 ",".join(map(str, net.chw)), repr(net.input_scale), str(THREADS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=environment,
                cwd=tempfile.gettempdir())  # not the checkout: its caffe_compat/ would shadow the install
    for worker in workers:  # loading in parallel: the first line each writes says it is ready
        if worker.process is None:
            continue
        line = worker.process.stdout.readline()
        if line:
            worker.facts.update(json.loads(line))
        else:
            worker.process.wait()
            worker.skipped = f"failed to load (exit {worker.process.returncode}): " \
                             f"{failure_reason(worker.stderr.read_text())}"
    return workers


def measure(net: Net, workers: List[Worker], rounds: int, round_seconds: float, folder: Path) -> dict:
    """Median seconds per forward per batch and candidate; at batch 1 the peak memory, the
    outputs' agreement with eager's, and eager's time outside operators."""
    import numpy as np

    result = {"seconds": {}, "peak_kib": {}, "agreement": {}, "overhead": None}
    for batch in net.batches:
        if batch == 1:
            for worker in workers:
                worker.ask(op="reset_peak")
        forwards = {}
        for worker in workers:
            reply = worker.ask(op="warm", batch=batch)
            if reply is not None:
                forwards[worker.candidate] = max(1, round(round_seconds / max(reply["seconds"], 1e-6)))
        times: Dict[str, List[float]] = {worker.candidate: [] for worker in workers}
        for _ in range(rounds):
            for worker in workers:
                reply = worker.ask(op="time", batch=batch, forwards=forwards.get(worker.candidate, 1))
                if reply is not None:
                    times[worker.candidate].append(reply["seconds"])
        result["seconds"][batch] = {c: statistics.median(t) for c, t in times.items()
                                    if t and next(w for w in workers if w.candidate == c).skipped is None}
        if batch == 1:
            for worker in workers:
                reply = worker.ask(op="peak")
                if reply is not None:
                    result["peak_kib"][worker.candidate] = reply["peak_kib"]
            outputs = {}
            for worker in workers:
                path = folder / f"{net.key}-{worker.candidate}.npy"
                if worker.ask(op="output", batch=1, path=str(path)) is not None:
                    outputs[worker.candidate] = np.load(path)
            if "eager" in outputs:
                for candidate, output in outputs.items():
                    if candidate != "eager":
                        result["agreement"][candidate] = agreement(output, outputs["eager"])
            eager = next((w for w in workers if w.candidate == "eager"), None)
            if eager is not None:
                result["overhead"] = eager.ask(op="overhead", batch=1, forwards=max(3, forwards.get("eager", 1)))
        print(f"{net.label}, batch {batch}: " + ", ".join(
            f"{c} {batch / s:.1f} img/s" for c, s in result["seconds"][batch].items()), flush=True)
    return result


def agreement(theirs, eager) -> str:
    """Max abs difference from eager's output over eager's largest magnitude, or how the
    shapes differ."""
    import numpy as np

    if theirs.shape != eager.shape:
        return f"shape {tuple(theirs.shape)} vs {tuple(eager.shape)}"
    if np.ptp(eager) == 0:  # a constant output compares nothing (the ResNet's zero weights)
        return "no check (eager's output is constant)"
    return f"{float(np.abs(theirs - eager).max() / max(float(np.abs(eager).max()), 1e-30)):.1e}"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "flags unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return "flags: " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def runtime_versions(caffe_python: Optional[List[str]]) -> str:
    import onnxruntime
    import torch

    parts = [f"torch {torch.__version__}", f"ONNX Runtime {onnxruntime.__version__}"]
    if importlib.util.find_spec("cv2") is not None:
        import cv2

        parts.append(f"OpenCV {cv2.__version__}")
    if caffe_python is not None:
        parts.append(f"real Caffe under `{shlex.join(caffe_python)}`")
    return ", ".join(parts)


def megabytes(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def report(nets: List[Net], results: Dict[str, dict], skipped: Dict[str, Dict[str, str]], left_out: List[str],
           caffe_python: Optional[List[str]], load_start, rounds: int, quick: bool) -> str:
    candidates = list(CANDIDATES)
    command = ("python benchmarks/nets.py" + (" --caffe-python CMD" if caffe_python else "")
               + (" --quick` (a smoke run)" if quick else "`"))
    lines = [SECTION, "",
             f"`{command}: each candidate in its own process, loaded once; per batch size, the candidates in turn, "
             f"{rounds} rounds, medians; {THREADS} threads everywhere. Images per second. The ResNet is "
             "KaimingHe/deep-residual-networks' ResNet-50 deploy net with every num_output halved (BatchNorm and "
             "Scale after every convolution); it and MobileNet-SSD (confidence_threshold 0.01) have random weights "
             "(`convert --random-init --seed 0`), the same file for every candidate. The ResNet's prototxt names no "
             "fillers, so its weights are Caffe's default, zeros: the kernels take as long (none skips zeros), but "
             "its outputs are all equal.", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, {cpu_flags()}; Python {sys.version.split()[0]}, "
             f"{runtime_versions(caffe_python)}. Load average (1, 5, 15 min) at the start "
             + " ".join(f"{x:.1f}" for x in load_start) + ", at the end "
             + " ".join(f"{x:.1f}" for x in os.getloadavg()) + ".", ""]
    lines += ["| net, batch | " + " | ".join(CANDIDATES[c] for c in candidates)
              + " | eager / OpenCV | compiled / OpenCV | ORT / OpenCV |",
              "| --- | " + " | ".join("---:" for _ in candidates) + " | ---: | ---: | ---: |"]
    eager_behind = []
    for net in nets:
        for batch in net.batches:
            seconds = results[net.key]["seconds"].get(batch, {})
            cells = [f"{batch / seconds[c]:.1f}" if c in seconds else "-" for c in candidates]
            ratios = [f"{seconds['opencv'] / seconds[c]:.2f}x" if c in seconds and "opencv" in seconds else "-"
                      for c in OURS]
            if "eager" in seconds and "opencv" in seconds and seconds["eager"] > seconds["opencv"]:
                eager_behind.append(f"{net.label} at {batch} ({ratios[0]})")
            lines.append(f"| {net.label}, {batch} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Ratios are images per second over OpenCV's (above 1: faster than OpenCV)."]
    compared = any("eager" in r["seconds"].get(b, {}) and "opencv" in r["seconds"].get(b, {})
                   for r in results.values() for b in r["seconds"])
    if compared:
        lines.append("Goal, eager at least as fast as OpenCV 4 on every net and batch: "
                     + ("met." if not eager_behind else "NOT met (" + "; ".join(eager_behind) + ")."))
    notes = [f"{CANDIDATES[c]} on {net}: {why}" for net, reasons in skipped.items() for c, why in reasons.items()]
    if notes or left_out:
        lines += ["", "Not measured: " + "; ".join(left_out + notes) + "."]

    lines += ["", "Memory at batch 1, MB: the process's peak resident size during inference (VmHWM, reset after "
              "loading and the first forward) / that peak minus the resident size right after importing the "
              "runtime (torch and caffe-compat's loader; pycaffe; cv2; onnxruntime), i.e. what the net itself "
              "costs. The goal (inference peak no more than real Caffe's) compares the first, the whole "
              "process, as a user pays it.", "",
              "| net | " + " | ".join(CANDIDATES[c] for c in candidates) + " | import alone |",
              "| --- | " + " | ".join("---:" for _ in candidates) + " | --- |"]
    over_caffe = []
    for net in nets:
        peaks = results[net.key]["peak_kib"]
        imports = results[net.key]["imports"]
        cells = [f"{megabytes(peaks[c])} / {megabytes(peaks[c] - imports[c])}" if c in peaks else "-"
                 for c in candidates]
        lines.append(f"| {net.label} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{c} {megabytes(imports[c])}" for c in candidates if c in imports) + " |")
        if "caffe" in peaks and "eager" in peaks and peaks["eager"] > peaks["caffe"]:
            over_caffe.append(f"{net.label} ({megabytes(peaks['eager'])} MB vs {megabytes(peaks['caffe'])} MB)")
    if any("caffe" in results[n.key]["peak_kib"] and "eager" in results[n.key]["peak_kib"] for n in nets):
        lines += ["", "Goal, eager's inference peak no more than real Caffe's: "
                  + ("met." if not over_caffe else "NOT met (" + "; ".join(over_caffe) + ").")]

    lines += ["", "Outputs at batch 1 against eager's (max abs difference over eager's largest magnitude; same "
              "weights, same images):"]
    for net in nets:
        agreement_cells = results[net.key]["agreement"]
        lines.append(f"- {net.label} (`{net.output}`): "
                     + ("; ".join(f"{CANDIDATES[c]} {a}" for c, a in agreement_cells.items()) or "nothing to compare"))

    lines += ["", "Eager's time outside operators per forward at batch 1, in torch.profiler: each forward's wall "
              "time minus its top-level aten operators' time, the median forward (the profiler's own bookkeeping "
              "counts as outside, so this errs high; GoogLeNet's LRN runs caffe-compat's own C kernel, which "
              "counts as outside too):"]
    for net in nets:
        overhead = results[net.key]["overhead"]
        if overhead is None:
            continue
        goal = ""
        if net.key == "resnet":
            goal = (f"; goal under {OVERHEAD_GOAL * 1e3:.0f} ms: "
                    + ("met" if overhead["outside"] < OVERHEAD_GOAL else "NOT met"))
        lines.append(f"- {net.label}: {overhead['outside'] * 1e3:.1f} ms of {overhead['wall'] * 1e3:.1f} ms "
                     f"(operators {overhead['operators'] * 1e3:.1f} ms){goal}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caffe-python", help="command of a Python that imports pycaffe, e.g. "
                        "\"env PYTHONPATH=/opt/caffe/python /usr/bin/python3\"")
    parser.add_argument("--nets", nargs="+", choices=["googlenet", "resnet", "ssd"],
                        default=["googlenet", "resnet", "ssd"])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=0.5, help="each candidate's share of a round")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of one forward each")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.round_seconds = 2, 0.0
    caffe_python = shlex.split(args.caffe_python) if args.caffe_python else None

    load_start = os.getloadavg()
    results, skipped = {}, {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        started = time.perf_counter()
        nets, left_out = prepare(args.nets, folder, {"googlenet": 16, "resnet": 8, "ssd": 8})
        print(f"nets prepared in {time.perf_counter() - started:.0f} s", flush=True)
        for net in nets:
            started = time.perf_counter()
            workers = start_workers(net, args.candidates, caffe_python, folder)
            print(f"{net.label}: workers loaded in {time.perf_counter() - started:.0f} s", flush=True)
            try:
                results[net.key] = measure(net, workers, args.rounds, args.round_seconds, folder)
            finally:
                for worker in workers:
                    worker.close()
            results[net.key]["imports"] = {w.candidate: w.facts["import_kib"] for w in workers
                                           if w.skipped is None and "import_kib" in w.facts}
            skipped[net.label] = {w.candidate: w.skipped for w in workers if w.skipped is not None}
        text = report(nets, results, skipped, left_out, caffe_python, load_start, args.rounds, args.quick)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
