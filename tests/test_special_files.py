"""Image lists and the images they name are read only as regular files of a bounded size:
a FIFO would block the reader forever and /dev/zero would fill the memory, so each is
refused in one line naming the list, the entry and what the file is."""
import os

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from caffe_compat.data import sources
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
from conftest import bounded, run_python

SECONDS = 30  # far above the real work: only a reader waiting on a FIFO reaches it


def image_data_text(source, root: str = "") -> str:
    return (f'layer {{ name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ '
            f'source: "{source}" root_folder: "{root}" batch_size: 1 }} }}')


def build(text: str) -> CaffeNet:
    net = messages("bvlc").NetParameter()
    text_format.Parse(text, net)
    return CaffeNet(build_graph(net, "TEST"))


@pytest.fixture
def listed(tmp_path):
    """A list of one image, `entry` under tmp_path/, and that path (to replace with another file)."""
    entry = tmp_path / "entry.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(entry)
    (tmp_path / "list.txt").write_text("entry.png 0\n")
    return tmp_path, entry


def test_a_fifo_entry_is_refused_without_waiting(listed):
    folder, entry = listed
    entry.unlink()
    os.mkfifo(entry)
    with bounded(SECONDS), pytest.raises(CaffeCompatError, match=r"list.txt entry 1: image .*entry.png.*: cannot read: "
                                                                 r"not a regular file \(a FIFO\)"):
        build(image_data_text(folder / "list.txt", f"{folder}/"))


def test_a_fifo_list_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    with bounded(SECONDS), pytest.raises(CaffeCompatError, match=r"image_data_param.source .*list.txt.*: "
                                                                 r"not a regular file \(a FIFO\)"):
        build(image_data_text(tmp_path / "list.txt"))


READ_DEV_ZERO = """
import resource, sys
from google.protobuf import text_format
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
resource.setrlimit(resource.RLIMIT_AS, (3 * 2 ** 30, 3 * 2 ** 30))  # a reader that reads it fails fast, not the machine
net = messages("bvlc").NetParameter()
text_format.Parse(sys.argv[1], net)
try:
    CaffeNet(build_graph(net, "TEST"))
except CaffeCompatError as err:
    print(err)
"""


def test_dev_zero_as_an_entry_is_refused_unread(tmp_path):
    (tmp_path / "list.txt").write_text("/dev/zero 0\n")
    result = run_python(READ_DEV_ZERO, image_data_text(tmp_path / "list.txt"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "entry 1: image '/dev/zero': cannot read: not a regular file (a character device)" in result.stdout


def test_an_image_over_the_size_limit_is_refused_unread(listed):
    folder, entry = listed
    with open(entry, "r+b") as file:
        file.truncate(sources.MAX_IMAGE_BYTES + 1)  # sparse: no disk, no memory
    with pytest.raises(CaffeCompatError, match=r"entry 1: image .*entry.png.*: cannot read: larger than the "
                                               r"256.0 MiB a file may have here"):
        build(image_data_text(folder / "list.txt", f"{folder}/"))


def test_a_list_over_the_size_limit_or_not_utf8_is_refused(listed, monkeypatch):
    folder, _ = listed
    monkeypatch.setattr(sources, "MAX_LIST_BYTES", 8)
    with pytest.raises(CaffeCompatError, match=r"list.txt.*: larger than the 8 bytes a file may have here"):
        build(image_data_text(folder / "list.txt", f"{folder}/"))
    monkeypatch.undo()
    (folder / "list.txt").write_bytes(b"caf\xe9.png 0\n")
    with pytest.raises(CaffeCompatError, match=r"list.txt.*: not UTF-8 text \(invalid continuation byte at byte 3\)"):
        build(image_data_text(folder / "list.txt", f"{folder}/"))


def test_an_hdf5_file_list_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    pytest.importorskip("h5py", reason="the test extra installs h5py")
    os.mkfifo(tmp_path / "files.txt")
    with bounded(SECONDS), pytest.raises(CaffeCompatError, match=r"HDF5 file list .*not a regular file \(a FIFO\)"):
        build(f'layer {{ name: "h" type: "HDF5Data" top: "data" hdf5_data_param {{ '
              f'source: "{tmp_path / "files.txt"}" batch_size: 1 }} }}')


def test_prepare_refuses_an_archive_index_or_image_that_is_no_regular_file(tmp_path):
    from caffe_compat.evaluation.datasets import prepare

    archive = tmp_path / "archive"
    root = archive / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    os.mkfifo(root / "images.txt")
    (root / "image_class_labels.txt").write_text("1 1\n")
    with bounded(SECONDS), pytest.raises(CaffeCompatError, match=r"images.txt: cannot read: not a regular file"):
        prepare("cub", archive, tmp_path / "out", "list")
    (root / "images.txt").unlink()
    (root / "images.txt").write_text("1 a.jpg\n")
    os.mkfifo(root / "images" / "a.jpg")
    with bounded(SECONDS), pytest.raises(CaffeCompatError, match=r"a.jpg: image listed in the archive's index is not a regular file"):
        prepare("cub", archive, tmp_path / "out", "list")
    assert not (tmp_path / "out").exists()
