"""Every bash and python block of README.md runs as written, in order, in the folder
where `caffe-compat demo` ran. A block preceded by `<!-- not-run: WHY -->` is skipped
for that stated reason (the paper's datasets, a GPU, installing packages); the test
fails on a marker without a reason.

Stand-ins for what the README leaves to the reader: `deploy.prototxt` and
`weights.caffemodel` are BVLC GoogLeNet from the Caffe reference fixtures (random
weights, the blob `pool5/7x7_s1` the README names), `model.pt` is the demo's trained
embedder converted, `embedder.pt` the paper's GoogLeNet embedder converted with random
weights (tests/fixtures/paper-model's extract net), and the python blocks start with `images`, `embeddings`, `labels`
and `MyEuclideanLoss` defined."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAPER_MODEL, REFERENCE, require, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^( *)```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->")

PYTHON_PRELUDE = '''
import torch
images = torch.rand(1, 3, 224, 224) * 255  # one BGR 0-255 image, as GoogLeNet takes it
embeddings = torch.randn(8, 64)
labels = torch.arange(4).repeat_interleave(2)


class MyEuclideanLoss(torch.nn.Module):
    def forward(self, a, b):
        return ((a - b) ** 2).sum() / (2 * a.shape[0])
'''


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
    shutil.copy(require(REFERENCE / "nets" / "googlenet_deploy.prototxt"), folder / "deploy.prototxt")
    shutil.copy(REFERENCE / "nets" / "googlenet_deploy.caffemodel", folder / "weights.caffemodel")
    result = run_cli("convert", demo_folder / "deploy.prototxt", demo_folder / "trained.caffemodel", "-o", "model.pt",
                     cwd=folder)
    assert result.returncode == 0, result.stderr
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
        command = [sys.executable, "-c", PYTHON_PRELUDE + code]
    result = subprocess.run(command, cwd=readme_folder, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"README.md:{line} ({language}) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
