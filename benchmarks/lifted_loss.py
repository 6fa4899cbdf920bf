"""Forward+backward time and peak memory of the lifted structured similarity softmax loss.

    python benchmarks/lifted_loss.py [--update-results] [--sizes N,D,K ...]

Time (median milliseconds of forward + backward, CPU with 2 threads unless --threads, the candidates
timed in alternation so that all see the same machine; each ratio is the median over
rounds of the two times within one round): ours (caffe_compat), today's
(the dense form this one replaced, benchmarks/lifted_dense_baseline.py), the floor
(three n x n x d matrix products: the forward Gram matrix plus the two of the
backward), a straightforward loop over positive pairs doing what the paper's fork
does (skipped where it would take over ~LOOP_BUDGET_S), and pytorch-metric-learning's
LiftedStructureLoss with LpDistance(normalize_embeddings=False) when installed (skipped
where its P x n^2 intermediate would not fit).

Memory: the peak resident memory one forward + backward adds (the floor: its three
products), measured in a child process with glibc's mmap threshold fixed at 4 KiB, so that every large buffer is returned when freed and the peak (VmHWM,
reset through /proc/self/clear_refs before each call) is the call's own. On CUDA,
torch.cuda.max_memory_allocated.

--update-results rewrites the "## Lifted loss" section of benchmarks/RESULTS.md,
leaving the other sections alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from caffe_compat.losses import lifted_struct_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_section  # noqa: E402
from lifted_dense_baseline import dense_lifted_loss  # noqa: E402

SIZES = [(128, 64, 2), (128, 512, 2), (256, 128, 4), (512, 128, 8), (2048, 512, 8),
         (4096, 512, 8), (8192, 512, 8)]
MARGIN = 1.0
LOOP_BUDGET_S = 10.0
MEMORY_MIN_N = 2048  # below, the buffers are within the allocator's and BLAS's own noise
PML_MAX_ELEMENTS = 6e7  # its (ordered positive pairs) x (ordered negative pairs) matrices
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Lifted loss"


class OverBudget(Exception):
    pass


def loop_reference(x, labels, margin, budget_s=None):
    """The fork's Forward_cpu, pair by pair: for each positive pair (i, j), a softmax over
    the negatives of i and of j, the squared hinge, and the gradient accumulated into
    x_i, x_j and each negative. Returns (loss, gradient); raises OverBudget as soon as
    the pairs done so far project a total time over budget_s."""
    n = x.shape[0]
    dist = torch.cdist(x, x)
    same = labels.unsqueeze(1) == labels
    total_pairs = (int(same.sum()) - n) // 2
    grad = torch.zeros_like(x)
    loss, pairs, start = 0.0, 0, time.perf_counter()
    for i in range(n):
        for j in range(i + 1, n):
            if not same[i, j]:
                continue
            if budget_s is not None and pairs in (100, 1000):
                projected = (time.perf_counter() - start) / pairs * total_pairs
                if projected > budget_s:
                    raise OverBudget(projected)
            neg_i, neg_j = (~same[i]).nonzero().squeeze(1), (~same[j]).nonzero().squeeze(1)
            logits = margin - torch.cat([dist[i, neg_i], dist[j, neg_j]])
            soft_maximum = torch.logsumexp(logits, 0)
            hinge = torch.clamp(soft_maximum + dist[i, j], min=0)
            loss += float(hinge) ** 2
            pairs += 1
            pos_step = 2 * hinge / dist[i, j] * (x[i] - x[j])
            grad[i] += pos_step
            grad[j] -= pos_step
            weights = -2 * hinge * torch.softmax(logits, 0)
            for anchor, negs, w in ((i, neg_i, weights[:len(neg_i)]), (j, neg_j, weights[len(neg_i):])):
                steps = (w / dist[anchor, negs]).unsqueeze(1) * (x[anchor] - x[negs])
                grad[anchor] += steps.sum(0)
                grad.index_add_(0, negs, -steps)
    return loss / pairs / 2, grad / pairs / 2


def timed_rounds(fns, sync, min_reps=5, min_seconds=2.0, max_reps=1000, warmup_seconds=0.3):
    """Seconds of each function in `fns` per round, the functions timed in alternation
    within each round so that all of them see the same machine (others' processes come
    and go): a list of rounds, each a list with one time per function."""
    start = time.perf_counter()
    for calls in range(1, max_reps):  # warm caches, the allocator and lazy initialisation
        for fn in fns:
            fn()
            sync()
        if calls >= 3 and time.perf_counter() - start > warmup_seconds:
            break
    rounds, start = [], time.perf_counter()
    while len(rounds) < max_reps and (len(rounds) < min_reps or time.perf_counter() - start < min_seconds):
        times = []
        for fn in fns:
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        rounds.append(times)
    return rounds


def median_ms(fns, sync, **kwargs):
    """Median milliseconds of each function in `fns` (see timed_rounds)."""
    rounds = timed_rounds(fns, sync, **kwargs)
    return [statistics.median(r[i] for r in rounds) * 1e3 for i in range(len(fns))]


def median_ratio(rounds, numerator, denominator) -> float:
    """The median over rounds of one function's time over another's in the same round:
    steadier on a loaded machine than a ratio of medians."""
    return statistics.median(r[numerator] / r[denominator] for r in rounds)


def pml_loss():
    try:
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.losses import LiftedStructureLoss
    except ImportError:
        return None
    return LiftedStructureLoss(neg_margin=MARGIN, pos_margin=0,
                               distance=LpDistance(normalize_embeddings=False))


def fmt(ms):
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def batch(n, d, per_class, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    return x, (torch.arange(n) // per_class).to(device)


def candidates(x, labels):
    """The three timed candidates, by name: each one forward + backward (the floor: its
    three products)."""
    leaf = x.detach().clone().requires_grad_(True)

    def ours():
        leaf.grad = None
        lifted_struct_loss(leaf, labels, MARGIN).backward()

    def todays():
        leaf.grad = None
        dense_lifted_loss(leaf, labels, MARGIN).backward()

    def floor():
        gram = x @ x.T
        gram @ x
        gram.T @ x

    return {"ours": ours, "today": todays, "floor": floor}


def loss_and_grad(fn, x, labels):
    leaf = x.detach().clone().requires_grad_(True)
    loss = fn(leaf, labels, MARGIN)
    loss.backward()
    return loss.detach().double(), leaf.grad.double()


def agreement(x, labels):
    """Relative differences of ours from today's (both float32) and from float64."""
    ours = loss_and_grad(lifted_struct_loss, x, labels)
    today = loss_and_grad(dense_lifted_loss, x, labels)
    exact = loss_and_grad(lifted_struct_loss, x.double(), labels)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())
    return {"loss vs today": rel(ours[0], today[0]), "grad vs today": rel(ours[1], today[1]),
            "loss vs float64": rel(ours[0], exact[0]), "grad vs float64": rel(ours[1], exact[1]),
            "today grad vs float64": rel(today[1], exact[1])}


