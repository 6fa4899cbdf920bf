"""Every bash and python block of README.md runs as written, in order, in the folder
where `caffe-compat demo` ran. A block preceded by `<!-- not-run: WHY -->` is skipped
for that stated reason (the paper's datasets, a GPU, installing packages); the test
fails on a marker without a reason.

The blocks use the files the demo wrote (`caffe-compat-demo/`) and what earlier blocks
wrote from them; the one stand-in is `embedder.pt`, the paper's GoogLeNet embedder, which
the README has users convert from the paper's prototxt and their ImageNet weights: here it
is converted from tests/fixtures/paper-model's extract net with random weights."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAPER_MODEL, require, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^( *)```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->")


def readme_blocks():
    """(first line number, language, code, reason not run or None) for each fenced block."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = len(match.group(1)), match.group(2)
        start = i
        i += 1
        body = []
        while not FENCE.match(lines[i]):
            body.append(lines[i][indent:])
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = NOT_RUN.search(previous)
        blocks.append((start + 1, language, "\n".join(body) + "\n", marker.group(1).strip() if marker else None))
        i += 1
    return blocks


BLOCKS = [b for b in readme_blocks() if b[1] in ("bash", "python")]
TO_RUN = [b[:3] for b in BLOCKS if b[3] is None]


def test_the_readme_has_blocks_to_run_and_every_exception_says_why():
    assert TO_RUN
    for line, _, _, reason in BLOCKS:
        assert reason != "", f"README.md:{line}: a not-run marker needs its reason"


@pytest.fixture(scope="module")
def readme_folder(demo_run):
    """The folder the demo ran in, with the stand-ins beside `caffe-compat-demo/`."""
    demo_folder, _ = demo_run
    folder = demo_folder.parent
    extract_net = require(PAPER_MODEL / "extract_googlenet_ebay_feature_embed64.prototxt")
    result = run_cli("convert", extract_net, "--random-init", "--input-shape", "1,3,227,227", "-o", "embedder.pt",
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.parametrize("line, language, code", TO_RUN, ids=[f"line{b[0]}-{b[1]}" for b in TO_RUN])
def test_readme_block_runs(readme_folder, line, language, code):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=readme_folder, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"README.md:{line} ({language}) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
