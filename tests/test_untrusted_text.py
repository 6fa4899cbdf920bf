"""Text from files reaching the parsers and the terminal (issue 17): the net text a model
file stores is screened as a prototxt is, JSON is bounded in depth, quoted input is cut
short, and names reach the terminal escaped, each on its own one line."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from caffe_compat.cli.main import _one_line_warning, main
from caffe_compat.converters.artifact import read_model, text_sha256, write_payload
from caffe_compat.evaluation.datasets import MARKER, prepared
from caffe_compat.errors import CaffeCompatError, printable, quote, terminal_line
from caffe_compat.io.text import MAX_JSON_DEPTH, parse_json
from conftest import REFERENCE, bounded, require

DEEP = "[" * 5000 + "]" * 5000
HOSTILE_NAME = "evil\ncaffe-compat: error: forged\x1b[31m"
TINY_NET = """name: "tiny"
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "NAME" type: "ReLU" bottom: "x" top: "y" }
"""


def run(capsys, *args):
    """`caffe-compat ARGS` in this process: (exit code, stdout, stderr lines)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def one_error_line(capsys, *args) -> str:
    code, _, lines = run(capsys, *args)
    assert code == 2 and len(lines) == 1, lines
    assert "\x1b" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """conv_basic's model content (numpy weights), to be damaged and written again."""
    folder = require(REFERENCE / "layers")
    model = tmp_path_factory.mktemp("model") / "conv.pt"
    assert main(["convert", str(folder / "conv_basic.prototxt"), str(folder / "conv_basic.caffemodel"),
                 "-o", str(model)]) == 0
    return read_model(model)


def with_net_text(payload, text):
    return {**payload, "net_prototxt": text, "net_sha256": text_sha256(text)}


# ---------------------------------------------------------------- stored net text

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("text, needle", [
    ('name: "' + "\\" * 240_000 + '"\n', "line 1: a string holds a run of 240000 backslashes"),  # minutes unscreened
    ('name: "x"\nname: "' + '\\"' * 120_000 + "\n", "line 2: a string opened with \" never ends"),
    ("\\" * 240_000, "not a valid net"),  # fast to parse, but protobuf quotes all of it
])
def test_stored_net_text_is_screened_as_a_prototxt_is(payload, tmp_path, capsys, suffix, text, needle):
    model = tmp_path / f"hostile{suffix}"
    write_payload(with_net_text(payload, text), model)
    with bounded(10):
        line = one_error_line(capsys, "convert", model, "-o", tmp_path / "back.caffemodel")
    assert f"{model}: key 'net_prototxt': " in line and needle in line and len(line) < 600, line
    assert not (tmp_path / "back.caffemodel").exists()


# ---------------------------------------------------------------- JSON depth

def test_json_nested_deeper_than_the_bound_is_one_error():
    with pytest.raises(CaffeCompatError, match=f"^here: JSON nested more than {MAX_JSON_DEPTH} deep$"):
        parse_json("here", DEEP)
    with pytest.raises(CaffeCompatError, match=f"more than {MAX_JSON_DEPTH} deep"):
        parse_json("here", '{"a": "]]]", "b": ' + "[" * (MAX_JSON_DEPTH + 1))  # brackets in strings do not count
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json("here", nested) == json.loads(nested)
    assert parse_json("here", '{"k": "a \\" [ \\\\", "l": [1, {"m": []}]}') == {"k": 'a " [ \\', "l": [1, {"m": []}]}
    with pytest.raises(CaffeCompatError, match=r"^here: not JSON \("):
        parse_json("here", '"' + '\\"' * 50_000)  # unterminated: linear to scan, refused by json


@pytest.mark.parametrize("key", ["preprocess", "layers", "format_version"])
def test_safetensors_metadata_nested_5000_deep_is_one_line(payload, tmp_path, capsys, key):
    model = tmp_path / "m.safetensors"
    write_payload(payload, model)
    with safe_open(str(model), framework="numpy") as handle:
        metadata = {**handle.metadata(), key: DEEP}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(model), metadata=metadata)
    line = one_error_line(capsys, "convert", model, "-o", tmp_path / "back.caffemodel")
    assert f"{model}: metadata key '{key}': JSON nested more than {MAX_JSON_DEPTH} deep" in line


def test_compare_meta_nested_5000_deep_is_one_line(tmp_path, capsys):
    folder = require(REFERENCE / "layers")
    reference = tmp_path / "ref.npz"
    np.savez(reference, meta=np.array(DEEP), **{"param/conv/0": np.zeros(1, np.float32)})
    line = one_error_line(capsys, "compare", folder / "conv_basic.prototxt", folder / "conv_basic.caffemodel",
                          reference)
    assert f"{reference}: key 'meta': JSON nested more than" in line
    np.savez(reference, meta=np.array("[1, 2]"))
    assert "key 'meta': expected a JSON object" in one_error_line(
        capsys, "compare", folder / "conv_basic.prototxt", folder / "conv_basic.caffemodel", reference)


