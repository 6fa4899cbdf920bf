"""The nets the project defines equal the paper's own prototxts, layer for layer."""
import glob

import pytest
from google.protobuf import text_format

from caffe_compat.io.files import read_prototxt, read_solver
from caffe_compat.evaluation.recipes import paper_net, paper_solver
from conftest import PAPER_MODEL, require


def _paper_file(pattern):
    folder = require(PAPER_MODEL)
    (path,) = glob.glob(str(folder / pattern))
    return path


def _without_data_paths(net):
    net = type(net).FromString(net.SerializeToString())
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.ClearField("source")
            layer.data_param.ClearField("batch_size")
            layer.transform_param.ClearField("mean_file")
    return net


@pytest.mark.parametrize("pattern, phase", [("train_val_*embed64.prototxt", "TRAIN"),
                                            ("extract_*embed64.prototxt", "TEST")])
def test_paper_net_equals_the_authors_prototxt(pattern, phase):
    theirs = read_prototxt(_paper_file(pattern))
    ours = paper_net(64, phase)
    assert theirs.dialect == ("lifted" if phase == "TRAIN" else "bvlc")  # the extract net has no loss
    a, b = _without_data_paths(ours), _without_data_paths(theirs.net)
    assert [l.name for l in a.layer] == [l.name for l in b.layer]
    for mine, their in zip(a.layer, b.layer):
        # Text form: the two nets may be messages of different dialects.
        assert text_format.MessageToString(mine) == text_format.MessageToString(their), mine.name


def test_paper_solver_equals_the_authors_solver():
    theirs = read_solver(_paper_file("solver_*embed64_baselr_1E4.prototxt"))
    ours = paper_solver(theirs.net, snapshot_prefix=theirs.snapshot_prefix)
    theirs.ClearField("solver_mode")  # GPU in theirs: a device choice, given on our command line
    assert ours == theirs
