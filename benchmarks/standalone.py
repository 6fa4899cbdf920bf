"""The standalone model.py against the CaffeNet it was written from: BVLC GoogLeNet
(the fixture's weights), `convert -o model.py` loaded with its own `load()`, beside
`load_net(...).eval()` (the inference default: folded, channels-last on CPU, the C LRN
kernel) and `load_net(..., fold=False)` (each layer's own rounding, the numbers model.py
gives), side by side in one process, under torch.no_grad(), medians.

    python benchmarks/standalone.py [--seconds S] [--batches 1 16] [--no-write]

Issue 21's goal: model.py within 5% of the CaffeNet's time. Prints a table and writes the
section "## Standalone model.py against the CaffeNet" of benchmarks/RESULTS.md unless
--no-write.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench_common import load_at_end, machine_line, medians, time_in_turn, write_section

ROOT = Path(__file__).resolve().parents[1]
PROTOTXT = ROOT / "tests" / "fixtures" / "caffe-reference" / "nets" / "googlenet_deploy.prototxt"
SECTION = "## Standalone model.py against the CaffeNet"
THREADS = 2
GOAL = 1.05  # model.py's time over the CaffeNet's


def load_generated(path: Path):
    spec = importlib.util.spec_from_file_location("generated_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timing per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from caffe_compat.cli.main import main as cli
    from caffe_compat.loading import load_net

    torch.set_num_threads(THREADS)
    load_average_start = os.getloadavg()
    weights = PROTOTXT.with_suffix(".caffemodel")
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.py"
        if cli(["convert", str(PROTOTXT), str(weights), "-o", str(source)]) != 0:
            raise SystemExit("convert -o model.py failed")
        standalone = load_generated(source)
    default = load_net(PROTOTXT, weights).eval()
    unfolded = load_net(PROTOTXT, weights, fold=False).eval()
    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference = unfolded(images)["prob"]
            difference = float((standalone(images) - reference).abs().max())
            median = medians(time_in_turn({"model.py": lambda: standalone(images),
                                           "CaffeNet": lambda: default(images),
                                           "CaffeNet fold=False": lambda: unfolded(images)}, args.seconds))
        rows.append((batch, median, difference))
        print(f"batch {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in median.items()), flush=True)

    lines = [SECTION, "", "`python benchmarks/standalone.py`: BVLC GoogLeNet deploy (fixture weights, 224x224, to "
             f"`prob`), {THREADS} threads, CPU, under torch.no_grad(); the three take turns.", "",
             machine_line(load_average_start), "",
             "| batch | model.py ms | CaffeNet ms | CaffeNet fold=False ms | model.py / CaffeNet | "
             "model.py / fold=False | max abs diff, model.py vs fold=False |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for batch, median, difference in rows:
        lines.append(f"| {batch} | {median['model.py'] * 1e3:.1f} | {median['CaffeNet'] * 1e3:.1f} "
                     f"| {median['CaffeNet fold=False'] * 1e3:.1f} "
                     f"| {median['model.py'] / median['CaffeNet']:.2f}x "
                     f"| {median['model.py'] / median['CaffeNet fold=False']:.2f}x | {difference:.1e} |")
    worst = max(median["model.py"] / median["CaffeNet"] for _, median, _ in rows)
    lines += ["", f"Goal: model.py within {GOAL}x of the CaffeNet's time: "
              f"{'met' if worst <= GOAL else 'NOT met'} (worst {worst:.2f}x). model.py runs LRN in its PyTorch "
              "form (it imports only torch) and NCHW without folding, so that its numbers are the CaffeNet's "
              "with fold=False; the CaffeNet's LRN is the C kernel (in the last column's difference too).",
              "", load_at_end()]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