def test_a_prepared_marker_nested_5000_deep_is_no_finished_preparation(tmp_path):
    (tmp_path / MARKER).write_text(DEEP)
    assert prepared(tmp_path, "cub", tmp_path) is None


# ---------------------------------------------------------------- quoted input cut short

def test_quote_cuts_strings_and_bounds_any_value():
    assert quote("conv") == "'conv'"
    assert quote("x" * 40_000) == "'" + "x" * 200 + "'... (40,000 characters)"
    assert quote("a\nb\x1b") == "'a\\nb\\x1b'"
    nested = []
    for _ in range(5000):
        nested = [nested]
    assert len(quote(nested)) < 100 and len(quote(list(range(40_000)))) < 300


def test_a_40k_character_value_is_quoted_cut_short(payload, tmp_path, capsys):
    model = tmp_path / "m.pt"
    write_payload({**payload, "dialect": "d" * 40_000}, model)
    line = one_error_line(capsys, "convert", model, "-o", tmp_path / "back.caffemodel")
    assert "key 'dialect': 'ddd" in line and "... (40,000 characters) is not a dialect caffe-compat knows" in line
    assert len(line) < 400, len(line)


def test_any_long_message_is_cut_in_its_middle_on_the_terminal(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_NET.replace('bottom: "x"', 'bottom: "' + "b" * 40_000 + '"'))
    line = one_error_line(capsys, "inspect", net)
    assert line.startswith("caffe-compat: error: layer 'NAME': bottom 'bbb") and "characters cut]... bbb" in line
    assert line.endswith("bbb' is produced by no layer of the TEST net") and len(line) < 2100, line


# ---------------------------------------------------------------- names on the terminal

def test_printable_escapes_what_would_move_the_cursor_or_colour_the_terminal():
    assert printable("conv1/3x3 réseau") == "conv1/3x3 réseau"
    assert printable("a\nb\r\tc\x1b[31m\x00\u202e") == "a\\nb\\r\\tc\\x1b[31m\\x00\\u202e"
    assert terminal_line("x" * 10) == "x" * 10 and len(terminal_line("y" * 40_000, 100)) < 140


def test_hostile_layer_name_through_inspect_is_escaped_on_its_row(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_NET.replace("NAME", HOSTILE_NAME.replace("\n", "\\n").replace("\x1b", "\\x1b")))
    code, out, err = run(capsys, "inspect", net)
    assert code == 0, err
    assert "\x1b" not in out and "forged" in out
    rows = [line for line in out.splitlines() if "forged" in line]
    assert len(rows) == 1 and rows[0].startswith(printable(HOSTILE_NAME)) and "ReLU" in rows[0]
    assert not any(line.startswith("caffe-compat: error") for line in out.splitlines())


def test_hostile_layer_name_through_an_error_is_one_escaped_line(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    escaped_in_text = HOSTILE_NAME.replace("\n", "\\n").replace("\x1b", "\\x1b")
    net.write_text(TINY_NET.replace("NAME", escaped_in_text).replace('bottom: "x"', 'bottom: "nowhere"'))
    line = one_error_line(capsys, "inspect", net)
    assert line.startswith(f"caffe-compat: error: layer '{printable(HOSTILE_NAME)}': bottom 'nowhere'"), line


def test_warnings_are_one_escaped_line():
    text = _one_line_warning(UserWarning("layer 'a\nb\x1b[2J' kept"), UserWarning, "f.py", 1)
    assert text == "caffe-compat: warning: layer 'a\\nb\\x1b[2J' kept\n"


def test_hostile_layer_name_through_time_is_escaped(tmp_path, capsys):
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_NET.replace("NAME", HOSTILE_NAME.replace("\n", "\\n").replace("\x1b", "\\x1b")))
    code, out, err = run(capsys, "time", net, "--iterations", "1")
    assert code == 0, err
    assert "\x1b" not in out and f"{printable(HOSTILE_NAME)}\tforward: " in out


def test_hostile_keys_through_compare_are_escaped_on_their_rows(tmp_path, capsys):
    folder = require(REFERENCE / "layers")
    reference = tmp_path / "ref.npz"
    np.savez(reference, **{"param/evil\x1b[31m\rforged/0": np.zeros(2, np.float32)})  # compare's keys hold no \n
    code, out, _ = run(capsys, "compare", folder / "conv_basic.prototxt", folder / "conv_basic.caffemodel",
                       reference)
    assert code == 1 and "\x1b" not in out and "\r" not in out
    assert "param/evil\\x1b[31m\\rforged/0" in out


