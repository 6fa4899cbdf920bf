"""Training speed: one iteration (forward, backward, Caffe's SGD update) of the paper's
GoogLeNet embedder with the lifted loss, in the trainer's default and other precisions
and memory formats, measured side by side, each configuration in its own process (as a
user trains one net; the processes take turns, iteration by iteration, so load from
elsewhere falls on all of them alike), with its process's peak resident memory during
each iteration, against real Caffe's
iteration; and the data pipeline alone (the Data layer over an LMDB of 256x256 JPEG
datums with crop 227, mirror and a mean file), which must deliver at least twice what
the model consumes.

    python benchmarks/train.py [--paper-model DIR] [--cpu-batch N] [--cuda-batch N]
                               [--iterations K] [--caffe-python PATH] [--no-data] [--no-write]

The net is the paper's train_val prototxt with its Data layer replaced by an Input
(random weights from its fillers; batches of same-class pairs, as the paper's LMDB),
run exactly as `caffe-compat train --precision P --memory-format F` runs it. CPU runs
use 2 threads (`--threads`). `--cpu-batch 0` skips the CPU rows (benchmarks/gpu_check.sh on a GPU).
Real Caffe: with `--caffe-python PATH` (a Python that imports a pycaffe built with the
paper's LiftedStructSimilaritySoftmaxLoss, see the oracle's BUILD.md), the same net and
solver are timed there (`solver.step(1)`, in a subprocess before the others, same thread
count); otherwise the ratios are to the iteration issue 22 measured, named as such.
Prints a table and writes the section "## Training" of benchmarks/RESULTS.md (other
sections are left as they are) unless `--no-write`.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench_common import machine_line, write_section  # benchmarks/, the script's folder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAPER_MODEL = ROOT.parent / "shared" / "paper-model"
SECTION = "## Training"
CPU_THREADS = 2
CROP = 227
IMAGE_SIDE = 256


# ---------------------------------------------------------------- the model

def paper_net_param(paper_model: Path, batch: int):
    """The paper's TRAIN net with an Input (data, label) in place of its Data layer:
    (its NetParameter, the prototxt's dialect)."""
    from caffe_compat.io.files import read_prototxt

    path = next(paper_model.glob("train_val_*.prototxt"))
    net_file = read_prototxt(path)
    net = net_file.net
    data = next(layer for layer in net.layer if layer.type == "Data")
    data.type = "Input"
    data.ClearField("data_param")
    data.ClearField("transform_param")
    data.input_param.shape.add().dim.extend([batch, 3, CROP, CROP])
    data.input_param.shape.add().dim.extend([batch])
    return net, net_file.dialect


def paper_net(paper_model: Path, batch: int):
    from caffe_compat.graph import build_graph
    from caffe_compat.net import CaffeNet

    net, dialect = paper_net_param(paper_model, batch)
    return CaffeNet(build_graph(net, "TRAIN", dialect))


def paper_solver(paper_model: Path, net):
    from caffe_compat.io.files import read_solver
    from caffe_compat.solver import CaffeSolver, learnable_params

    param = read_solver(next(paper_model.glob("solver_*.prototxt")))
    return CaffeSolver(param, learnable_params(net))


# (precision, memory format): None is the trainer's default for the device (channels_last on
# CPU); nchw is Caffe's own layout, the fp32 default before channels_last.
CONFIGS = [("fp32", None), ("fp32", "nchw"), ("bf16", "channels_last")]
CUDA_CONFIGS = [("fp32", None), ("bf16", "channels_last"), ("fp16", "channels_last")]
# Issue 22's real Caffe (BVLC, CPU build with OpenBLAS, the paper's layer) on its machine.
ISSUE_CAFFE = {"seconds": 3.40, "peak_gb": 2.6, "batch": 32,
               "source": "real Caffe as issue 22 measured it (AMD EPYC Zen 5, 2 cores, AVX-512 with bf16), "
                         "not on this machine"}


def label(config, device_type: str) -> str:
    from caffe_compat.solver.precision import check_precision

    precision, memory_format = config
    resolved = check_precision(precision, memory_format, device_type)
    return f"{precision}, {resolved}" + (" (the default)" if memory_format is None else "")


class Iteration:
    """One configuration's net, solver and batch; calling it runs one training iteration
    as caffe_compat.solver.trainer.Trainer does."""

    def __init__(self, paper_model: Path, batch: int, device: str, config):
        from caffe_compat.memory import keep_freed_memory
        from caffe_compat.solver.precision import MEMORY_FORMATS, LossScaler, check_precision, losses_in_float32

        self.precision, memory_format = config
        torch.manual_seed(0)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # as the trainer does
        memory_format = check_precision(self.precision, memory_format, self.device.type)
        self.net = paper_net(paper_model, batch).to(self.device, memory_format=MEMORY_FORMATS[memory_format])
        if self.precision != "fp32":
            losses_in_float32(self.net)
        self.solver = paper_solver(paper_model, self.net)
        self.scaler = LossScaler() if self.precision == "fp16" else None
        generator = torch.Generator().manual_seed(1)
        self.inputs = {"data": torch.randn(batch, 3, CROP, CROP, generator=generator).to(self.device),
                       "label": torch.arange(batch // 2).repeat_interleave(2).float().to(self.device)}
        self.keep = [top for top, _ in self.net.loss_terms]

    def __call__(self) -> float:
        from caffe_compat.solver.precision import autocast

        for p in self.solver.params:
            p.tensor.grad = None
        with autocast(self.device, self.precision):
            loss = self.net.loss(self.net.run(dict(self.inputs), keep=self.keep))
        (loss * self.scaler.scale if self.scaler else loss).backward()
        if self.scaler is None or self.scaler.unscale([p.tensor.grad for p in self.solver.params]):
            self.solver.step()
        else:
            self.solver.skip()
        self.net.first_nonfinite_layer()  # the trainer's check after every update
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())


def measure_models(paper_model: Path, batch: int, device: str, iterations: int, configs, threads: int) -> List[Dict]:
    """Seconds per iteration and peak resident memory of each configuration, each in its own
    process (as a user trains one net: its allocator keeps only its own freed memory), the
    processes taking turns iteration by iteration so that load falls on all alike."""
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(
                   {"paper_model": str(paper_model), "batch": batch, "device": device, "config": config,
                    "threads": threads})], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for config in configs]
    try:
        for worker in workers:
            _worker_iteration(worker)  # warm-up: allocations, kernels, lazy inits
        results = [[] for _ in workers]
        for _ in range(iterations):
            for worker, spent in zip(workers, results):
                spent.append(_worker_iteration(worker))
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait()
    return [{"config": config, "batch": batch, "seconds": statistics.median(r["seconds"] for r in spent),
             "best": min(r["seconds"] for r in spent),
             "peak_gb": max(r["peak_gb"] for r in spent) if peak_rss_supported() else None}
            for config, spent in zip(configs, results)]


