"""The installed package: one import name, the schema inside it."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_top_level_name(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "*venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), "-q"], check=True)
    (wheel,) = (tmp_path / "dist").glob("caffe_compat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"caffe_compat"}
    assert "caffe_compat/proto/caffe.proto" in names and "caffe_compat/proto/caffe_pb2.py" in names
    assert "caffe_compat/converters/artifact.py" in names
    # The dialects' schema snippets are package data, read at run time.
    snippets = {f"caffe_compat/io/dialects/{p.name}" for p in (ROOT / "caffe_compat" / "io" / "dialects").glob("*.proto")}
    assert snippets and snippets <= set(names)
    assert not any(n.startswith(("proto/", "converters/", "tests/", "benchmarks/")) for n in names)
    # Every module of the source tree is in the wheel (a package missing from setup.cfg's
    # list imports from a checkout but not once installed).
    sources = {f"caffe_compat/{p.relative_to(ROOT / 'caffe_compat').as_posix()}"
               for p in (ROOT / "caffe_compat").rglob("*.py") if "__pycache__" not in p.parts}
    sources |= {f"caffe_compat/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                for folder in ("proto", "converters") for p in (ROOT / folder).rglob("*.py")
                if p.name != "generate.py"}
    assert sources - set(names) == set()
