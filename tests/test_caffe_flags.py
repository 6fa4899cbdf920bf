"""The caffe tool's own flags on train / test / time: rewritten where they map one to one,
answered with the equivalent option in one line where they do not."""
import pytest

from caffe_compat.cli.caffe_flags import translate
from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError


@pytest.mark.parametrize("argv, expected", [
    (["train", "-solver", "s.prototxt", "-weights", "w.caffemodel", "-gpu", "0"],
     ["train", "s.prototxt", "--weights", "w.caffemodel", "--device", "cuda:0"]),
    (["train", "--solver=s.prototxt", "-snapshot=run_iter_5.solverstate.pt"],
     ["train", "s.prototxt", "--resume", "run_iter_5.solverstate.pt"]),
    (["--debug", "test", "-weights", "w.caffemodel", "-model", "net.prototxt", "-iterations", "3"],
     ["--debug", "test", "net.prototxt", "w.caffemodel", "--iterations", "3"]),
    (["time", "-model=net.prototxt", "-phase", "TEST", "--iterations", "2"],
     ["time", "net.prototxt", "--phase", "TEST", "--iterations", "2"]),
    (["train", "s.prototxt", "--weights", "w.caffemodel"], ["train", "s.prototxt", "--weights", "w.caffemodel"]),
    (["convert", "-weights", "x"], ["convert", "-weights", "x"]),  # only the verbs that mirror caffe's
])
def test_caffe_flags_that_map_one_to_one_are_rewritten(argv, expected):
    assert translate(argv) == expected


@pytest.mark.parametrize("argv, answer", [
    (["train", "-solver", "s", "-weights", "a.caffemodel,b.caffemodel"], "give one weights file with --weights"),
    (["train", "-solver", "s", "-gpu", "all"], "torchrun"),
    (["train", "-solver", "s", "-snapshot", "run_iter_5.solverstate"], "Caffe's .solverstate cannot be resumed"),
    (["test", "-solver", "s"], "only `train` takes a solver"),
    (["train", "-model", "n"], "-model belongs to test and time"),
    (["time", "-model", "n", "-stage", "deploy"], "stages are not supported"),
    (["train", "-solver"], "needs a value"),
])
def test_caffe_flags_without_an_equivalent_are_answered_in_one_line(argv, answer, capsys):
    with pytest.raises(CaffeCompatError, match=answer):
        translate(argv)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert answer.split("`")[0] in err and err.count("\n") == 1


def test_caffe_time_command_line_runs_as_written(tmp_path, capsys):
    from conftest import REFERENCE, require

    net = require(REFERENCE / "layers" / "conv_basic.prototxt")
    assert main(["time", f"-model={net}", "-iterations", "1", "-phase", "TEST"]) == 0
    assert "Average Forward pass" in capsys.readouterr().out