def test_hostile_net_name_through_train_is_escaped(tmp_path, monkeypatch, capsys):
    target = tmp_path / "solver"
    shutil.copytree(require(REFERENCE / "nets" / "solver"), target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(target)
    train = target / "train.prototxt"
    train.write_text(train.read_text().replace('name: "tiny_lifted"', 'name: "tiny\\nforged\\x1b[31m"', 1))
    code, out, err = run(capsys, "train", "solver.prototxt", "--max-iter", "1")
    assert code == 0, err
    printed = out + "\n".join(err)
    assert "\x1b" not in printed and "tiny\\nforged\\x1b[31m" in printed


def test_command_line_mistakes_are_one_escaped_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["layers", "stray\ncaffe-compat: error: forged\x1b[31m"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "\x1b" not in lines[0]
    assert "unrecognized arguments: stray\\ncaffe-compat: error: forged\\x1b[31m" in lines[0]


# ---------------------------------------------------------------- file content quoted elsewhere

@pytest.fixture
def solver_snapshot(tmp_path, monkeypatch):
    """The solver fixture trained one iteration in a writable copy (the working directory),
    and the solver state it wrote."""
    target = tmp_path / "solver"
    shutil.copytree(require(REFERENCE / "nets" / "solver"), target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(target)
    solver = target / "solver.prototxt"
    solver.write_text(solver.read_text().replace("max_iter: 10", "max_iter: 1")
                      .replace("snapshot: 0", 'snapshot: 1 snapshot_prefix: "snaps/run"'))
    assert main(["train", "solver.prototxt", "--weights", "init.caffemodel"]) == 0
    return torch.load("snaps/run_iter_1.solverstate.pt", weights_only=True)


def test_solver_state_values_are_quoted_cut_short(solver_snapshot, capsys):
    state = solver_snapshot
    cursor = state["readers"]["train"][0]["data"]["cursor"]
    deep = []
    for _ in range(5000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    for position, needle in [("p" * 40_000, "... (40,000 characters) outside the LMDB's"),
                             (deep, "read position [[[[[[[...]]]]]]] outside the LMDB's")]:
        cursor["position"] = position
        sys.setrecursionlimit(20_000)  # pickling recurses once per level; reading back does not
        try:
            torch.save(state, "hostile.solverstate.pt")
        finally:
            sys.setrecursionlimit(limit)
        line = one_error_line(capsys, "train", "solver.prototxt", "--resume", "hostile.solverstate.pt",
                              "--max-iter", "2")
        assert needle in line and len(line) < 400, line
    cursor["position"] = 0
    state["solver"]["type"] = "T" * 40_000
    torch.save(state, "hostile.solverstate.pt")
    line = one_error_line(capsys, "train", "solver.prototxt", "--resume", "hostile.solverstate.pt")
    assert "... (40,000 characters) solver, this one is SGD" in line and len(line) < 400, line


def test_image_list_and_training_log_lines_are_quoted_cut_short(tmp_path):
    from caffe_compat.data.sources import _read_list
    from caffe_compat.evaluation.figures import read_training_log

    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg 0\n" + "x" * 40_000 + "\n")
    cut = r"line 2: expected 'path label', got 'x+'\.\.\. \(40,000 characters\)$"
    with pytest.raises(CaffeCompatError, match=cut):
        _read_list(str(listing), "layer 'data'")
    log = tmp_path / "log.csv"
    log.write_text("iteration,loss,lr\n0,1,0.1\n" + "9," * 20_000 + "\n")
    with pytest.raises(CaffeCompatError) as caught:
        read_training_log(log)
    assert "log.csv:3: expected 3 values, found '9,9," in str(caught.value) and len(str(caught.value)) < 400


def test_archive_entries_hdf5_lists_and_layer_labels_are_quoted_cut_short():
    from caffe_compat.evaluation.datasets import _inside, _integer
    from caffe_compat.io.schema import messages, unknown_fields
    from caffe_compat.layers.hdf5 import _read_file_list

    long = "x" * 40_000
    for call in (lambda: _inside("/" + long, "images.txt:1"), lambda: _integer(long, "labels.txt:1"),
                 lambda: _read_file_list(long, "layer 'h5'")):
        with pytest.raises(CaffeCompatError) as caught:
            call()
        assert "... (40,00" in str(caught.value) and len(str(caught.value)) < 400, str(caught.value)[:400]
    net = messages("bvlc").NetParameter()
    net.layer.add(name=long).MergeFromString(b"\xf8\xf0\x04\x01")  # field 9999, varint 1
    parsed = messages("bvlc").NetParameter.FromString(net.SerializeToString())
    assert unknown_fields(parsed) == ["layer[0] '" + "x" * 200 + "'... (40,000 characters): field 9999"]