def _worker_iteration(worker: subprocess.Popen) -> Dict:
    worker.stdin.write("run\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise SystemExit(f"a training worker ended (exit {worker.wait()})")
    return json.loads(line)


def serve_iterations(spec: str) -> int:
    """`--worker SPEC`: build one configuration, then run one iteration per 'run' line on
    stdin, answering each with its seconds and the process's peak resident size during it."""
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    warnings.simplefilter("ignore")
    run = Iteration(Path(spec["paper_model"]), spec["batch"], spec["device"], tuple(spec["config"]))
    for _ in sys.stdin:
        reset_peak_rss()
        start = time.perf_counter()
        run()
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_gb": peak_rss_gb()}), flush=True)
    return 0


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS, which holds what
    the process's allocator keeps for reuse (training keeps freed memory: a user's
    process pays it too)."""
    if peak_rss_supported():
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return 0.0


def bf16_error() -> Optional[float]:
    """Relative L2 error of the solver fixture's final weights trained under bf16, against
    Caffe's own final.caffemodel (fp32 gives ~5e-7)."""
    from caffe_compat.io.files import read_caffemodel, weights_of
    from caffe_compat.solver import train

    fixture = ROOT / "tests" / "fixtures" / "caffe-reference" / "nets" / "solver"
    if not fixture.exists():
        return None
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            previous = os.getcwd()
            os.chdir(fixture)  # the solver's paths resolve from the working directory
            try:
                train("solver.prototxt", weights="init.caffemodel", output=Path(tmp) / f"{precision}.caffemodel",
                      stream=io.StringIO(), precision=precision)
            finally:
                os.chdir(previous)
            ours = weights_of(read_caffemodel(Path(tmp) / f"{precision}.caffemodel"))
            caffe = weights_of(read_caffemodel(fixture / "final.caffemodel"))
            flat = [np.concatenate([a.ravel() for name in caffe for a in weights[name]]) for weights in (ours, caffe)]
            errors[precision] = float(np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1]))
    return errors


