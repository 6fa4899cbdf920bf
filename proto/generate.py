"""Regenerate caffe_pb2.py from caffe.proto: the only way to make it.

    python proto/generate.py            # rewrites proto/caffe_pb2.py
    python proto/generate.py OUT_DIR    # writes OUT_DIR/caffe_pb2.py instead

Needs grpcio-tools (its bundled protoc). Runs
`protoc -I proto --python_out=... proto/caffe.proto`, then removes the runtime
version check that newer generators emit (an import of
google.protobuf.runtime_version and a ValidateProtobufRuntimeVersion call):
that module does not exist before protobuf 5.26 and the check rejects every
runtime older than the generator, while the rest of the file loads on 4.21+.
The output depends only on caffe.proto and the protoc version.
"""
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "caffe.proto"

_VERSION_IMPORT = "from google.protobuf import runtime_version as _runtime_version\n"
_VERSION_CHECK = re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:[ \t].*\n)*?\)\n",
                            re.MULTILINE)
# Google's marker for gencode that should not be committed; this copy is, deliberately.
_NO_CHECKIN_MARKER = "# NO CHECKED-IN PROTOBUF GENCODE\n"


def strip_version_check(source: str) -> str:
    """The generated module without the runtime version check (a no-op for generators
    that do not emit one)."""
    if _VERSION_IMPORT not in source:
        return source
    stripped, checks = _VERSION_CHECK.subn("", source.replace(_VERSION_IMPORT, ""))
    if checks != 1 or "_runtime_version" in stripped:
        raise RuntimeError("unexpected shape of protoc's runtime version check; update generate.py")
    return stripped.replace(_NO_CHECKIN_MARKER, "")


def generate(out_dir: Path = PROTO_DIR) -> Path:
    """Write out_dir/caffe_pb2.py and return its path."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as work:
        status = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={work}", str(PROTO_FILE)])
        if status != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE} (exit {status})")
        source = (Path(work) / "caffe_pb2.py").read_text(encoding="utf-8")
    target = Path(out_dir) / "caffe_pb2.py"
    target.write_text(strip_version_check(source), encoding="utf-8")
    return target


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR))
