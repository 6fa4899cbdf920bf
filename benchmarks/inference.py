"""GoogLeNet inference three ways, side by side in one process: the converted net
eagerly, the same net through `load_net(compile=True)` (torch.compile, inductor, batch
axis dynamic), and its ONNX export in ONNX Runtime. Batches 1, 16 and 64, timed in
turn (one forward of each, repeated), medians.

    python benchmarks/inference.py [--reference DIR] [--seconds S] [--device cpu|cuda] [--no-write]

Prints a table and writes the section "## GoogLeNet inference: eager, compiled, ONNX
Runtime" of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
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
DEFAULT_REFERENCE = ROOT / "tests" / "fixtures" / "caffe-reference"
SECTION = "## GoogLeNet inference: eager, compiled, ONNX Runtime"
THREADS = 2
GOAL = 1.1  # compiled at batch 16 within this factor of ONNX Runtime's time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import onnxruntime as ort

    from caffe_compat.converters.onnx import export_files
    from caffe_compat.loading import load_net

    torch.set_num_threads(THREADS)
    prototxt = args.reference / "nets" / "googlenet_deploy.prototxt"
    caffemodel = prototxt.with_suffix(".caffemodel")
    load_average_start = os.getloadavg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = load_net(prototxt, caffemodel).eval().to(args.device)
        compiled = load_net(prototxt, caffemodel, compile=True).eval().to(args.device)
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "googlenet.onnx"
        export_files(prototxt, caffemodel, onnx_path, outputs=["prob"])
        options = onnxruntime_options(THREADS)
        providers = (["CUDAExecutionProvider"] if args.device.startswith("cuda")
                     and "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"])
        session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    input_name = session.get_inputs()[0].name
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    start = time.perf_counter()
    with torch.inference_mode():
        compiled(torch.zeros(2, 3, 224, 224, device=args.device))
    compile_seconds = time.perf_counter() - start

    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        on_device = images.to(args.device)
        feed = {input_name: images.numpy()}
        with torch.inference_mode():
            reference = eager(on_device)["prob"].cpu().numpy()
            diff_compiled = float(np.abs(compiled(on_device)["prob"].cpu().numpy() - reference).max())
            diff_ort = float(np.abs(session.run(None, feed)[0] - reference).max())
            median = medians(time_in_turn({"eager": lambda: eager(on_device), "compiled": lambda: compiled(on_device),
                                           "onnxruntime": lambda: session.run(None, feed)}, args.seconds, sync))
        rows.append((batch, median, diff_compiled, diff_ort))
        print(f"batch {batch}: " + ", ".join(f"{k} {batch / v:.1f} img/s" for k, v in median.items()), flush=True)

    lines = [SECTION, "", "`python benchmarks/inference.py`: BVLC GoogLeNet deploy (fixture weights, 224x224, "
             f"to `prob`), {THREADS} threads each, device {args.device}.", "",
             machine_line(load_average_start), "",
             f"Compiling (inductor, first call, batch axis dynamic): {compile_seconds:.0f} s; later batch sizes "
             "reuse it. Inductor caches the generated code (its FX graph cache under TORCHINDUCTOR_CACHE_DIR).", "",
             "| batch | eager img/s | compiled img/s | ONNX Runtime img/s | compiled / eager | "
             "compiled time / ONNX Runtime time | max abs diff (compiled, ORT) vs eager |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for batch, median, d_compiled, d_ort in rows:
        lines.append(f"| {batch} | {batch / median['eager']:.1f} | {batch / median['compiled']:.1f} "
                     f"| {batch / median['onnxruntime']:.1f} | {median['eager'] / median['compiled']:.2f}x "
                     f"| {median['compiled'] / median['onnxruntime']:.2f}x | {d_compiled:.1e}, {d_ort:.1e} |")
    at16 = next((r for r in rows if r[0] == 16), None)
    if at16 is not None:
        factor = at16[1]["compiled"] / at16[1]["onnxruntime"]
        lines += ["", f"Goal: compiled at batch 16 within {GOAL}x of ONNX Runtime's time: "
                  f"{'met' if factor <= GOAL else 'NOT met'} ({factor:.2f}x)."]
    lines += ["", load_at_end()]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
