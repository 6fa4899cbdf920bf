"""Every reference case run as a net against Caffe's own numbers: each layer fixture,
GoogLeNet, the V1 net. Forward to 1e-5 relative (1e-4 through nets deeper than ten
layers), gradients to 1e-4, exact zeros to 1e-7 absolute (the reference README's
tolerances)."""
import glob
from pathlib import Path

import pytest
import torch

from caffe_compat.tools.compare import compare_case
from conftest import REFERENCE, require

LAYER_CASES = sorted(Path(p).stem for p in glob.glob(str(REFERENCE / "layers" / "*.npz")))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _check(rows):
    assert rows, "nothing was compared"
    failed = [r.format() for r in rows if not r.ok]
    assert not failed, "\n".join(failed)


def test_layer_cases_are_listed(reference):
    assert len(LAYER_CASES) >= 35


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_case(case, device):
    folder = require(REFERENCE / "layers")
    model = folder / f"{case}.caffemodel"
    _check(compare_case(folder / f"{case}.prototxt", model if model.exists() else None,
                        folder / f"{case}.npz", device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_googlenet_deploy(device):
    nets = require(REFERENCE / "nets")
    _check(compare_case(nets / "googlenet_deploy.prototxt", nets / "googlenet_deploy.caffemodel",
                        nets / "googlenet_deploy.npz", device=device, rtol=1e-4))


@pytest.mark.parametrize("device", DEVICES)
def test_v1_legacy(device):
    folder = require(REFERENCE / "nets" / "v1_legacy")
    # Six layers: shallow, so the default forward tolerance (1e-5) applies, not GoogLeNet's 1e-4.
    _check(compare_case(folder / "v1.prototxt", folder / "v1.caffemodel", folder / "v1.npz", device=device))