def peak_bytes(fn, device) -> int:
    """Peak memory that one call of fn adds: CUDA's allocator statistics, or on Linux
    the resident set's high-water mark, reset just before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+)", handle.read(), re.M).group(1))


def memory_in_child(sizes, device, threads):
    """{(n, d, k): {candidate: peak bytes}}, measured in a child process (see the module
    docstring), or None where /proc is not there to measure with."""
    if device.type != "cuda" and not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096")
    sizes = [size for size in sizes if size[0] >= MEMORY_MIN_N]
    if not sizes:
        return None
    spec = json.dumps({"sizes": sizes, "device": str(device), "threads": threads})
    out = subprocess.run([sys.executable, __file__, "--measure-memory", spec], env=env,
                         capture_output=True, text=True, check=True).stdout
    return {tuple(json.loads(key)): value for key, value in json.loads(out).items()}


def measure_memory(spec):
    spec = json.loads(spec)
    device = torch.device(spec["device"])
    peaks = {}
    torch.set_num_threads(spec["threads"])
    for n, d, per_class in spec["sizes"]:
        x, labels = batch(n, d, per_class, device)
        fns = candidates(x, labels)
        for fn in fns.values():
            fn()  # lazy initialisation outside the measurement
        peaks[json.dumps([n, d, per_class])] = {name: peak_bytes(fn, device) for name, fn in fns.items()}
    print(json.dumps(peaks))


def bench_device(device, sync, with_loop, sizes, threads):
    pml = pml_loss()
    memory = memory_in_child(sizes, device, threads)
    time_rows, memory_rows, ratios = [], [], {}
    for n, d, per_class in sizes:
        x, labels = batch(n, d, per_class, device)
        fns = candidates(x, labels)
        rounds = timed_rounds(list(fns.values()), sync, min_reps=7 if n < 4096 else 3)
        ours_ms, today_ms, floor_ms = (statistics.median(r[i] for r in rounds) * 1e3 for i in range(3))
        to_floor, today_to_floor, to_today = (median_ratio(rounds, 0, 2), median_ratio(rounds, 1, 2),
                                              median_ratio(rounds, 0, 1))
        agree = agreement(x, labels)
        notes = [f"vs today's: loss {agree['loss vs today']:.0e}, grad {agree['grad vs today']:.0e}; "
                 f"vs float64: loss {agree['loss vs float64']:.0e}, grad {agree['grad vs float64']:.0e} "
                 f"(today's grad {agree['today grad vs float64']:.0e})"]
        loop_cell = "-"
        if with_loop:
            try:
                t = time.perf_counter()
                loop_reference(x, labels, MARGIN, budget_s=LOOP_BUDGET_S)
                loop_cell = fmt((time.perf_counter() - t) * 1e3)
            except OverBudget as over:
                loop_cell = f"skipped: ~{over.args[0]:.0f} s projected"
        pml_cell = "not installed"
        if pml is not None:
            positives = n * (per_class - 1)
            if positives * n * (n - per_class) > PML_MAX_ELEMENTS:
                pml_cell = "skipped (P x n^2 memory)"
            else:
                def theirs(leaf=x.detach().clone().requires_grad_(True)):
                    leaf.grad = None
                    pml(leaf, labels).backward()
                pml_cell = fmt(median_ms([theirs], sync)[0])
        ratios[(n, d, per_class)] = {"time": to_floor, "vs today": to_today}
        time_rows.append((n, d, per_class, fmt(ours_ms), fmt(today_ms), fmt(floor_ms),
                          f"{to_floor:.2f}x", f"{today_to_floor:.2f}x", f"{to_today:.2f}x",
                          len(rounds), loop_cell, pml_cell, "; ".join(notes)))
        if memory is not None and (n, d, per_class) in memory:
            peak = memory[(n, d, per_class)]
            mib = {name: value / 2 ** 20 for name, value in peak.items()}
            floor_peak = max(peak["floor"], 1)
            ratios[(n, d, per_class)]["memory"] = peak["ours"] / floor_peak
            memory_rows.append((n, d, per_class, f"{mib['ours']:.2f}", f"{mib['today']:.2f}",
                                f"{mib['floor']:.2f}", f"{peak['ours'] / floor_peak:.2f}x",
                                f"{peak['today'] / floor_peak:.2f}x"))
    return time_rows, memory_rows, ratios


TIME_HEAD = ("| n | d | per class | ours (ms) | today's (ms) | floor: 3 matmuls (ms) | ours / floor "
             "| today's / floor | ours / today's | rounds | loop reference (ms) "
             "| pytorch-metric-learning (ms) | check (max relative difference) |")
MEMORY_HEAD = ("| n | d | per class | ours (MiB) | today's (MiB) | floor (MiB) | ours / floor "
               "| today's / floor |")


def table(head, rows):
    columns = head.count("|") - 1
    return "\n".join([head, "|" + " --- |" * columns] +
                     ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# (n, d, per class): (what, limit), from issue 12.
GOALS = [((4096, 512, 8), "time", 2.0, "fwd+bwd within 2.0x the floor at n = 4096, d = 512"),
         ((8192, 512, 8), "memory", 1.5, "peak memory within 1.5x the floor's at n = 8192"),
         ((512, 128, 8), "time", 3.0, "the paper-sized case (n = 512, d = 128, 8 per class) within 3.0x the floor"),
         ((128, 64, 2), "vs today", 1.2, "n = 128, d = 64: within 1.2x today's"),
         ((128, 512, 2), "vs today", 1.2, "n = 128, d = 512: within 1.2x today's")]


def goal_lines(ratios):
    lines = []
    for size, what, limit, text in GOALS:
        if size in ratios and what in ratios[size]:
            value = ratios[size][what]
            lines.append(f"- {text}: {value:.2f}x, {'met' if value <= limit else 'NOT met'}")
    return lines


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        return found.group(1).strip() if found else platform.processor()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-results", action="store_true",
                        help=f"rewrite the '{SECTION}' section of {RESULTS.name}")
    parser.add_argument("--sizes", nargs="+", metavar="N,D,K",
                        help="batch size, dimension, samples per class (default: the table's)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--measure-memory", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        return measure_memory(args.measure_memory)
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else SIZES

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"torch.set_num_threads({args.threads}), load average {load:.1f} at start")
    runs = [("CPU", torch.device("cpu"), lambda: None, True)]
    if torch.cuda.is_available():
        runs.append((f"CUDA: {torch.cuda.get_device_name()}", torch.device("cuda"), torch.cuda.synchronize, False))
    parts = []
    for title, device, sync, with_loop in runs:
        time_rows, memory_rows, ratios = bench_device(device, sync, with_loop, sizes, args.threads)
        parts += ["" if parts else f"CPU: {machine}.", "", f"{title}, time:", "", table(TIME_HEAD, time_rows)]
        if memory_rows:
            parts += ["", f"{title}, peak memory added by one forward + backward:", "",
                      table(MEMORY_HEAD, memory_rows)]
        parts += ["", f"{title}, goals (issue 12):", *goal_lines(ratios)]
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts[0] = parts[0][:-1] + f", {end_load:.1f} at the end."
    body = "\n".join(parts)
    print(body)
    if args.update_results:
        update_results(body)


NOTES = """The floor is what any exact O(n^2 d) form must do: the Gram matrix of the forward
and the two n x n x d products of the backward (as the dense form that this one
replaced computes them), timed alone. Ours works over row blocks of the distance matrix
(caffe_compat/losses/blockwise.py): each block's temporaries (three b x n buffers) fit
64 MiB, so b = 64 MiB / (12 n) rows in float32 (all rows up to n = 2,364, 682 at
n = 8,192); when the n x n softmax / distance quotient fits 64 MiB too (n <= 4,096 in
float32) the forward keeps it and the backward is the two products, otherwise the
backward recomputes each block's distances (four products in all) and nothing n x n is
ever whole. Today's holds five n x n matrices."""


def update_results(body):
    write_section(SECTION, f"{SECTION}\n\n`python benchmarks/lifted_loss.py`: median forward+backward "
                           f"time and peak memory.\n\n{NOTES}\n\n{body}\n")


if __name__ == "__main__":
    main()
