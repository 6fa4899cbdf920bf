"""The Data and ImageData layers: Caffe's batches exactly (the data_layer fixture),
DataTransformer arithmetic, wrap-around, encodings, resumable positions, sharding,
samplers and the errors users meet."""
import io
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image

from caffe_compat.tools.compare import compare_case
from caffe_compat.data import (Transformer, data_layers, load_reader_states, reader_states, resize_linear,
                               set_sampler, shard_data_layers)
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
from conftest import REFERENCE, require, run_python

pb = messages("bvlc")


# ---- helpers

def write_lmdb(path: Path, datums) -> Path:
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, datum in enumerate(datums):
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    return path


def raw_datum(array: np.ndarray, label: int):
    c, h, w = array.shape
    datum = pb.Datum(channels=c, height=h, width=w, label=label)
    if array.dtype == np.uint8:
        datum.data = array.tobytes()
    else:
        datum.float_data.extend(array.reshape(-1).tolist())
    return datum


def png_bytes(bgr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(bgr.transpose(1, 2, 0)[:, :, ::-1])).save(buffer, "PNG")
    return buffer.getvalue()


def images(count: int, shape=(3, 8, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count,) + shape, dtype=np.uint8)


def net_of(text: str, phase: str = "TEST") -> CaffeNet:
    net = pb.NetParameter()
    text_format.Parse(text, net)
    return CaffeNet(build_graph(net, phase))


def data_net(source: Path, batch: int, transform: str = "", phase: str = "TEST", extra: str = "") -> CaffeNet:
    return net_of(f'''layer {{ name: "data" type: "Data" top: "data" top: "label"
        transform_param {{ {transform} }}
        data_param {{ source: "{source}" batch_size: {batch} backend: LMDB {extra} }} }}''', phase)


def batches(net: CaffeNet, count: int):
    with torch.no_grad():
        return [{k: v.clone() for k, v in net.run({}).items()} for _ in range(count)]


@pytest.fixture
def small_lmdb(tmp_path):
    arrays = images(5)
    return write_lmdb(tmp_path / "db", [raw_datum(a, i) for i, a in enumerate(arrays)]), arrays


# ---- Caffe's numbers

def test_data_layer_fixture_equals_caffe(monkeypatch):
    folder = require(REFERENCE / "nets" / "data_layer")
    monkeypatch.chdir(folder)  # the prototxt's paths are relative to Caffe's working directory
    rows = compare_case("data.prototxt", None, "expected.npz")
    assert len(rows) == 12
    failed = [r.format() for r in rows if not (r.ok and r.max_abs == 0)]
    assert not failed, "\n".join(failed)


def test_data_layer_fixture_cli(monkeypatch, capsys):
    from caffe_compat.cli.main import main

    monkeypatch.chdir(require(REFERENCE / "nets" / "data_layer"))
    assert main(["compare", "data.prototxt", "expected.npz"]) == 0
    assert "12 passed, 0 failed" in capsys.readouterr().out


# ---- the transformer

def transform_param(text: str):
    param = pb.TransformationParameter()
    text_format.Parse(text, param)
    return param


def test_transform_order_is_mean_then_scale():
    image = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    t = Transformer(transform_param("scale: 0.1 mean_value: 3 mean_value: 7"), "TEST", "t")
    out = np.empty((2, 3, 4), np.float32)
    t.apply(image, *t.draw(np.random.default_rng(0), image.shape), out)
    expected = (image.astype(np.float32) - np.float32([3, 7])[:, None, None]) * np.float32(0.1)
    assert np.array_equal(out, expected)


def test_single_mean_value_applies_to_every_channel():
    image = np.full((3, 2, 2), 10, np.uint8)
    t = Transformer(transform_param("mean_value: 4"), "TEST", "t")
    out = np.empty((3, 2, 2), np.float32)
    t.apply(image, 0, 0, False, out)
    assert np.all(out == 6)


