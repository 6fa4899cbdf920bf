"""Crashers found by a mutation campaign over the CLI and the Python API (issue 10), one
test per class: each now ends in one CaffeCompatError line (exit 2 from the CLI)."""
import os

import pytest

from caffe_compat.cli.main import main
from caffe_compat.tools.compare import compare_case
from caffe_compat.errors import CaffeCompatError
from caffe_compat.loading import load_net
from caffe_compat.tools.timing import time_net

from conftest import REFERENCE, require, run_python

CONV = """name: "case"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: %s dim: 11 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "%s"
  convolution_param { num_output: 5 kernel_size: 3 pad: 1 } }
"""


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-compat: error: "), lines
    return lines[0]


def test_non_regular_files_are_refused_not_read_forever(tmp_path):
    """A pipe or a device as --resume or --train-log blocked or read without end."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = """
import sys
from pathlib import Path
from caffe_compat.errors import CaffeCompatError
from caffe_compat.evaluation.figures import read_training_log
from caffe_compat.solver.state import read_state
for path in sys.argv[1:]:
    for read in (read_state, read_training_log):
        try:
            read(Path(path))
        except CaffeCompatError as err:
            print(err)
"""
    done = run_python(code, fifo, "/dev/zero", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and all("not a regular file" in line for line in lines), lines


@pytest.mark.parametrize("verb", ["evaluate", "extract", "convert"])
def test_an_output_that_is_an_input_is_refused_untouched(tmp_path, capsys, verb):
    """`extract -o WEIGHTS`, `evaluate --json FEATURES`, `convert -o WEIGHTS` overwrote the input."""
    given = tmp_path / "given.bin"
    given.write_bytes(b"the user's file")
    alias = tmp_path / "alias.bin"
    os.link(given, alias)  # the same file under another name
    argv = {"evaluate": ["evaluate", str(given), "--json", str(alias)],
            "extract": ["extract", "net.prototxt", str(given), "--data", "lmdb", "-o", str(alias)],
            "convert": ["convert", "net.prototxt", str(given), "-o", str(alias)]}[verb]
    assert main(argv) == 2
    assert "is the input" in one_error_line(capsys)
    assert given.read_bytes() == b"the user's file"


def test_time_refuses_blobs_beyond_memory(tmp_path):
    """Small parameters but a 1.6 TiB blob: torch's allocator traceback before."""
    net = tmp_path / "net.prototxt"
    net.write_text(CONV % (4_000_000_000, "conv"))
    with pytest.raises(CaffeCompatError, match=r"blob 'conv' \(2, 5, 4000000000, 11\).*more than the memory"):
        time_net(net, iterations=1, emit=lambda line: None)


def test_in_place_layer_that_changes_the_shape_is_refused(tmp_path):
    """An in-place Convolution whose output has other channels: a runtime shape error before."""
    net = tmp_path / "net.prototxt"
    net.write_text(CONV % (9, "data"))
    with pytest.raises(CaffeCompatError, match=r"layer 'conv' \(Convolution\): computes 'data' in place but "
                                               r"changes its shape \(2, 3, 9, 11\) -> \(2, 5, 9, 11\)"):
        load_net(net)


def test_convert_seed_out_of_torchs_range(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(CONV % (9, "conv"))
    assert main(["convert", str(net), "--random-init", "--seed", str(2 ** 70), "-o", str(tmp_path / "m.pt")]) == 2
    assert "--seed" in one_error_line(capsys)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--device", "tpu", "not a device"), ("--rtol", "-1", "--rtol -1.0: must be a positive number"),
    ("--grad-rtol", "nan", "--grad-rtol nan: must be a positive number")])
def test_compare_option_mistakes_are_exit_2_not_a_fail_row(capsys, option, value, needle):
    """They were a FAIL row and exit 1, as if the net differed from Caffe."""
    case = require(REFERENCE / "layers")
    files = [str(case / f"conv_basic.{suffix}") for suffix in ("prototxt", "caffemodel", "npz")]
    assert main(["compare", *files, option, value]) == 2
    assert needle in one_error_line(capsys)


def test_compare_case_resolves_the_device():
    case = require(REFERENCE / "layers")
    with pytest.raises(CaffeCompatError, match="not a device"):
        compare_case(case / "conv_basic.prototxt", case / "conv_basic.caffemodel", case / "conv_basic.npz",
                     device="gpu0")


@pytest.mark.parametrize("momenta", ["momentum: 0.9 momentum2: 5", "momentum: 1 momentum2: 0.999"])
def test_adam_momenta_outside_0_1_are_refused(tmp_path, momenta):
    """momentum2 > 1 was a math domain error in the first update; momentum 1 divides by zero."""
    from caffe_compat.io.files import read_solver
    from caffe_compat.solver.rules import check_solver

    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "n.prototxt" type: "Adam" base_lr: 0.01 lr_policy: "fixed" {momenta}')
    with pytest.raises(CaffeCompatError, match=r"Adam's momentum and momentum2 must lie in \[0, 1\)"):
        check_solver(read_solver(solver), str(solver))


def test_param_spec_on_an_input_layer_is_refused(tmp_path):
    """Caffe's Net::Init refuses it (too many params); it was silently ignored."""
    net = tmp_path / "net.prototxt"
    net.write_text((CONV % (9, "conv")).replace('top: "data" input_param', 'top: "data" param { name: "w" } input_param'))
    with pytest.raises(CaffeCompatError, match=r"layer 'data' \(Input\): 1 param specification\(s\) for 0"):
        load_net(net)
