"""Nets too large to run, and devices that are not there, are told in one line before any
work: a batch_size whose blobs cannot fit (train, extract), an LRN window of two billion
channels (its C kernel's scratch is bounded), solver_mode GPU with a device_id this
machine does not have. The commands run under an address-space limit, so a regression
fails here at once instead of calling the OOM killer."""
import os
import resource
import shutil

import pytest
import torch

from caffe_compat.errors import CaffeCompatError
from caffe_compat.memory import check_blob_memory
from caffe_compat.solver import Trainer
from conftest import REFERENCE, require, run_python

ADDRESS_SPACE = 4 * 2 ** 30
CLI = "import sys; from caffe_compat.cli.main import main; sys.exit(main(sys.argv[1:]))"


def run_limited(*args, cwd):
    """`caffe-compat ARGS` in a subprocess that may map at most ADDRESS_SPACE bytes."""
    return run_python(CLI, *args, cwd=cwd, timeout=300,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE)))


@pytest.fixture
def solver_dir(tmp_path, monkeypatch):
    """A copy of the solver fixture (its net reads train_lmdb), as the working directory."""
    target = tmp_path / "solver"
    shutil.copytree(require(REFERENCE / "nets" / "solver"), target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(target)
    return target


def huge_batch(folder, phase: str):
    net = folder / "train.prototxt"
    text = net.read_text().replace("batch_size: 16", "batch_size: 10000000")
    net.write_text(text if phase == "TRAIN" else text.replace("phase: TRAIN", "phase: TEST"))


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("caffe-compat: error: "), \
        result.stderr[-3000:]
    return lines[0]


def test_train_refuses_a_batch_whose_blobs_cannot_fit(solver_dir):
    huge_batch(solver_dir, "TRAIN")
    line = one_error_line(run_limited("train", "solver.prototxt", "--max-iter", 1, cwd=solver_dir))
    assert "train.prototxt: the TRAIN net: its blobs and their gradients need" in line
    assert "blob 'data' (10000000, 3, 20, 20) alone" in line and "more than the memory available" in line


def test_extract_refuses_a_batch_whose_blobs_cannot_fit(solver_dir):
    huge_batch(solver_dir, "TEST")
    (solver_dir / "train.prototxt").write_text((solver_dir / "train.prototxt").read_text()
                                              .split('layer { name: "loss"')[0])
    line = one_error_line(run_limited("extract", "train.prototxt", "final.caffemodel", "--data", "train_lmdb",
                                      "-o", "f.npz", cwd=solver_dir))
    assert "train.prototxt: its TEST net: its blobs need" in line and "(10000000, 3, 20, 20)" in line
    assert not (solver_dir / "f.npz").exists()


LRN_NET = """name: "lrn_window"
layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 5 }} }} }}
layer {{ name: "norm" type: "LRN" bottom: "x" top: "y"
  lrn_param {{ local_size: {size} alpha: 0.5 beta: 0.75 k: 2 {region} }} }}
"""

LRN_VALUES = """
import resource, sys
import numpy as np
import torch
from caffe_compat.layers.lrn import AcrossChannelLRN
resource.setrlimit(resource.RLIMIT_AS, (4 * 2 ** 30, 4 * 2 ** 30))
size = 2000000001
x = torch.linspace(-3, 3, 2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5).requires_grad_()
y = AcrossChannelLRN(size, 0.5, 0.75, 2.0)(x)
y.backward(torch.ones_like(y))
# Every channel lies in every window: Caffe's scale is k + alpha / size * (sum over all channels of x^2).
values = x.detach().numpy()
scale = 2.0 + 0.5 / size * (values ** 2).sum(axis=1, keepdims=True)
expected = values * scale ** -0.75
grad = scale ** -0.75 - 2 * 0.5 * 0.75 / size * values * (values * scale ** -1.75).sum(axis=1, keepdims=True)
print(np.abs(y.detach().numpy() - expected).max(), np.abs(x.grad.numpy() - grad).max())
"""


@pytest.mark.parametrize("region", ["", "norm_region: WITHIN_CHANNEL"])
def test_time_runs_an_lrn_of_two_billion_channels_in_bounded_memory(tmp_path, region):
    (tmp_path / "lrn.prototxt").write_text(LRN_NET.format(size=2000000001, region=region))
    result = run_limited("time", "lrn.prototxt", "--iterations", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "norm\tforward: " in result.stdout and "*** Benchmark ends ***" in result.stdout


def test_an_lrn_window_wider_than_the_kernel_takes_has_caffes_values():
    result = run_python(LRN_VALUES, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(float(error) < 1e-12 for error in result.stdout.split()), result.stdout


def test_solver_mode_gpu_without_cuda_trains_on_the_cpu_and_says_so(solver_dir):
    text = (solver_dir / "solver.prototxt").read_text()
    (solver_dir / "solver.prototxt").write_text(text.replace("solver_mode: CPU", "solver_mode: GPU device_id: 99"))
    result = run_python(CLI, "train", "solver.prototxt", "--max-iter", 1, cwd=solver_dir, timeout=300,
                        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no CUDA, on any machine
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "caffe-compat: warning: solver.prototxt: solver_mode is GPU (device_id 99), but CUDA is not available here: "
        "training on the CPU (--device cpu chooses it without this warning)"]


def test_a_device_id_past_the_gpus_here_is_refused(solver_dir, monkeypatch):
    text = (solver_dir / "solver.prototxt").read_text()
    (solver_dir / "solver.prototxt").write_text(text.replace("solver_mode: CPU", "solver_mode: GPU device_id: 99"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CaffeCompatError, match=r"^solver.prototxt: device_id 99: no such GPU, this machine has 1 "
                                               r"CUDA device\(s\) \(0 to 0\); set device_id or give --device$"):
        Trainer("solver.prototxt")


def test_blobs_on_a_gpu_are_measured_against_the_gpus_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 ** 30, 80 * 2 ** 30))
    blobs = {"data": (64, 3, 1024, 1024)}  # 768 MiB, or 1.5 GiB with the gradients
    check_blob_memory(blobs, "net.prototxt", device="cuda:0")
    with pytest.raises(CaffeCompatError, match=r"^net.prototxt: its blobs and their gradients need 1.5 GiB \(blob "
                                               r"'data' \(64, 3, 1024, 1024\) alone 1.5 GiB\), more than the memory "
                                               r"available on cuda:0 \(1.0 GiB\)$"):
        check_blob_memory(blobs, "net.prototxt", gradients=True, device="cuda:0")