def test_centre_crop_in_test_uses_integer_division():
    t = Transformer(transform_param("crop_size: 4"), "TEST", "t")
    assert t.draw(np.random.default_rng(0), (3, 9, 7)) == (2, 1, False)


def test_train_crop_and_mirror_are_random_but_seeded():
    t = Transformer(transform_param("crop_size: 4 mirror: true"), "TRAIN", "t")
    draws = [t.draw(np.random.default_rng(5), (3, 9, 7)) for _ in range(2)]
    assert draws[0] == draws[1]
    many = [t.draw(np.random.default_rng(s), (3, 9, 7)) for s in range(60)]
    assert {m for _, _, m in many} == {True, False}
    assert all(0 <= h <= 5 and 0 <= w <= 3 for h, w, _ in many)
    assert len({(h, w) for h, w, _ in many}) > 5


def test_mirror_flips_the_crop_and_the_mean_file_is_indexed_before_cropping(tmp_path):
    mean = np.random.default_rng(1).random((1, 2, 5, 6)).astype(np.float32) * 50
    blob = pb.BlobProto()
    blob.shape.dim.extend(mean.shape)
    blob.data.extend(mean.reshape(-1).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    t = Transformer(transform_param(f'crop_size: 3 scale: 2 mean_file: "{tmp_path}/mean.binaryproto"'),
                    "TEST", "t")
    image = images(1, (2, 5, 6))[0]
    out = np.empty((2, 3, 3), np.float32)
    t.apply(image, 1, 2, True, out)
    crop = image[:, 1:4, 2:5].astype(np.float32) - mean[0, :, 1:4, 2:5]
    assert np.array_equal(out, (crop * np.float32(2))[:, :, ::-1])


def test_transform_errors(tmp_path):
    with pytest.raises(CaffeCompatError, match="both mean_file and mean_value"):
        Transformer(transform_param('mean_file: "m" mean_value: 1'), "TEST", "t")
    with pytest.raises(CaffeCompatError, match="mean_file .*does not exist"):
        Transformer(transform_param('mean_file: "missing.binaryproto"'), "TEST", "t")
    t = Transformer(transform_param("mean_value: 1 mean_value: 2"), "TEST", "t")
    with pytest.raises(CaffeCompatError, match="2 mean_value entries for 3 channels"):
        t.check((3, 4, 4), "record")
    with pytest.raises(CaffeCompatError, match="smaller than crop_size"):
        Transformer(transform_param("crop_size: 9"), "TEST", "t").check((3, 4, 4), "record")


def test_resize_follows_opencv_linear_geometry():
    image = np.array([[[0, 100]]], np.uint8)
    # Half-pixel centres: upsampling 2 -> 4 gives 0, 25, 75, 100 (edges clamped).
    assert resize_linear(image, 1, 4).tolist() == [[[0, 25, 75, 100]]]


# ---- Data over LMDB

def test_records_in_key_order_wrapping_around(small_lmdb):
    source, arrays = small_lmdb
    got = batches(data_net(source, 3), 3)
    labels = [b["label"].tolist() for b in got]
    assert labels == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert np.array_equal(got[1]["data"][2].numpy(), arrays[0].astype(np.float32))
    assert got[0]["data"].dtype == torch.float32 and got[0]["label"].shape == (3,)


def test_single_top_gives_only_data(small_lmdb):
    source, _ = small_lmdb
    net = net_of(f'layer {{ name: "d" type: "Data" top: "data" data_param {{ source: "{source}" '
                 f'batch_size: 2 backend: LMDB }} }}')
    out = net.run({})
    assert out["data"].shape == (2, 3, 8, 10) and "label" not in out


def test_float_data_records(tmp_path):
    values = np.random.default_rng(2).standard_normal((2, 1, 3, 4)).astype(np.float32)
    source = write_lmdb(tmp_path / "f", [raw_datum(v, 7) for v in values])
    out = batches(data_net(source, 2, "scale: 0.5"), 1)[0]
    assert np.array_equal(out["data"].numpy(), values * np.float32(0.5))


def test_encoded_png_records_decode_to_bgr(tmp_path):
    arrays = images(2, (3, 6, 5))
    datums = [pb.Datum(data=png_bytes(a), encoded=True, label=i) for i, a in enumerate(arrays)]
    source = write_lmdb(tmp_path / "png", datums)
    out = batches(data_net(source, 2), 1)[0]
    assert np.array_equal(out["data"].numpy(), arrays.astype(np.float32))
    grey = batches(data_net(source, 2, "force_gray: true"), 1)[0]
    assert grey["data"].shape == (2, 1, 6, 5)


def test_top_shapes_from_the_first_record(small_lmdb):
    source, _ = small_lmdb
    net = data_net(source, 4, "crop_size: 6")
    assert net.blob_shapes["data"] == (4, 3, 6, 6)
    assert net.blob_shapes["label"] == (4,)


def test_reader_state_resumes_at_the_same_record_with_the_same_randomness(small_lmdb):
    source, _ = small_lmdb
    transform = "crop_size: 5 mirror: true"
    first = data_net(source, 2, transform, "TRAIN")
    batches(first, 3)
    saved = reader_states(first)
    expected = batches(first, 4)
    torch.save(saved, io.BytesIO())  # plain data
    second = data_net(source, 2, transform, "TRAIN")
    load_reader_states(second, saved)
    for want, got in zip(expected, batches(second, 4)):
        assert torch.equal(want["data"], got["data"]) and torch.equal(want["label"], got["label"])


def test_shards_together_read_the_single_process_batch(small_lmdb):
    source, _ = small_lmdb
    whole = batches(data_net(source, 4), 3)
    parts = []
    for rank in range(2):
        net = data_net(source, 2)
        shard_data_layers(net, rank, 2)
        parts.append(batches(net, 3))
    for k in range(3):
        joined = torch.cat([parts[0][k]["data"], parts[1][k]["data"]])
        assert torch.equal(joined, whole[k]["data"])


def test_prefetch_runs_ahead_without_changing_the_state(small_lmdb):
    source, _ = small_lmdb
    net = data_net(source, 2, extra="prefetch: 3")
    batches(net, 1)
    (_, layer), = data_layers(net)
    assert layer.reader_state()["cursor"]["position"] == 2


def test_leveldb_is_refused_with_a_hint(small_lmdb):
    source, _ = small_lmdb
    text = f'layer {{ name: "d" type: "Data" top: "data" data_param {{ source: "{source}" batch_size: 2 }} }}'
    with pytest.raises(CaffeCompatError, match="LEVELDB.*add `backend: LMDB`"):
        net_of(text)


def test_missing_lmdb_is_named(tmp_path):
    with pytest.raises(CaffeCompatError, match="nowhere.*no such LMDB"):
        data_net(tmp_path / "nowhere", 2)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CaffeCompatError, match="not an LMDB"):
        data_net(tmp_path / "folder", 2)


