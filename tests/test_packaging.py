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
        ".git", "*venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "fixtures"))
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


def test_the_checkout_imports_from_its_root(tmp_path):
    """From a checkout's root the source tree comes first on sys.path, shadowing any
    installed copy: `caffe_compat.proto` and `caffe_compat.converters` must still import,
    from the checkout itself (proto/ and converters/ sit beside the package there)."""
    checkout = tmp_path / "checkout"
    for folder in ("caffe_compat", "proto", "converters"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import caffe_compat.proto, caffe_compat.converters.artifact as a; "
            "print(caffe_compat.proto.__file__); print(a.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(Path(line).is_relative_to(checkout) for line in result.stdout.split()), result.stdout
    conv = ROOT / "tests" / "fixtures" / "caffe-reference" / "layers" / "conv_basic.prototxt"
    result = subprocess.run([sys.executable, "-m", "caffe_compat", "inspect", str(conv)], cwd=checkout,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "140 parameters" in result.stdout, result.stderr


def test_the_changelog_names_the_version_installed():
    """The newest section of CHANGELOG.md is the version `--version` reports."""
    import caffe_compat

    newest = next(line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    assert newest.split()[1] == caffe_compat.__version__
