"""Loading a VGG-16 caffemodel (~528 MiB of weights) with `load_net`, three ways:

- protobuf: the reader before the wire format (protobuf parses the whole file, twice
  with the dialect check, and every blob is decoded into a new array), then the net;
- wire: today's `load_net(prototxt, caffemodel)` (blobs as views over the mapped file,
  copied once into the parameters);
- floor: reading the file's bytes, plus `load_net(prototxt)` building the same net
  without weights.

The files are generated in a temporary folder (a VGG-16 deploy prototxt and random
weights, written blob by blob). Times: the three interleaved in one process, median of
--repeats. Peak memory: each in a fresh subprocess, peak RSS above the RSS just before
loading (imports done), over the weights' size.

    python benchmarks/load_weights.py [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
PATHS = ("protobuf", "wire", "floor")  # "bytes" (the file read alone) is timed beside them


def vgg16_prototxt() -> str:
    lines = ['name: "VGG_ILSVRC_16_layers"',
             'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }']
    bottom, block, index = "data", 1, 1
    for item in VGG16:
        if item == "M":
            name = f"pool{block}"
            lines.append(f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
                         f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}')
            bottom, block, index = name, block + 1, 1
            continue
        name = f"conv{block}_{index}"
        lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                     f'convolution_param {{ num_output: {item} pad: 1 kernel_size: 3 }} }}')
        lines.append(f'layer {{ name: "relu{block}_{index}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        bottom, index = name, index + 1
    for name, outputs in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        lines.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                     f'inner_product_param {{ num_output: {outputs} }} }}')
        if name != "fc8":
            lines.append(f'layer {{ name: "relu{name[2:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        bottom = name
    lines.append(f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}')
    return "\n".join(lines) + "\n"


def vgg16_shapes():
    """(layer name, [blob shapes]) in the net's order."""
    shapes, channels, block, index = [], 3, 1, 1
    for item in VGG16:
        if item == "M":
            block, index = block + 1, 1
            continue
        shapes.append((f"conv{block}_{index}", [(item, channels, 3, 3), (item,)]))
        channels, index = item, index + 1
    inputs = channels * 7 * 7
    for name, outputs in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        shapes.append((name, [(outputs, inputs), (outputs,)]))
        inputs = outputs
    return shapes


def write_caffemodel(prototxt: Path, path: Path) -> int:
    """Random weights for the prototxt's layers, written field by field (never the whole
    message in memory); returns the weights' bytes."""
    from caffe_compat.io.files import read_prototxt
    from caffe_compat.io.wire import encode_varint

    def field(number: int, length: int) -> bytes:
        return encode_varint(number << 3 | 2) + encode_varint(length)

    layers = {layer.name: layer for layer in read_prototxt(prototxt).net.layer}
    rng = np.random.default_rng(0)
    total = 0
    with open(path, "wb") as out:
        for name, blob_shapes in vgg16_shapes():
            definition = layers[name].SerializeToString()
            blobs = []
            for shape in blob_shapes:
                dims = b"".join(encode_varint(d) for d in shape)
                shape_field = field(7, len(field(1, len(dims)) + dims)) + field(1, len(dims)) + dims
                nbytes = 4 * int(np.prod(shape))
                blobs.append((shape, shape_field, nbytes, len(shape_field) + len(field(5, nbytes)) + nbytes))
            body = len(definition) + sum(len(field(7, size)) + size for *_, size in blobs)
            out.write(field(100, body) + definition)
            for shape, shape_field, nbytes, size in blobs:
                out.write(field(7, size) + shape_field + field(5, nbytes))
                values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
                values *= 0.01
                out.write(values.tobytes())
                total += nbytes
    return total


