"""Dataset preparation from tiny archives laid out like the official ones."""
import math
import struct
import zlib

import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from caffe_compat.evaluation import datasets
from caffe_compat.evaluation import matfile
from caffe_compat.evaluation.matfile import read_mat
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io.schema import messages


def save_image(path, size=(40, 30), colour=(200, 100, 50), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


# A MATLAB level 5 MAT-file writer, just enough for cars_annos.mat's layout.
def element(kind, payload):
    if len(payload) <= 4:  # small data element format
        return struct.pack("<HH", kind, len(payload)) + payload.ljust(4, b"\0")
    return struct.pack("<II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def matrix(value, name=""):
    if isinstance(value, str):
        mx_class, dims = 4, (1, len(value))
        body = element(4, np.array([ord(c) for c in value], "<u2").tobytes())
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        names = list(value[0])
        mx_class, dims = 2, (1, len(value))
        body = element(5, struct.pack("<i", 32))
        body += element(1, b"".join(n.encode().ljust(32, b"\0") for n in names))
        body += b"".join(matrix(record[n]) for record in value for n in names)
    elif isinstance(value, list):
        mx_class, dims = 1, (1, len(value))
        body = b"".join(matrix(v) for v in value)
    else:
        value = np.asarray(value)
        mx_class = {np.dtype("f8"): 6, np.dtype("u1"): 9, np.dtype("u2"): 11}[value.dtype]
        dims = value.shape
        # MATLAB stores doubles holding small integers in the smallest integer type.
        stored = value.astype("<u1") if mx_class == 6 and (value == value.astype("u1")).all() else value
        kind = {np.dtype("u1"): 2, np.dtype("u2"): 4, np.dtype("f8"): 9}[stored.dtype]
        body = element(kind, stored.astype(stored.dtype.newbyteorder("<")).tobytes(order="F"))
    header = element(6, struct.pack("<II", mx_class, 0)) + element(5, np.array(dims, "<i4").tobytes())
    header += element(1, name.encode())
    return element(14, header + body)


def write_mat(path, variables, compressed):
    out = b"MATLAB 5.0 MAT-file, written by the caffe-compat tests".ljust(116) + b"\0" * 8
    out += struct.pack("<H", 0x0100) + b"IM"
    for name, value in variables.items():
        raw = matrix(value, name)
        if compressed:  # compressed elements are not padded
            packed = zlib.compress(raw)
            out += struct.pack("<II", 15, len(packed)) + packed
        else:
            out += raw
    path.write_bytes(out)


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_reader_reads_structs_cells_strings_numbers(tmp_path, compressed):
    variables = {
        "annotations": [{"relative_im_path": "car_ims/000001.jpg", "class": np.array([[1]], "u1"),
                         "bbox_x1": np.array([[112.0]])},
                        {"relative_im_path": "car_ims/000002.jpg", "class": np.array([[196]], "u1"),
                         "bbox_x1": np.array([[2.5]])}],
        "class_names": ["AM General Hummer SUV 2000", "smart fortwo Convertible 2012"],
        "matrix": np.arange(6, dtype="f8").reshape(2, 3) * 1.5,
    }
    write_mat(tmp_path / "a.mat", variables, compressed)
    got = read_mat(tmp_path / "a.mat")
    assert got["annotations"][1]["relative_im_path"] == "car_ims/000002.jpg"
    assert got["annotations"][1]["class"].dtype == np.uint8 and got["annotations"][1]["class"][0, 0] == 196
    assert got["annotations"][0]["bbox_x1"][0, 0] == 112.0 and got["annotations"][1]["bbox_x1"][0, 0] == 2.5
    assert got["class_names"] == variables["class_names"]
    np.testing.assert_array_equal(got["matrix"], variables["matrix"])


def test_mat_reader_refuses_a_compressed_element_that_inflates_too_far(tmp_path, monkeypatch):
    monkeypatch.setattr(matfile, "MAX_INFLATED", 1 << 20)
    write_mat(tmp_path / "bomb.mat", {"halves": np.full((1, 3 << 17), 0.5)}, compressed=True)  # 3 MiB of doubles
    with pytest.raises(CaffeCompatError, match=r"bomb.mat: a compressed element inflates past 1 MiB"):
        read_mat(tmp_path / "bomb.mat")
    write_mat(tmp_path / "fits.mat", {"halves": np.full((1, 1 << 16), 0.5)}, compressed=True)  # 0.5 MiB
    assert read_mat(tmp_path / "fits.mat")["halves"].shape == (1, 1 << 16)


def test_mat_reader_refuses_other_files(tmp_path):
    (tmp_path / "x.mat").write_bytes(b"\x89HDF\r\n" + b"\0" * 200)
    with pytest.raises(CaffeCompatError, match="x.mat: not a MATLAB level 5 MAT-file"):
        read_mat(tmp_path / "x.mat")


def make_cub(root):
    cub = root / "CUB_200_2011"
    entries = [(1, "001.Black_footed_Albatross/a_1.jpg", 1), (2, "001.Black_footed_Albatross/a_2.jpg", 1),
               (3, "002.Laysan_Albatross/b_1.jpg", 2), (4, "101.White_Pelican/c_1.jpg", 101),
               (5, "200.Common_Yellowthroat/d_1.jpg", 200), (6, "200.Common_Yellowthroat/d_2.jpg", 200)]
    for image_id, name, _ in entries:
        save_image(cub / "images" / name, size=(30 + image_id, 20), mode="L" if image_id == 2 else "RGB")
    (cub / "images.txt").write_text("".join(f"{i} {n}\n" for i, n, _ in entries))
    (cub / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c in entries))
    return entries


def test_cub_list(tmp_path):
    make_cub(tmp_path / "src")
    summary = datasets.prepare("cub", tmp_path / "src", tmp_path / "out")
    assert summary["train"]["images"] == 3 and summary["train"]["classes"] == 2
    assert summary["test"]["images"] == 3 and summary["test"]["classes"] == 2
    train = (tmp_path / "out" / "train.txt").read_text().splitlines()
    assert train[0] == "images/001.Black_footed_Albatross/a_1.jpg 1"
    assert (tmp_path / "out" / "test.txt").read_text().splitlines()[-1] == "images/200.Common_Yellowthroat/d_2.jpg 200"
    for line in train:
        with Image.open(tmp_path / "out" / line.split()[0]) as image:
            assert image.size == (256, 256) and image.mode == "RGB"


def test_cub_archive_without_labels_names_the_file(tmp_path):
    make_cub(tmp_path / "src")
    (tmp_path / "src" / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(CaffeCompatError, match="image_class_labels.txt: missing"):
        datasets.prepare("cub", tmp_path / "src", tmp_path / "out")


def test_missing_image_is_named(tmp_path):
    make_cub(tmp_path / "src")
    (tmp_path / "src" / "CUB_200_2011" / "images" / "101.White_Pelican" / "c_1.jpg").unlink()
    with pytest.raises(CaffeCompatError, match="c_1.jpg: image listed in the archive's index is missing"):
        datasets.prepare("cub", tmp_path / "src", tmp_path / "out")


def make_cars(root, compressed=True):
    records = []
    for number, label in enumerate([1, 98, 99, 196, 196], start=1):
        relative = f"car_ims/{number:06d}.jpg"
        save_image(root / relative, size=(50, 20 + number))
        records.append({"relative_im_path": relative, "bbox_x1": np.array([[3.0]]), "bbox_y1": np.array([[4.0]]),
                        "bbox_x2": np.array([[40.0]]), "bbox_y2": np.array([[18.0]]),
                        "class": np.array([[label]], "u1"), "test": np.array([[number % 2]], "u1")})
    write_mat(root / "cars_annos.mat", {"annotations": records, "class_names": ["a", "b"]}, compressed)


def test_cars_list_uses_classes_1_to_98_for_training(tmp_path):
    make_cars(tmp_path / "src")
    summary = datasets.prepare("cars", tmp_path / "src", tmp_path / "out")
    assert (summary["train"]["images"], summary["test"]["images"]) == (2, 3)
    assert (tmp_path / "out" / "train.txt").read_text() == "images/car_ims/000001.jpg 1\nimages/car_ims/000002.jpg 98\n"
    assert (tmp_path / "out" / "test.txt").read_text().splitlines()[0] == "images/car_ims/000003.jpg 99"


def test_cars_without_annotations_names_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(CaffeCompatError, match="cars_annos.mat: missing"):
        datasets.prepare("cars", tmp_path / "src", tmp_path / "out")


def make_sop(root):
    sop = root / "Stanford_Online_Products"
    splits = {"Ebay_train.txt": [(1, 1, 1, "bicycle_final/1_0.JPG"), (2, 1, 1, "bicycle_final/1_1.JPG"),
                                 (3, 2, 2, "chair_final/2_0.JPG")],
              "Ebay_test.txt": [(4, 11319, 1, "bicycle_final/3_0.JPG"), (5, 11319, 1, "bicycle_final/3_1.JPG")]}
    for name, rows in splits.items():
        for *_, path in rows:
            save_image(sop / path, size=(60, 45))
        (sop / name).write_text("image_id class_id super_class_id path\n"
                                + "".join(" ".join(map(str, row)) + "\n" for row in rows))
    return sop


def test_sop_lmdb_holds_bgr_datums(tmp_path):
    make_sop(tmp_path / "src")
    summary = datasets.prepare("sop", tmp_path / "src", tmp_path / "out", fmt="lmdb")
    assert summary["train"] == {"path": str(tmp_path / "out" / "train_lmdb"), "images": 3, "classes": 2}
    env = lmdb.open(str(tmp_path / "out" / "test_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        records = list(txn.cursor())
    env.close()
    assert [key for key, _ in records] == [b"00000000", b"00000001"]
    datum = messages("bvlc").Datum()
    datum.ParseFromString(records[0][1])
    assert (datum.channels, datum.height, datum.width, datum.label, datum.encoded) == (3, 256, 256, 11319, False)
    pixels = np.frombuffer(datum.data, np.uint8).reshape(3, 256, 256)
    # A uniform (200, 100, 50) image has nothing above the white threshold to crop away.
    assert tuple(pixels[:, 128, 128]) == (50, 100, 200)


def test_existing_output_is_not_mixed(tmp_path):
    make_sop(tmp_path / "src")
    (tmp_path / "out" / "train_lmdb").mkdir(parents=True)
    with pytest.raises(CaffeCompatError, match="out: exists and is not empty"):
        datasets.prepare("sop", tmp_path / "src", tmp_path / "out", fmt="lmdb")
    (tmp_path / "out" / "train_lmdb").rmdir()  # an empty folder is filled
    datasets.prepare("sop", tmp_path / "src", tmp_path / "out", fmt="lmdb")
    with pytest.raises(CaffeCompatError, match="already holds a prepared dataset"):
        datasets.prepare("sop", tmp_path / "src", tmp_path / "out", fmt="lmdb")
    assert datasets.prepared(tmp_path / "out", "sop", tmp_path / "src", "lmdb")["test"]["images"] == 2
    assert datasets.prepared(tmp_path / "out", "cub", tmp_path / "src", "lmdb") is None


def test_sop_without_test_list_names_the_file(tmp_path):
    sop = make_sop(tmp_path / "src")
    (sop / "Ebay_test.txt").unlink()
    with pytest.raises(CaffeCompatError, match="Ebay_test.txt: missing"):
        datasets.prepare("sop", tmp_path / "src", tmp_path / "out")


def test_sop_malformed_line_is_located(tmp_path):
    sop = make_sop(tmp_path / "src")
    (sop / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 bicycle_final/1_0.JPG\n")
    with pytest.raises(CaffeCompatError, match=r"Ebay_train.txt:2: expected 4 fields, found 3"):
        datasets.prepare("sop", tmp_path / "src", tmp_path / "out")


def product_photo():
    """White 200 x 100 photo: a dark product at x 50..89, y 30..59, near-white specks
    (250, ignored) and one pixel at 249 (kept) that widens the box to the left."""
    pixels = np.full((100, 200, 3), 255, np.uint8)
    pixels[30:60, 50:90] = (20, 40, 160)
    pixels[5, 5] = pixels[95, 190] = 250
    pixels[45, 40] = 249
    return Image.fromarray(pixels)


def test_sop_crop_follows_load_cropped_images():
    out = datasets._cropped_padded_square(product_photo())
    # Box: x 40-15 .. 89+16, y 30-15 .. 59+16 (MATLAB's imcrop keeps one more pixel).
    crop = product_photo().crop((25, 15, 106, 76))
    height = math.ceil(256 * 61 / 81)
    expected = Image.new("RGB", (256, 256), (255, 255, 255))
    expected.paste(crop.resize((256, height), Image.BICUBIC), (0, (256 - height) // 2))
    assert out.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_sop_tall_image_is_padded_left_and_right():
    pixels = np.full((300, 120, 3), 255, np.uint8)
    pixels[20:280, 30:90] = 0
    out = np.asarray(datasets._cropped_padded_square(Image.fromarray(pixels)))
    width = math.ceil(256 * 91 / 290)  # crop: x 15..105, y 5..294
    left = (256 - width) // 2
    assert (out[:, :left] == 255).all() and (out[:, left + width:] == 255).all()
    assert out[128, 128].max() < 10


def test_sop_grey_and_blank_images():
    grey = Image.new("L", (80, 40), 255)
    grey.paste(0, (30, 10, 50, 30))
    assert datasets._cropped_padded_square(grey).mode == "RGB"
    blank = datasets._cropped_padded_square(Image.new("RGB", (50, 50), (255, 255, 255)))
    assert blank.size == (256, 256) and np.asarray(blank).min() == 255


def test_unknown_dataset_and_format(tmp_path):
    with pytest.raises(CaffeCompatError, match="unknown name 'imagenet'"):
        datasets.prepare("imagenet", tmp_path, tmp_path / "out")
    with pytest.raises(CaffeCompatError, match="unknown output format 'tfrecord'"):
        datasets.prepare("cub", tmp_path, tmp_path / "out", fmt="tfrecord")
    with pytest.raises(CaffeCompatError, match="dataset folder not found"):
        datasets.prepare("cub", tmp_path / "nowhere", tmp_path / "out")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), compressed=st.booleans())
def test_fuzz_mutated_mat_files(tmp_path, data, compressed):
    """Damaged cars_annos.mat files: a result or the library's own error, nothing else."""
    variables = {"annotations": [{"relative_im_path": "car_ims/000001.jpg", "class": np.array([[1]], "u1")},
                                 {"relative_im_path": "car_ims/000002.jpg", "class": np.array([[196]], "u1")}],
                 "class_names": ["a", "b"], "m": np.arange(6, dtype="f8").reshape(2, 3)}
    path = tmp_path / "a.mat"
    write_mat(path, variables, compressed)
    blob = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            blob[data.draw(st.integers(128, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    else:
        at = data.draw(st.integers(128, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=40))
    path.write_bytes(bytes(blob))
    try:
        read_mat(path)
    except CaffeCompatError as err:
        assert str(path) in str(err)
