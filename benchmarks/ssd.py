"""MobileNet-SSD at 300x300 on the CPU, four runtimes side by side in one process on the
same random weights: the converted net eagerly, through `load_net(compile=True)`, its
ONNX export in ONNX Runtime, and OpenCV 4's cv2.dnn (the runtime these nets were run
with; `pip install -r benchmarks/requirements.txt`, skipped when cv2 is missing).
Batches 1 and 8, timed in turn, medians; and DetectionOutput's share of the eager
forward: timed inside each eager forward (forward hooks), and at the deploy file's own
confidence_threshold alone on the net's own bottoms, timed in turn with the whole net.

    python benchmarks/ssd.py [--seconds S] [--batches 1 8] [--no-write]

The net is tests/fixtures/public-nets/MobileNetSSD_deploy.prototxt with
confidence_threshold 0.01 (SSD's evaluation setting, instead of the deploy file's 0.25,
so that NMS has candidates to sift with random weights), its weights written by
`caffe-compat convert --random-init --seed 0`. Every bias starts at 0, so the images
are scaled to bring the location outputs near 1, as a trained net's are. Prints a table
and writes the section "## MobileNet-SSD: eager, compiled, ONNX Runtime, OpenCV" of
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import (load_at_end, machine_line, medians, onnxruntime_options, time_in_turn,  # noqa: E402
                          write_section)

ROOT = Path(__file__).resolve().parents[1]
PROTOTXT = ROOT / "tests" / "fixtures" / "public-nets" / "MobileNetSSD_deploy.prototxt"
SECTION = "## MobileNet-SSD: eager, compiled, ONNX Runtime, OpenCV"
THREADS = 2
THRESHOLD = ("confidence_threshold: 0.25", "confidence_threshold: 0.01")
DEPLOY_THRESHOLD = float(THRESHOLD[0].split(":")[1])  # the deploy file's own
DETECTION_HEADS = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]


def _rows_agree(theirs: np.ndarray, ours: np.ndarray) -> str:
    theirs, ours = theirs.reshape(-1, 7), ours.reshape(-1, 7)
    if theirs.shape != ours.shape:
        return f"{len(theirs)} rows vs {len(ours)}"
    if not np.array_equal(theirs[:, :2], ours[:, :2]):
        return "labels differ"
    return f"same rows, {np.abs(theirs - ours).max():.1e}"


class _Stopwatch:
    """The seconds of a module's latest call, read from forward hooks: DetectionOutput timed
    inside the net's own forward. Timed alone in turn with the runtimes, it met the CPU
    ONNX Runtime's threads still spin on after a run (3-4x its time on 2 cores)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self._started = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._started = time.perf_counter()

    def _stop(self, module, args, output):
        self.seconds = time.perf_counter() - self._started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timing per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import onnxruntime as ort

    from caffe_compat.cli.main import main as cli
    from caffe_compat.converters.onnx import export_files
    from caffe_compat.layers.ssd import DetectionOutput
    from caffe_compat.loading import load_net

    cv2 = importlib.import_module("cv2") if importlib.util.find_spec("cv2") else None
    torch.set_num_threads(THREADS)
    if cv2 is not None:
        cv2.setNumThreads(THREADS)
    load_average_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prototxt, caffemodel = Path(folder) / "deploy.prototxt", Path(folder) / "random.caffemodel"
        prototxt.write_text(PROTOTXT.read_text().replace(*THRESHOLD))
        if cli(["convert", str(prototxt), "--random-init", "--seed", "0", "-o", str(caffemodel)]) != 0:
            return 1
        eager = load_net(prototxt, caffemodel).eval()
        compiled = load_net(prototxt, caffemodel, compile=True).eval()
        onnx_path = Path(folder) / "mobilenet_ssd.onnx"
        export_files(prototxt, caffemodel, onnx_path)
        options = onnxruntime_options(THREADS)
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        opencv = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel)) if cv2 is not None else None
    detection = eager.layers[eager.module_names["detection_out"]]
    inside = _Stopwatch(detection)
    # the same layer as the deploy file sets it: with random weights no score passes 0.25
    deploy_detection = DetectionOutput(dataclasses.replace(
        detection.settings, confidence_threshold=float(np.float32(DEPLOY_THRESHOLD))), "detection_out")
    setup_seconds = time.perf_counter() - started

    with torch.inference_mode():
        probe = eager(torch.rand(1, 3, 300, 300, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                      blobs=["mbox_loc"])["mbox_loc"]
    scale = 1.0 / float(probe.abs().max())
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(torch.zeros(1, 3, 300, 300))
    compile_seconds = time.perf_counter() - start

    rows = []
    for batch in args.batches:
        images = (torch.rand(batch, 3, 300, 300, generator=torch.Generator().manual_seed(batch)) * 2 - 1) * scale
        array = images.numpy()
        with torch.inference_mode():
            blobs = eager(images, blobs=["detection_out"] + DETECTION_HEADS)
            reference = blobs["detection_out"].numpy()
            heads = [blobs[name] for name in DETECTION_HEADS]
            agree = {"compiled": _rows_agree(compiled(images)["detection_out"].numpy(), reference),
                     "onnxruntime": _rows_agree(session.run(None, {"data": array})[0], reference)}
            layer_seconds, shares = [], []

            def run_eager():
                start = time.perf_counter()
                eager(images)
                layer_seconds.append(inside.seconds)
                shares.append(inside.seconds / (time.perf_counter() - start))

            # the deploy threshold's layer right after eager, before the other runtimes' threads
            runs = {"eager": run_eager, "DetectionOutput at deploy threshold": lambda: deploy_detection(*heads),
                    "compiled": lambda: compiled(images), "onnxruntime": lambda: session.run(None, {"data": array})}
            if opencv is not None:
                def run_opencv(array=array):
                    opencv.setInput(array)
                    return opencv.forward()

                agree["opencv"] = _rows_agree(run_opencv(), reference)
                runs["opencv"] = run_opencv
            median = medians(time_in_turn(runs, args.seconds))
        median["DetectionOutput"] = statistics.median(layer_seconds)
        rows.append((batch, median, agree, len(reference.reshape(-1, 7)), statistics.median(shares)))
        print(f"batch {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in median.items()), flush=True)

    runtimes = [name for name in ("eager", "compiled", "onnxruntime", "opencv") if name in rows[0][1]]
    lines = [SECTION, "", "`python benchmarks/ssd.py`: chuanqi305's MobileNet-SSD deploy net (300x300, 21 classes, "
             "1917 priors), random weights (`convert --random-init --seed 0`), confidence_threshold 0.01, "
             f"{THREADS} threads each, CPU. Milliseconds per batch (median, runtimes timed in turn).", "",
             machine_line(load_average_start), "",
             "Where the load average is above the threads used, other processes shared the cores: read the "
             "numbers as a comparison made under the same load, not as the CPU's best.", "",
             f"Set-up (random weights written, nets loaded, ONNX exported, OpenCV read): {setup_seconds:.0f} s. "
             f"Compiling (inductor, first call): {compile_seconds:.0f} s."
             + ("" if opencv is not None else " OpenCV: cv2 not installed, not timed."), "",
             "| batch | " + " | ".join(f"{name} ms" for name in runtimes) + " | DetectionOutput in eager ms (share) "
             f"| DetectionOutput at {DEPLOY_THRESHOLD} ms (share) | rows | detections vs eager ("
             + ", ".join(runtimes[1:]) + ") |",
             "| ---: | " + " | ".join("---:" for _ in runtimes) + " | ---: | ---: | ---: | --- |"]
    for batch, median, agree, count, share in rows:
        deploy = median["DetectionOutput at deploy threshold"] / median["eager"]
        lines.append(f"| {batch} | " + " | ".join(f"{median[name] * 1e3:.1f}" for name in runtimes)
                     + f" | {median['DetectionOutput'] * 1e3:.1f} ({share:.1%}) | "
                     f"{median['DetectionOutput at deploy threshold'] * 1e3:.2f} ({deploy:.1%}) | {count} | "
                     + "; ".join(agree[name] for name in runtimes[1:]) + " |")
    first = rows[0][1]
    if rows[0][0] == 1 and "opencv" in first:
        fastest = min(first["compiled"], first["onnxruntime"])
        lines += ["", "Goals at batch 1: compiled or ONNX Runtime at least as fast as OpenCV: "
                  f"{'met' if fastest <= first['opencv'] else 'NOT met'} ({fastest / first['opencv']:.2f}x OpenCV's "
                  f"time); eager within 1.5x of OpenCV: {'met' if first['eager'] <= 1.5 * first['opencv'] else 'NOT met'} "
                  f"({first['eager'] / first['opencv']:.2f}x)."]
    worst = max(share for *_, share in rows)
    lines += ["", f"Goal: DetectionOutput under 10% of the forward's time: {'met' if worst < 0.1 else 'NOT met'} "
              f"(at most {worst:.1%} at confidence_threshold 0.01, batches "
              + " and ".join(str(batch) for batch, *_ in rows) + ")."]
    lines += ["", load_at_end()]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
