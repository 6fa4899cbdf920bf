"""Forward+backward time of the lifted structured similarity softmax loss.

    python benchmarks/lifted_loss.py [--update-results]

Columns (median milliseconds of forward + backward, CPU with 2 threads): ours
(caffe_compat), a straightforward loop over positive pairs doing what the paper's fork
does (skipped where it would take over ~30 s), pytorch-metric-learning's
LiftedStructureLoss with LpDistance(normalize_embeddings=False) when installed (skipped
where its P x n^2 intermediate would not fit), and the floor: three n x n x d matrix
products (forward Gram matrix plus the two of the backward). On a machine with CUDA the
same table is printed for the GPU. --update-results rewrites the "## Lifted loss"
section of benchmarks/RESULTS.md, leaving the other sections alone.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from caffe_compat.losses import lifted_struct_loss

SIZES = [(128, 64, 2), (128, 512, 2), (256, 128, 4), (512, 128, 8), (2048, 512, 8)]
MARGIN = 1.0
LOOP_BUDGET_S = 30.0
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


def median_ms(fns, sync, min_reps=5, min_seconds=1.0, max_reps=1000, warmup_seconds=0.3):
    """Median milliseconds of each function in `fns`, timed in alternation so that
    all of them see the same machine (others' processes come and go)."""
    start = time.perf_counter()
    for calls in range(1, max_reps):  # warm caches, the allocator and lazy initialisation
        for fn in fns:
            fn()
            sync()
        if calls >= 3 and time.perf_counter() - start > warmup_seconds:
            break
    times, start = [[] for _ in fns], time.perf_counter()
    while len(times[0]) < max_reps and (len(times[0]) < min_reps or time.perf_counter() - start < min_seconds):
        for fn, fn_times in zip(fns, times):
            t = time.perf_counter()
            fn()
            sync()
            fn_times.append(time.perf_counter() - t)
    return [statistics.median(fn_times) * 1e3 for fn_times in times]


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


def bench_device(device, sync, with_loop):
    pml = pml_loss()
    rows = []
    for n, d, per_class in SIZES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
        labels = (torch.arange(n) // per_class).to(device)

        def ours():
            x.grad = None
            lifted_struct_loss(x, labels, MARGIN).backward()

        a = x.detach()

        def floor():
            gram = a @ a.T
            gram @ a
            gram.T @ a

        ours_ms, floor_ms = median_ms([ours, floor], sync)
        loss = lifted_struct_loss(x, labels, MARGIN)
        x.grad = None
        loss.backward()
        notes = []

        loop_cell = "-"
        if with_loop:
            try:
                t = time.perf_counter()
                ref_loss, ref_grad = loop_reference(a, labels, MARGIN, budget_s=LOOP_BUDGET_S)
                loop_cell = fmt((time.perf_counter() - t) * 1e3)
                notes.append(f"loop agrees to {abs(ref_loss - loss.item()) / abs(ref_loss):.0e} "
                             f"(loss), {((ref_grad - x.grad).abs().max() / ref_grad.abs().max()).item():.0e} (grad)")
            except OverBudget as over:
                loop_cell = f"skipped: ~{over.args[0]:.0f} s projected"

        pml_cell = "not installed"
        if pml is not None:
            positives = n * (per_class - 1)
            if positives * n * (n - per_class) > PML_MAX_ELEMENTS:
                pml_cell = "skipped (P x n^2 memory)"
            else:
                def theirs():
                    x.grad = None
                    pml(x, labels).backward()
                pml_cell = fmt(median_ms([theirs], sync)[0])
                notes.append(f"pml agrees to {abs(pml(x, labels).item() - loss.item()) / loss.item():.0e}")
        rows.append((n, d, per_class, fmt(ours_ms), loop_cell, pml_cell, fmt(floor_ms),
                     f"{ours_ms / floor_ms:.1f}x", "; ".join(notes)))
    return rows


def table(rows):
    head = ("| n | d | per class | ours (ms) | loop reference (ms) | pytorch-metric-learning (ms) "
            "| floor: 3 matmuls (ms) | ours / floor | check |\n|" + " --- |" * 9)
    return "\n".join([head] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


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
    args = parser.parse_args()

    torch.set_num_threads(2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"torch.set_num_threads(2), load average {load:.1f} at start")
    parts = [f"CPU: {machine}.", "", table(bench_device("cpu", lambda: None, with_loop=True))]
    if torch.cuda.is_available():
        parts += ["", f"CUDA: {torch.cuda.get_device_name()}.", "",
                  table(bench_device("cuda", torch.cuda.synchronize, with_loop=False))]
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts[0] = parts[0][:-1] + f", {end_load:.1f} at the end."
    body = "\n".join(parts)
    print(body)
    if args.update_results:
        update_results(body)


def update_results(body):
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = (f"{SECTION}\n\n`python benchmarks/lifted_loss.py`: median forward+backward "
               f"time.\n\n{body}\n")
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
