"""Start-up time of the CLI's light verbs, each run in a fresh process.

    python benchmarks/startup.py [--repeats 9] [--before REF]

Times `caffe-compat --help`, `--version`, `layers` and `inspect` (a two-layer prototxt,
BVLC GoogLeNet, the paper's embedder) as a user's shell runs them (the installed
`caffe-compat` script), goal <= 0.5 s each. Beside them, in the same run: the bare
interpreter, and importing torch and onnx (what every call paid when inspect built the
net to learn its shapes). `--before REF` also times `inspect` of the same files from the
git commit REF (extracted to a temporary folder), for a ratio measured side by side.
The commands run round-robin, so that the machine's load falls on all of them alike;
the table gives the median and the fastest of the repeats, and the median CPU time
(user + system) of the process, which a loaded machine inflates less than wall time.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Tuple

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NETS = {
    "two-layer prototxt": [str(SHARED / "caffe-reference" / "layers" / "conv_basic.prototxt")],
    "GoogLeNet prototxt": [str(SHARED / "caffe-reference" / "nets" / "googlenet_deploy.prototxt")],
    "paper's embedder, TRAIN": [str(next((SHARED / "paper-model").glob("train_val_*embed64.prototxt"))),
                                "--phase", "TRAIN"],
}
GOAL_S = 0.5


def cli() -> list:
    script = shutil.which("caffe-compat", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "caffe_compat"]


def old_tree(ref: str, folder: Path) -> Path:
    """The package as it was at commit `ref`, laid out as installed (proto/ and
    converters/ inside caffe_compat/)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "caffe_compat", "proto", "converters"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    for sub in ("proto", "converters"):
        (folder / sub).rename(folder / "caffe_compat" / sub)
    return folder


def time_once(command: list, env, cwd: str) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of the process: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--before", metavar="REF", help="also time inspect from this git commit")
    args = parser.parse_args()
    rows = {
        "python -c pass (the interpreter alone)": ([sys.executable, "-c", "pass"], None),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None),
        "python -c 'import torch, onnx'": ([sys.executable, "-c", "import torch, onnx"], None),
        "caffe-compat --help": (cli() + ["--help"], None),
        "caffe-compat --version": (cli() + ["--version"], None),
        "caffe-compat layers": (cli() + ["layers"], None),
    }
    rows.update({f"caffe-compat inspect ({name})": (cli() + ["inspect"] + argv, None) for name, argv in NETS.items()})
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cwd:
        # (a neutral working directory: `python -m` would import the package from the checkout)
        if args.before:
            env = dict(os.environ, PYTHONPATH=str(old_tree(args.before, Path(folder))))
            rows.update({f"inspect ({name}) at {args.before}": ([sys.executable, "-m", "caffe_compat", "inspect"]
                                                                + argv, env) for name, argv in NETS.items()})
        load_before = os.getloadavg()[0]
        times = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, (command, env) in rows.items():
                times[name].append(time_once(command, env, cwd))
        load_after = os.getloadavg()[0]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    print(f"Machine: {cpu}, {os.cpu_count()} cores; Python {sys.version.split()[0]}; load average (1 min) "
          f"{load_before:.1f} before, {load_after:.1f} after; {args.repeats} repeats, round-robin.\n")
    print("| command | median s | fastest s | median CPU s | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, runs in times.items():
        walls, cpus = zip(*runs)
        goal = f"<= {GOAL_S} s" if name.startswith("caffe-compat") else ""
        print(f"| {name} | {statistics.median(walls):.3f} | {min(walls):.3f} | {statistics.median(cpus):.3f} | {goal} |")


if __name__ == "__main__":
    main()
