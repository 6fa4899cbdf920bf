"""An LMDB another process is appending to is read as Caffe reads it, with LMDB's reader
lock: as of one commit (a prefix of what the writer wrote, wrapping at that commit's end),
never called damaged, never aborting the process on a page the writer reused."""
import gc
import os
import subprocess
import sys
import warnings

import lmdb
import torch

from caffe_compat.data import close_data_layers
from caffe_compat.graph import build_graph
from caffe_compat.io.lmdb_reader import SNAPSHOTS as _SNAPSHOTS
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
from conftest import run_python

WRITER = """
import sys
import lmdb
import numpy as np
from caffe_compat.io.datum import array_to_datum
env = lmdb.open(sys.argv[1], map_size=1 << 30)
count = 0
def append(records):
    global count
    with env.begin(write=True) as txn:
        for _ in range(records):  # record i: label i, every pixel i % 256
            txn.put(b"%08d" % count, array_to_datum(np.full((3, 16, 16), count % 256, np.uint8), count)
                    .SerializeToString())
            count += 1
append(100)
print("ready", flush=True)
while True:
    append(5)
"""

READER = """
import sys, time
import torch
from google.protobuf import text_format
from caffe_compat.data import close_data_layers, data_layers
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
net = messages("bvlc").NetParameter()
text_format.Parse(f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
                  f'data_param {{ source: "{sys.argv[1]}" batch_size: 64 backend: LMDB }} }}', net)
reads, deadline = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    built = CaffeNet(build_graph(net, "TEST"))
    (_, layer), = data_layers(built)
    labels, pixels = [], []
    with torch.no_grad():
        while len(labels) <= layer.entries:  # once round, and into the second pass
            out = built.run({})
            labels += out["label"].long().tolist()
            pixels += out["data"][:, 0, 0, 0].long().tolist()
    close_data_layers(built)
    expected = [i % layer.entries for i in range(len(labels))]
    assert labels == expected, f"{layer.entries} records, read {labels[:3]}..{labels[-3:]}"
    assert pixels == [i % 256 for i in expected], "a record's pixels are not its own"
    reads += 1
print(reads)
"""


def test_reading_an_lmdb_while_another_process_appends(tmp_path):
    db = tmp_path / "db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        assert writer.stdout.readline() == "ready\n"
        reader = run_python(READER, db, 8, timeout=240)
        assert writer.poll() is None, "the writer stopped"
    finally:
        writer.kill()
        writer.wait()
    assert reader.returncode == 0, reader.stderr[-3000:]  # not 134 (LMDB's abort), not damaged
    assert int(reader.stdout) >= 2


def _one_record_lmdb(tmp_path) -> None:
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", messages("bvlc").Datum(channels=1, height=1, width=1, data=b"\x07", label=3)
                .SerializeToString())
    env.close()


def _one_record_net(tmp_path) -> CaffeNet:
    net = messages("bvlc").NetParameter()
    layer = net.layer.add(name="data", type="Data", top=["data", "label"])
    layer.data_param.source = str(tmp_path / "db")
    layer.data_param.batch_size = 1
    layer.data_param.backend = layer.data_param.LMDB
    return CaffeNet(build_graph(net, "TEST"))


def test_a_lock_file_that_cannot_be_written_reads_without_the_lock_and_says_so(tmp_path, monkeypatch):
    _one_record_lmdb(tmp_path)
    opened = []
    real_open = lmdb.open

    def open_read_only_folder(path, **options):
        opened.append(options["lock"])
        if options["lock"]:
            raise lmdb.ReadonlyError("mdb_env_open: Permission denied")
        return real_open(path, **options)

    monkeypatch.setattr(lmdb, "open", open_read_only_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = _one_record_net(tmp_path)
    try:
        assert net.run({})["label"].tolist() == [3.0]
    finally:
        close_data_layers(net)
    assert opened == [True, False]
    assert len(caught) == 1 and "lock file cannot be written here; reading without its reader lock" \
        in str(caught[0].message)


def test_the_reader_holds_a_reader_slot_for_as_long_as_the_layer_lives(tmp_path):
    _one_record_lmdb(tmp_path)
    net = _one_record_net(tmp_path)
    with torch.no_grad():
        net.run({})
    readers = run_python("import lmdb, sys; print(lmdb.open(sys.argv[1], readonly=True).readers())",
                         tmp_path / "db", timeout=60)
    assert readers.returncode == 0, readers.stderr
    assert f" {os.getpid()} " in readers.stdout  # this process, in LMDB's reader table
    close_data_layers(net)
    del net
    gc.collect()
    assert str((tmp_path / "db").resolve()) not in _SNAPSHOTS._open
