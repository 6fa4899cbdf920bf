"""benchmarks/nets.py's parts that are not timing: the half-width net it generates, the
reason it gives for a candidate that died, and its worker's request-reply protocol."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REFERENCE, require, run_cli, run_python

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def nets(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("nets")


def _shapes(prototxt: Path):
    from caffe_compat.graph import build_graph
    from caffe_compat.io.files import read_prototxt
    from caffe_compat.shapes import net_shapes

    net_file = read_prototxt(prototxt)
    graph = build_graph(net_file.net, "TEST", net_file.dialect)
    return graph, net_shapes(graph).blobs


def test_half_width_halves_every_blobs_channels_and_keeps_the_net_valid(nets, tmp_path):
    source = require(REFERENCE / "nets" / "googlenet_deploy.prototxt")
    half = tmp_path / "half.prototxt"
    half.write_text(nets.half_width(source.read_text()))
    graph, full_shapes = _shapes(source)
    _, half_shapes = _shapes(half)
    assert half_shapes.keys() == full_shapes.keys()
    for blob, shape in full_shapes.items():  # GoogLeNet's num_outputs are all even: exact halves
        expected = shape if blob in graph.inputs else (shape[0], shape[1] // 2, *shape[2:])
        assert half_shapes[blob] == expected, blob


def test_half_width_keeps_at_least_one_output(nets):
    assert nets.half_width("inner_product_param { num_output:1 }\nnum_output: 7") == \
        "inner_product_param { num_output:1 }\nnum_output: 3"


def test_failure_reason_names_the_failed_check_or_the_exception(nets):
    glog = ("I1207 02:40:00 net.cpp:84] Creating Layer conv0\n"
            "F1207 02:40:00 layer_factory.hpp:81] Check failed: registry.count(type) == 1 (0 vs. 1) "
            "Unknown layer type: Permute (known types: AbsVal, ...)\n*** Check failure stack trace: ***\n"
            "    @     0x7f caffe::Net<>::Init()\n")
    assert nets.failure_reason(glog).startswith("Check failed: registry.count(type) == 1 (0 vs. 1) "
                                                "Unknown layer type: Permute")
    python = ('Traceback (most recent call last):\n  File "x.py", line 1\n'
              "ModuleNotFoundError: No module named 'caffe'\n")
    assert nets.failure_reason(python) == "ModuleNotFoundError: No module named 'caffe'"
    assert nets.failure_reason("") == "no message"


def test_reset_peak_starts_the_peak_afresh():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import nets_worker as w\n"
            "block = bytearray(300 << 20); before = w.memory_kib('VmHWM'); del block\n"
            "w.reset_peak(); print(before, w.memory_kib('VmHWM'))")
    done = run_python(code, BENCHMARKS)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after < before - (200 << 10)


def test_worker_answers_each_request(tmp_path):
    prototxt = tmp_path / "tiny.prototxt"
    prototxt.write_text('name: "tiny"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
                        '  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }\n'
                        'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n')
    weights = tmp_path / "tiny.caffemodel"
    assert run_cli("convert", prototxt, "--random-init", "-o", weights, cwd=tmp_path).returncode == 0
    worker = subprocess.Popen([sys.executable, str(BENCHMARKS / "nets_worker.py"), "eager", str(prototxt),
                               str(weights), "unused.onnx", "conv", "3,8,8", "1.0", "1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        ready = json.loads(worker.stdout.readline())
        assert 0 < ready["import_kib"] <= ready["loaded_kib"]

        def ask(**request):
            worker.stdin.write(json.dumps(request) + "\n")
            worker.stdin.flush()
            return json.loads(worker.stdout.readline())
        assert ask(op="reset_peak") == {}
        assert ask(op="warm", batch=2)["seconds"] > 0
        assert ask(op="time", batch=2, forwards=3)["seconds"] > 0
        assert ask(op="peak")["peak_kib"] >= ready["import_kib"]
        assert ask(op="output", batch=2, path=str(tmp_path / "out.npy")) == {}
        output = np.load(tmp_path / "out.npy")
        assert output.shape == (2, 4, 6, 6) and (output >= 0).all()
        overhead = ask(op="overhead", batch=1, forwards=2)
        assert 0 < overhead["operators"] < overhead["wall"]
        assert 0 < overhead["outside"] < overhead["wall"]
        assert "error" in ask(op="unknown")
    finally:
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0