def load_protobuf(prototxt: Path, caffemodel: Path):
    """The reader as it was before the wire format (caffe_compat/io/files.py at b3e4ddf^)."""
    from caffe_compat.io.blobs import blob_to_array
    from caffe_compat.io.dialects.detect import detect_binary_dialect
    from caffe_compat.io.schema import messages, unknown_fields
    from caffe_compat.io.upgrade import upgrade_net

    data = caffemodel.read_bytes()
    dialect = detect_binary_dialect(data)
    net = messages(dialect).NetParameter()
    net.ParseFromString(data)
    unknown_fields(net)
    upgrade_net(net)
    weights = {layer.name: [blob_to_array(b) for b in layer.blobs] for layer in net.layer if len(layer.blobs)}
    del data, net
    return _net_with(prototxt, weights)


def _net_with(prototxt: Path, weights):
    from caffe_compat.graph import build_graph
    from caffe_compat.io.files import read_prototxt
    from caffe_compat.net import CaffeNet

    graph = build_graph(read_prototxt(prototxt).net, "TEST")
    return CaffeNet(graph, weights)


def load_wire(prototxt: Path, caffemodel: Path):
    from caffe_compat.loading import load_net
    return load_net(prototxt, caffemodel)


def load_floor(prototxt: Path, caffemodel: Path):
    from caffe_compat.loading import load_net
    data = caffemodel.read_bytes()
    net = load_net(prototxt)
    del data
    return net


def read_bytes_only(prototxt: Path, caffemodel: Path) -> None:
    caffemodel.read_bytes()


LOADERS = {"protobuf": load_protobuf, "wire": load_wire, "floor": load_floor, "bytes": read_bytes_only}


def _status_bytes(key: str) -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def one(path_name: str, prototxt: Path, caffemodel: Path) -> dict:
    """Import everything, then load once; peak RSS above the RSS before the load."""
    importlib.import_module("caffe_compat.loading")  # imports are not the load's memory
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    net = LOADERS[path_name](prototxt, caffemodel)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    del net
    return {"seconds": seconds, "peak_above_start": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="folder for the generated files (kept; reused when present)")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, *args.files)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        prototxt, caffemodel = folder / "vgg16_deploy.prototxt", folder / "vgg16.caffemodel"
        prototxt.write_text(vgg16_prototxt())
        weights_bytes = sum(4 * int(np.prod(s)) for _, shapes in vgg16_shapes() for s in shapes)
        if not caffemodel.exists() or caffemodel.stat().st_size < weights_bytes:
            write_caffemodel(prototxt, caffemodel)
        file_bytes = caffemodel.stat().st_size
        caffemodel.read_bytes()  # the file in the page cache for every path alike
        times = {name: [] for name in LOADERS}
        for _ in range(args.repeats):
            for name in LOADERS:
                start = time.perf_counter()
                net = LOADERS[name](prototxt, caffemodel)
                times[name].append(time.perf_counter() - start)
                del net
        memory = {}
        for name in PATHS:
            result = subprocess.run([sys.executable, __file__, "--one", name, "--files", str(prototxt), str(caffemodel)],
                                    capture_output=True, text=True, check=True)
            memory[name] = json.loads(result.stdout.strip().splitlines()[-1])
    floor = statistics.median(times["floor"])
    print(f"VGG-16 caffemodel: {file_bytes / 2**20:.0f} MiB file, "
          f"{weights_bytes / 2**20:.0f} MiB of weights; median of {args.repeats}, interleaved")
    print("| path | load time (s) | vs floor | peak RSS above start (MiB) | peak / weights |")
    print("| --- | --- | --- | --- | --- |")
    for name in PATHS:
        median = statistics.median(times[name])
        peak = memory[name]["peak_above_start"]
        print(f"| {name} | {median:.3f} ({', '.join(f'{t:.2f}' for t in times[name])}) | {median / floor:.2f}x "
              f"| {peak / 2**20:.0f} | {peak / weights_bytes:.2f} |")
    median = statistics.median(times["bytes"])
    print(f"| the file's bytes read alone | {median:.3f} | {median / floor:.2f}x | | |")


if __name__ == "__main__":
    main()