# ---------------------------------------------------------------- real Caffe

CAFFE_TIMING = r"""
import json, resource, sys, time
import numpy as np
import caffe

solver_path, iterations, layer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if layer not in caffe.layer_type_list():
    print(json.dumps({"missing": layer}))
    sys.exit(0)
caffe.set_mode_cpu()
solver = caffe.get_solver(solver_path)
net = solver.net
net.blobs["data"].data[...] = np.random.default_rng(1).standard_normal(net.blobs["data"].data.shape)
batch = net.blobs["label"].data.shape[0]
net.blobs["label"].data[...] = np.repeat(np.arange(batch // 2), 2)
times = []
for _ in range(iterations + 1):  # the first warms up
    start = time.perf_counter()
    solver.step(1)
    times.append(time.perf_counter() - start)
times = sorted(times[1:])
print(json.dumps({"seconds": times[len(times) // 2], "best": times[0],
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
"""
LIFTED = "LiftedStructSimilaritySoftmaxLoss"


def measure_caffe(caffe_python: str, paper_model: Path, batch: int, iterations: int, threads: int) -> Dict:
    """Real Caffe's iteration (forward, backward, its solver's update) on the same net and
    solver, in `caffe_python`; {"skipped": why} where that Caffe cannot run it."""
    from google.protobuf import text_format

    from caffe_compat.io.files import read_solver

    with tempfile.TemporaryDirectory() as tmp:
        net, _ = paper_net_param(paper_model, batch)
        (Path(tmp) / "net.prototxt").write_text(text_format.MessageToString(net))
        solver = read_solver(next(paper_model.glob("solver_*.prototxt")))
        for name in ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param", "test_iter",
                     "snapshot_prefix"):
            solver.ClearField(name)
        solver.net = str(Path(tmp) / "net.prototxt")
        solver.test_interval, solver.snapshot, solver.display, solver.max_iter = 0, 0, 0, 10 ** 6
        solver.snapshot_after_train = False
        (Path(tmp) / "solver.prototxt").write_text(text_format.MessageToString(solver))
        environment = dict(os.environ, GLOG_minloglevel="2", OPENBLAS_NUM_THREADS=str(threads),
                           OMP_NUM_THREADS=str(threads))
        done = subprocess.run([caffe_python, "-c", CAFFE_TIMING, str(Path(tmp) / "solver.prototxt"),
                               str(iterations), LIFTED], capture_output=True, text=True, env=environment, cwd=tmp)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"{caffe_python} could not run the paper's net (exit {done.returncode}: {last})"}
    result = json.loads(lines[-1])
    if "missing" in result:
        return {"skipped": f"the Caffe of {caffe_python} has no {LIFTED} layer (the paper's loss): BVLC Caffe "
                           f"without the paper fork's layer cannot run this net"}
    return dict(result, batch=batch, source=f"real Caffe, measured here ({caffe_python}, {threads} threads)")


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