def test_corrupt_record_is_named(tmp_path):
    good = raw_datum(images(1)[0], 0).SerializeToString()
    env = lmdb.open(str(tmp_path / "bad"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", good)
        txn.put(b"00000001", b"\xff\xff\xff garbage")
    env.close()
    net = data_net(tmp_path / "bad", 2)
    with pytest.raises(CaffeCompatError, match="record '00000001'"):
        net.run({})


def test_relative_source_resolves_from_the_working_directory(small_lmdb, monkeypatch):
    source, _ = small_lmdb
    monkeypatch.chdir(source.parent)
    assert batches(data_net(Path(source.name), 2), 1)[0]["label"].tolist() == [0, 1]


# ---- ImageData

@pytest.fixture
def image_list(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    arrays = images(8, (3, 6, 7), seed=3)
    lines = []
    for i, array in enumerate(arrays):
        (folder / f"im {i}.png").write_bytes(png_bytes(array))
        lines.append(f"im {i}.png {i // 2}")  # a space in the name: Caffe splits at the last space
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, arrays


def image_net(tmp_path, batch, params="", transform="", phase="TEST"):
    return net_of(f'''layer {{ name: "img" type: "ImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/imgs/" batch_size: {batch}
        {params} }} }}''', phase)


def test_image_list_in_order_as_bgr(image_list):
    folder, arrays = image_list
    out = batches(image_net(folder, 3), 3)
    assert [b["label"].tolist() for b in out] == [[0, 0, 1], [1, 2, 2], [3, 3, 0]]
    assert np.array_equal(out[0]["data"].numpy(), arrays[:3].astype(np.float32))


def test_image_list_grey_and_resize(image_list):
    folder, _ = image_list
    net = image_net(folder, 2, "is_color: false new_height: 4 new_width: 5")
    assert net.run({})["data"].shape == (2, 1, 4, 5)


def test_image_list_shuffle_is_seeded_and_covers_every_image(image_list):
    folder, _ = image_list
    a, b = (image_net(folder, 8, "shuffle: true", phase="TRAIN") for _ in range(2))
    for net in (a, b):
        for _, layer in data_layers(net):
            layer.reseed(11)
    first, second = batches(a, 1)[0], batches(b, 1)[0]
    assert torch.equal(first["data"], second["data"])
    assert sorted(first["label"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_pairs_sampler_gives_same_class_pairs(image_list):
    folder, _ = image_list
    net = image_net(folder, 4, phase="TRAIN")
    assert set_sampler(net, "pairs") == 1
    for batch in batches(net, 5):
        labels = batch["label"].tolist()
        assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


def test_pk_sampler_gives_p_classes_of_k_images(image_list):
    folder, _ = image_list
    net = image_net(folder, 6, phase="TRAIN")
    set_sampler(net, "pk:3,2")
    for batch in batches(net, 4):
        labels = batch["label"].tolist()
        assert len(set(labels)) == 3 and all(labels.count(v) == 2 for v in set(labels))


def test_sampler_errors(image_list):
    folder, _ = image_list
    net = image_net(folder, 6)
    with pytest.raises(CaffeCompatError, match="gives 4 images per batch, batch_size is 6"):
        set_sampler(net, "pk:2,2")
    with pytest.raises(CaffeCompatError, match="unknown sampler"):
        set_sampler(net, "random")
    with pytest.raises(CaffeCompatError, match="even batch_size"):
        set_sampler(image_net(folder, 3), "pairs")


def test_image_list_errors(image_list):
    folder, _ = image_list
    (folder / "list.txt").write_text("im 0.png 0\nmissing.png 1\n")
    net = image_net(folder, 2)
    with pytest.raises(CaffeCompatError, match="entry 2: image .*missing.png.*cannot read"):
        net.run({})
    (folder / "list.txt").write_text("im 0.png zero\n")
    with pytest.raises(CaffeCompatError, match="line 1: expected 'path label'"):
        image_net(folder, 2)
    (folder / "imgs" / "broken.png").write_bytes(b"not a png")
    (folder / "list.txt").write_text("broken.png 0\n")
    with pytest.raises(CaffeCompatError, match="broken.png.*cannot decode"):
        image_net(folder, 1)


# ---- damaged LMDBs and mean files

READ_ONE_BATCH = """
import sys
from google.protobuf import text_format
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
net = messages("bvlc").NetParameter()
text_format.Parse(sys.argv[1], net)
try:
    CaffeNet(build_graph(net, "TEST")).run({})
except CaffeCompatError as err:
    print(err)
"""


def test_a_truncated_lmdb_is_one_error_not_sigbus(tmp_path):
    db = write_lmdb(tmp_path / "db", [raw_datum(a, i % 3) for i, a in enumerate(images(60))])
    data = db / "data.mdb"
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    text = f'layer {{ name: "data" type: "Data" top: "data" data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} }}'
    # A subprocess: LMDB reading past the file's end kills the process with SIGBUS.
    result = run_python(READ_ONE_BATCH, text, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"the LMDB {db} is damaged" in result.stdout and "truncated" in result.stdout


def overflow_pages(data: bytearray, psize: int = 4096) -> list:
    """The pages holding values too big for a leaf page (LMDB's P_OVERFLOW, flags at byte 10)."""
    return [p for p in range(2, len(data) // psize) if struct.unpack_from("<H", data, p * psize + 10)[0] == 0x04]


def test_a_corrupt_page_names_the_folder_and_the_key(tmp_path):
    db = write_lmdb(tmp_path / "db", [raw_datum(a, i % 3) for i, a in enumerate(images(8, (3, 40, 40)))])
    data = bytearray((db / "data.mdb").read_bytes())
    struct.pack_into("<H", data, overflow_pages(data)[3] * 4096 + 10, 0x02)  # the 4th value's page now says leaf
    (db / "data.mdb").write_bytes(bytes(data))
    net = data_net(db, 2)
    with pytest.raises(CaffeCompatError, match=rf"the LMDB {db} is damaged at the record after key '00000002': .*"
                                               rf"MDB_CORRUPTED"):
        batches(net, 2)


def test_a_node_outside_its_page_is_refused_before_lmdb_reads_it(tmp_path):
    db = write_lmdb(tmp_path / "db", [raw_datum(a, i % 3) for i, a in enumerate(images(12))])
    data = bytearray((db / "data.mdb").read_bytes())
    leaf = next(p for p in range(2, len(data) // 4096) if struct.unpack_from("<H", data, p * 4096 + 10)[0] == 0x02)
    struct.pack_into("<H", data, leaf * 4096 + 16, 4095)  # the first node's offset: past the page's end
    (db / "data.mdb").write_bytes(bytes(data))
    with pytest.raises(CaffeCompatError, match=rf"the LMDB {db} is damaged: page {leaf}, node 0: offset 4095"):
        data_net(db, 2)


def test_a_damaged_record_names_the_folder_and_the_key(tmp_path):
    good = raw_datum(images(1)[0], 1)
    bad = raw_datum(images(1)[0], 1)
    bad.data = bad.data[:-7]
    db = write_lmdb(tmp_path / "db", [good, good, bad, good])
    net = data_net(db, 2)
    with pytest.raises(CaffeCompatError, match=rf"{db}: record '00000002': Datum: holds 233 values"):
        batches(net, 2)


@pytest.mark.parametrize("shape", [(12,), (3, 4), (2, 3, 4, 4)])
def test_a_mean_file_that_is_not_one_image_names_the_file(tmp_path, shape):
    blob = pb.BlobProto()
    blob.shape.dim.extend(shape)
    blob.data.extend([0.0] * int(np.prod(shape)))
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    with pytest.raises(CaffeCompatError, match=rf"mean_file '{tmp_path}/mean.binaryproto' holds a blob of shape"):
        Transformer(transform_param(f'mean_file: "{tmp_path}/mean.binaryproto"'), "TEST", "t")


def test_a_reader_finalised_while_the_environments_are_locked_does_not_deadlock(small_lmdb):
    # A garbage collection inside the locked section (lmdb.open allocates) can finalise
    # another reader's generator in the same thread; its exit takes the lock again.
    import threading

    from caffe_compat.data.sources import _lmdb_records
    from caffe_compat.io.lmdb_reader import SNAPSHOTS as _SNAPSHOTS

    source, _ = small_lmdb
    path = str(source.resolve())
    records = _lmdb_records(path, 0, "test")
    next(records)

    def finalise_under_the_lock():
        with _SNAPSHOTS._lock:
            records.close()

    worker = threading.Thread(target=finalise_under_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "closing a reader under the environments' lock deadlocked"
    assert path not in _SNAPSHOTS._open
