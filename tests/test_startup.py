"""Start-up: `inspect` of a prototxt, `layers` and `--version` import neither torch nor
onnx (timings are benchmarks/startup.py's), and the verbs print what they promise."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from caffe_compat import __version__
from caffe_compat.layers.catalog import CATALOG, format_markdown
from conftest import PAPER_MODEL, REFERENCE, require, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
HEAVY = ("torch", "onnx", "onnxruntime", "caffe_compat.net", "caffe_compat.layers.registry")


def test_inspect_layers_and_version_import_neither_torch_nor_onnx(tmp_path):
    commands = [
        ["inspect", str(require(REFERENCE / "nets" / "googlenet_deploy.prototxt"))],
        ["inspect", str(require(REFERENCE / "layers" / "conv_basic.prototxt")),
         str(REFERENCE / "layers" / "conv_basic.caffemodel"), "--json"],
        ["inspect", str(require(next(PAPER_MODEL.glob("train_val_*embed64.prototxt")))),
         "--phase", "TRAIN"],
        ["layers"], ["layers", "--json"], ["--version"],
    ]
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from caffe_compat.cli.main import main
        for argv in {commands!r}:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as stop:  # --version
                    code = stop.code
            assert code == 0, (argv, code)
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"caffe-compat {__version__}"


def test_layers_lists_every_type_with_its_onnx_mapping(tmp_path):
    result = run_cli("layers", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed, forks = {}, {}
    for line in result.stdout.splitlines()[2:-1]:
        layer_type, onnx, _family, forks[layer_type] = line.split(maxsplit=3)
        listed[layer_type] = onnx == "yes"
    assert listed == {t: e.onnx for t, e in CATALOG.items()}
    assert forks["Convolution"] == "bvlc" and forks["BN"] == "pspnet, tsn, segnet"
    assert listed["Convolution"] and not listed["LiftedStructSimilaritySoftmaxLoss"]
    as_json = json.loads(run_cli("layers", "--json", cwd=tmp_path).stdout)
    assert {row["type"]: row["onnx"] for row in as_json} == listed


def test_the_readme_table_of_layers_is_the_catalog(tmp_path):
    text = README.read_text()
    found = re.search(r"<!-- layers table: caffe-compat layers --markdown -->\n(.*?)\n<!-- end of layers table -->",
                      text, re.S)
    assert found, "README.md lacks the generated table of supported layers"
    assert found.group(1) == format_markdown(), ("README.md's table of supported layers is stale: replace it by "
                                                 "the output of `caffe-compat layers --markdown`")
    assert run_cli("layers", "--markdown", cwd=tmp_path).stdout.strip() == format_markdown()