def bf16_support() -> Tuple[List[str], bool]:
    """This CPU's native bf16 flags (/proc/cpuinfo), and whether torch's oneDNN computes bf16."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return sorted(flags & {"avx512_bf16", "amx_bf16"}), torch.ops.mkldnn._is_mkldnn_bf16_supported()


def native_bf16(emulated_row: bool) -> str:
    """Whether this CPU computes bf16 natively, in words; `emulated_row`: whether the bf16 row
    was timed all the same on a CPU without it."""
    found, onednn = bf16_support()
    if found and onednn:
        return f"this CPU has native bf16 ({', '.join(found)})"
    without = (f"this CPU has NO native bf16 (no avx512_bf16 or amx_bf16 flag; oneDNN bf16 "
               f"{'available' if onednn else 'unavailable'})")
    if emulated_row:
        return without + ": its bf16 row is emulated and no measure of the bf16 goal, for CPUs with native bf16"
    return without + ": the bf16 row is left out (`--emulated-bf16` times it, emulated: no measure of the bf16 goal)"


def report(args, rows: List, caffe: Dict, data: Optional[Dict[str, float]], errors) -> str:
    caffe_line = (f"Real Caffe: {caffe['seconds']:.2f} s per iteration at batch {caffe['batch']}, peak RSS "
                  f"{caffe['peak_gb']:.1f} GB: {caffe['source']}.")
    lines = [SECTION, "",
             f"`python benchmarks/train.py --cpu-batch {args.cpu_batch} --iterations {args.iterations} "
             f"--threads {args.threads}{' --caffe-python ' + args.caffe_python if args.caffe_python else ''}` "
             f"({datetime.date.today().isoformat()}).",
             machine_line(args.load_before) + f" Load average (1 min) at the end {os.getloadavg()[0]:.1f}: "
             "where other processes share the cores, absolute figures are lower bounds; the ratios "
             "between our rows come from configurations taking turns iteration by iteration, each in its own process. "
             f"bf16: {native_bf16(args.emulated_bf16)}.",
             "",
             "One training iteration of the paper's GoogLeNet embedder (227x227 crops, `fc_embedding` 64-d, "
             "lifted loss, Caffe's SGD update with the paper's solver, the NaN check), random weights, median "
             f"over the timed iterations ({args.iterations} per configuration). {caffe_line}", "",
             "| device | precision, memory format | batch | s / iteration (median / best) | images/s | "
             "real Caffe's s / iteration over this | peak RSS of the process during an iteration (GB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for device, device_type, device_rows in rows:
        for row in device_rows:
            peak = row["peak_gb"]
            comparable = device_type == "cpu" and row["batch"] == caffe["batch"]
            ratio = f"{caffe['seconds'] / row['seconds']:.2f}x" if comparable else "-"
            lines.append(f"| {device} | {label(row['config'], device_type)} | {row['batch']} | {row['seconds']:.2f} / "
                         f"{row['best']:.2f} | {row['batch'] / row['seconds']:.2f} | {ratio} | "
                         f"{'-' if peak is None else f'{peak:.2f}'} |")
    if errors:
        lines += ["", f"Error of lower precision: the solver fixture (10 SGD iterations) trained with "
                      f"`--precision bf16` ends {errors['bf16']:.2g} (relative L2 over all weights) from Caffe's "
                      f"final.caffemodel; with fp32 {errors['fp32']:.2g}."]
    if data is not None:
        lines += ["",
                  f"Data pipeline alone (`Data` layer, TRAIN: LMDB of {args.data_images} encoded 256x256 JPEG "
                  f"datums, crop 227, mirror, mean file, batch {data['batch']}, {data['threads']} decode threads, "
                  f"one batch prefetched): **{data['images_per_s']:.1f} images/s**.", ""]
        for device, _, device_rows in rows:
            fastest = min(r["seconds"] / r["batch"] for r in device_rows)
            ratio = data["images_per_s"] * fastest
            verdict = "meets" if ratio >= 2 else "does NOT meet"
            lines.append(f"- {device}: the pipeline delivers {ratio:.1f}x what the fastest configuration consumes "
                         f"({verdict} the 2x goal).")
    notes = [note for note in args.notes if note]
    lines += [""] + [f"Note: {note}" for note in notes]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-model", type=Path, default=DEFAULT_PAPER_MODEL)
    parser.add_argument("--cpu-batch", type=int, default=32,
                        help="batch on CPU (default 32; the paper's 128 takes ~25 s per iteration on 2 cores); "
                             "0 skips the CPU rows")
    parser.add_argument("--cuda-batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per configuration")
    parser.add_argument("--threads", type=int, default=CPU_THREADS,
                        help="torch threads on CPU (1 suffers less from other processes on a loaded machine)")
    parser.add_argument("--data-images", type=int, default=512, help="JPEG datums in the generated LMDB")
    parser.add_argument("--data-batches", type=int, default=8)
    parser.add_argument("--data-threads", type=int, help="decode threads (default: the layer's default)")
    parser.add_argument("--caffe-python", help="a Python whose `import caffe` is a pycaffe with the paper's layer: "
                                               "real Caffe's iteration is timed there (default: issue 22's number)")
    parser.add_argument("--no-data", action="store_true", help="skip the data pipeline")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="time the bf16 row on a CPU without native bf16 too (emulated: many times slower)")
    parser.add_argument("--no-errors", action="store_true", help="skip training the solver fixture in fp32 and bf16")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration's process (measure_models)
    args = parser.parse_args()
    if args.worker:
        return serve_iterations(args.worker)
    torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()
    args.notes = []
    if args.cpu_batch not in (0, 128):
        args.notes.append(f"CPU batch {args.cpu_batch} instead of the paper's 128, to fit the time on 2 "
                          f"cores.")
    if not torch.cuda.is_available():
        args.notes.append("no CUDA device here: the CUDA rows (fp32 in NCHW, its default there; bf16 and fp16 "
                          f"with channels_last, batch {args.cuda_batch}) come from running this script (or "
                          "benchmarks/gpu_check.sh) on a GPU.")
    caffe = dict(ISSUE_CAFFE)
    if args.caffe_python and args.cpu_batch:
        measured = measure_caffe(args.caffe_python, args.paper_model, args.cpu_batch, args.iterations, args.threads)
        if "skipped" in measured:
            args.notes.append(f"real Caffe not timed here: {measured['skipped']}.")
            print(f"real Caffe skipped: {measured['skipped']}", flush=True)
        else:
            caffe = measured
            print(f"real Caffe: {caffe['seconds']:.2f} s per iteration, peak RSS {caffe['peak_gb']:.2f} GB", flush=True)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.cpu_batch:
            device = f"CPU ({args.threads} thread{'s' if args.threads > 1 else ''})"
            native = all(bf16_support())
            configs = [c for c in CONFIGS if c[0] != "bf16" or native or args.emulated_bf16]
            rows.append((device, "cpu", measure_models(args.paper_model, args.cpu_batch, "cpu", args.iterations,
                                                       configs, args.threads)))
            for row in rows[-1][2]:
                print(f"{device} {label(row['config'], 'cpu')}: {row['seconds']:.2f} s per iteration, peak RSS "
                      f"{row['peak_gb']:.2f} GB", flush=True)
        if torch.cuda.is_available():
            rows.append(("CUDA", "cuda", measure_models(args.paper_model, args.cuda_batch, "cuda",
                                                        max(args.iterations, 10), CUDA_CONFIGS, args.threads)))
        errors = None if args.no_errors else bf16_error()
        data = None
        if not args.no_data:
            data = measure_data(args.cuda_batch if torch.cuda.is_available() else 128, args.data_images,
                                args.data_batches, args.data_threads)
    text = report(args, rows, caffe, data, errors)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
