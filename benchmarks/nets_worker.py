"""One candidate of benchmarks/nets.py, alone in its process: it imports its runtime, loads
the net once, then answers the parent's requests (one JSON object a line on stdin and
stdout) to time forwards, read its peak memory, save its output or profile a forward.

    PYTHON benchmarks/nets_worker.py CANDIDATE PROTOTXT WEIGHTS ONNX OUTPUT C,H,W INPUT_SCALE THREADS

Needs numpy and the candidate's runtime only (real Caffe's candidate runs under the
Python that imports pycaffe, where there is no torch). Whatever the runtime prints goes
to stderr: stdout carries the replies alone.
"""
from __future__ import annotations

import json
import os
import sys
import time

CANDIDATES = ("caffe", "opencv", "eager", "compiled", "onnxruntime")
FORWARD_MARK = "nets_worker.forward"  # the profiler's span of one whole forward


def memory_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak since start or the last reset_peak), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start VmHWM afresh from the resident size now (Linux's clear_refs 5), so that the
    peak read later is the inference's, not the loading's."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def load(candidate: str, prototxt: str, weights: str, onnx: str, output: str, threads: int):
    """Import the candidate's runtime and load the net: (forward(images) -> output array,
    resident KiB right after the import, the profiler of eager forwards or None)."""
    if candidate == "caffe":
        import caffe

        imported = memory_kib("VmRSS")
        caffe.set_mode_cpu()
        net = caffe.Net(prototxt, weights, caffe.TEST)
        name = net.inputs[0]

        def forward(images):
            if net.blobs[name].data.shape != images.shape:
                net.blobs[name].reshape(*images.shape)
                net.reshape()
            net.blobs[name].data[...] = images
            return net.forward()[output]
        return forward, imported, None
    if candidate == "opencv":
        import cv2

        imported = memory_kib("VmRSS")
        cv2.setNumThreads(threads)
        net = cv2.dnn.readNetFromCaffe(prototxt, weights)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def forward(images):
            net.setInput(images)
            return net.forward(output)
        return forward, imported, None
    if candidate == "onnxruntime":
        import onnxruntime

        from bench_common import onnxruntime_options  # stdlib only: also fine beside pycaffe

        imported = memory_kib("VmRSS")
        options = onnxruntime_options(threads)
        session = onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda images: session.run(None, {name: images})[0]), imported, None
    import torch

    from caffe_compat.loading import load_net

    imported = memory_kib("VmRSS")
    torch.set_num_threads(threads)
    net = load_net(prototxt, weights, compile=candidate == "compiled").eval()

    def forward(images):
        with torch.no_grad():
            return net(torch.from_numpy(images))[output].numpy()
    return forward, imported, (lambda images, count: time_outside_operators(forward, images, count))


def time_outside_operators(forward, images, count: int) -> dict:
    """Seconds per forward under torch.profiler, the median over `count` forwards: its wall
    time, the time of its top-level aten operators (those with no aten operator above them)
    and the rest, outside any operator: Python and dispatch between operators, the
    profiler's own bookkeeping, and any native kernel caffe-compat calls itself (LRN's).
    Each forward is measured against its own operators, so load from elsewhere that lands
    on one forward does not leak into another's difference."""
    import statistics

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(count):
            with record_function(FORWARD_MARK):
                forward(images)
    walls, operators = {}, {}
    for event in profiler.events():
        if event.name == FORWARD_MARK:
            walls[event.id] = event.cpu_time_total
            continue
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name != FORWARD_MARK and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is not None and parent.name == FORWARD_MARK:
            operators[parent.id] = operators.get(parent.id, 0.0) + event.cpu_time_total
    per_forward = [(walls[i], operators.get(i, 0.0)) for i in walls]
    return {"wall": statistics.median(w for w, _ in per_forward) / 1e6,
            "operators": statistics.median(o for _, o in per_forward) / 1e6,
            "outside": statistics.median(w - o for w, o in per_forward) / 1e6}


def main(argv) -> int:
    candidate, prototxt, weights, onnx, output, chw, input_scale, threads = argv
    if candidate not in CANDIDATES:
        raise SystemExit(f"nets_worker.py: unknown candidate {candidate!r} (one of {', '.join(CANDIDATES)})")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the runtimes' own prints must not mix with the replies
    sys.stdout = sys.stderr
    import numpy as np

    shape = tuple(int(d) for d in chw.split(","))
    scale = float(input_scale)
    threads = int(threads)
    started = time.perf_counter()
    forward, imported, profiler = load(candidate, prototxt, weights, onnx, output, threads)
    inputs = {}

    def images(batch: int):
        if batch not in inputs:  # the same images in every candidate's process
            rng = np.random.default_rng(batch)
            inputs[batch] = (rng.uniform(-1, 1, (batch,) + shape) * scale).astype(np.float32)
        return inputs[batch]

    forward(images(1))  # first-call work (allocation, inductor's compile) belongs to loading
    replies.write(json.dumps({"import_kib": imported, "loaded_kib": memory_kib("VmRSS"),
                              "load_seconds": time.perf_counter() - started}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        op, batch = request["op"], request.get("batch", 1)
        if op == "reset_peak":
            reset_peak()
            reply = {}
        elif op == "warm":  # a forward untimed (a new batch size's first), then one timed
            forward(images(batch))
            start = time.perf_counter()
            forward(images(batch))
            reply = {"seconds": time.perf_counter() - start}
        elif op == "time":
            start = time.perf_counter()
            for _ in range(request["forwards"]):
                forward(images(batch))
            reply = {"seconds": (time.perf_counter() - start) / request["forwards"]}
        elif op == "peak":
            reply = {"peak_kib": memory_kib("VmHWM")}
        elif op == "output":
            np.save(request["path"], np.asarray(forward(images(batch)), dtype=np.float32))
            reply = {}
        elif op == "overhead" and profiler is not None:
            reply = profiler(images(batch), request["forwards"])
        else:
            reply = {"error": f"{candidate} does not answer {op!r}"}
        replies.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
