"""What the benchmark scripts share: the machine they ran on, timing candidates in turn,
and their own section of RESULTS.md replaced in place (the others left as they are)."""
from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(load_average_start) -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"Machine: {cpu_name()}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}. Load average (1, 5, 15 min) at the start "
            + " ".join(f"{x:.1f}" for x in load_average_start) + ".")


def load_at_end() -> str:
    """The sentence a benchmark's section ends with: the load average as it finished."""
    return "Load average at the end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + "."


def time_in_turn(runs: Dict[str, Callable[[], object]], seconds: float,
                 sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds of each call of each run, the runs called one after another in turn for
    `seconds` (at least 5 calls each, after one warm-up call), so that load from
    elsewhere on the machine hits all of them alike."""
    for run in runs.values():
        run()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 5:
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def write_section(section: str, text: str, results: Path = RESULTS) -> None:
    """Replace the section headed `section` (up to the next '## ') with `text`, or append it."""
    from caffe_compat.io.atomic import write_text

    existing = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(existing):
        updated = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", existing, count=1)
    else:
        updated = existing.rstrip("\n") + "\n\n" + text
    write_text(results, updated.rstrip("\n") + "\n")


def onnxruntime_options(threads: int):
    """ONNX Runtime's session options for timing beside other runtimes: `threads` intra-op
    threads that do not spin once a run ends (spinning, they take the cores from the
    candidate timed next)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options
