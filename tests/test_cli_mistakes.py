"""Command-line mistakes in convert, export-onnx, extract, prepare and reproduce end as
bad input does: one line naming the mistake, exit 2, no usage dump."""
import pytest

from caffe_compat.cli.main import main

MISTAKES = [
    (["prepare", "cub", "--source", "x"], "required: -o/--output"),
    (["prepare", "imagenet", "--source", "x", "-o", "y"], "invalid choice: 'imagenet'"),
    (["prepare", "cub", "--source", "x", "-o", "y", "--format", "tfrecord"], "invalid choice: 'tfrecord'"),
    (["extract", "n.prototxt", "w.caffemodel", "--data", "d", "-o", "f.npz", "--batch-size", "two"],
     "--batch-size: invalid int value: 'two'"),
    (["extract", "n.prototxt", "--data", "d", "-o", "f.npz"], "required: weights"),
    (["extract", "n.prototxt", "w.caffemodel", "--data", "d", "-o", "f.npz", "--mean-value"],
     "--mean-value: expected at least one argument"),
    (["reproduce", "--dataset", "cub", "--source", "x", "--weights", "w", "--embedding", "65"],
     "--embedding: invalid choice: 65"),
    (["reproduce", "--dataset", "cub", "--source", "x"], "required: --weights"),
    (["convert", "n.prototxt", "w.caffemodel"], "required: -o/--output"),
    (["convert", "n.prototxt", "w.caffemodel", "-o", "m.pt", "--scale", "half"], "--scale: invalid float value"),
    (["export-onnx", "n.prototxt", "w.caffemodel", "-o", "m.onnx", "--crop-size", "1.5"], "--crop-size: invalid int"),
    (["export-onnx", "n.prototxt", "w.caffemodel"], "required: -o"),
]


@pytest.mark.parametrize("args, needle", MISTAKES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MISTAKES])
def test_one_line_exit_2(capsys, args, needle):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "usage:" not in captured.err, captured.err
    assert lines[0].startswith(f"caffe-compat {args[0]}: error:") and f"caffe-compat {args[0]} --help" in lines[0]
