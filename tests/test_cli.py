"""The command line as users meet it: exit codes, one-line errors, no tracebacks."""
import json
import subprocess
import sys

import pytest

from conftest import REFERENCE, require, run_cli


def _bad_inputs(tmp_path):
    conv = require(REFERENCE / "layers" / "conv_basic.caffemodel")
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(conv.read_bytes()[:50])
    empty = tmp_path / "empty.prototxt"
    empty.write_text("")
    garbage = tmp_path / "garbage.prototxt"
    garbage.write_text("}}} not protobuf text {{{")
    wrong_type = tmp_path / "wrong_type.prototxt"
    wrong_type.write_text('layer { name: "c" type: "Convolution" convolution_param { num_output: "many" } }')
    return {
        "truncated caffemodel": (["inspect", REFERENCE / "layers" / "conv_basic.prototxt", truncated], "truncated.caffemodel"),
        "caffemodel as prototxt": (["inspect", conv], None),
        "prototxt as caffemodel": (["inspect", REFERENCE / "layers" / "conv_basic.prototxt",
                                    REFERENCE / "layers" / "conv_basic.prototxt"], "text prototxt"),
        "empty": (["inspect", empty], "empty file"),
        "garbage": (["inspect", garbage], "garbage.prototxt"),
        "wrong field type": (["inspect", wrong_type], "wrong_type.prototxt"),
        "directory": (["inspect", tmp_path], "directory"),
        "missing": (["inspect", tmp_path / "nope.prototxt"], "no such file"),
    }


BAD = ["truncated caffemodel", "prototxt as caffemodel", "empty", "garbage", "wrong field type", "directory",
       "missing"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, case):
    args, needle = _bad_inputs(tmp_path)[case]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-compat: error:"), result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path / "nope.prototxt", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_caffemodel_alone_is_inspected(tmp_path):
    # A caffemodel holds a whole net: inspect takes it in place of a prototxt.
    result = run_cli("inspect", require(REFERENCE / "layers" / "conv_basic.caffemodel"), cwd=tmp_path)
    assert result.returncode == 0 and "conv" in result.stdout


def test_inspect_json_of_the_fork_net(tmp_path):
    result = run_cli("inspect", require(REFERENCE / "nets" / "solver" / "train.prototxt"),
                 REFERENCE / "nets" / "solver" / "init.caffemodel", "--phase", "TRAIN", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["dialect"] == "lifted" and info["weights_dialect"] == "lifted"
    by_name = {r["name"]: r for r in info["layers"]}
    assert by_name["fc_embedding"]["blobs"] == [[8, 16], [8]] and by_name["fc_embedding"]["param_count"] == 136
    assert by_name["loss"]["params"]["lifted_struct_sim_softmax_loss_param"] == {"margin": 1.0}
    assert info["total_params"] == 8 * 27 + 8 + 16 * 72 + 16 + 136


def test_inspect_table_of_googlenet(tmp_path):
    result = run_cli("inspect", require(REFERENCE / "nets" / "googlenet_deploy.prototxt"),
                 REFERENCE / "nets" / "googlenet_deploy.caffemodel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "inception_5b/output" in result.stdout and "total: " in result.stdout


def test_inspect_needs_no_torch(tmp_path):
    # Floors 1-3 (schema, readers, graph) stand without torch: inspect still lists the net.
    code = ("import sys; sys.modules['torch'] = None; from caffe_compat.cli.main import main; "
            f"sys.exit(main(['inspect', {str(require(REFERENCE / 'nets' / 'v1_legacy' / 'v1.prototxt'))!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "conv1" in result.stdout and "upgraded from the legacy format" in result.stdout


def test_every_verb_explains_itself_with_an_example_and_every_option():
    """--help of each verb: a description, an example, and a help text for every option."""
    import argparse

    from caffe_compat.cli.main import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    undocumented = []
    for name, verb in verbs.choices.items():
        page = verb.format_help()
        assert verb.description and "example:\n  caffe-compat" in page, name
        undocumented += [f"{name} {action.option_strings or action.dest}" for action in verb._actions
                         if not action.help and action.dest != "help"]
    assert not undocumented
