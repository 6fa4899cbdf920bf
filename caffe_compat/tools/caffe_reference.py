"""Record what a real Caffe computes for a net, as the `.npz` that `caffe-compat compare`
reads (docs/reference-format.md describes the format).

Run it where pycaffe imports (Python 3.6 or later; it needs only numpy and caffe, not
caffe-compat, so the file can be copied to that machine on its own):

    python caffe_reference.py NET.prototxt WEIGHTS.caffemodel -o NET.npz
    python caffe_reference.py NET.prototxt WEIGHTS.caffemodel -o NET.npz --batches 3   # data-layer nets

and then, anywhere: `caffe-compat compare NET.prototxt WEIGHTS.caffemodel NET.npz`.

Nets fed by Input layers get seeded random inputs (or `--inputs IN.npz`, arrays named by
blob); blobs that are the label bottom of a loss or Accuracy layer get integer labels
in [0, --num-labels). One forward and one backward: with a loss, Caffe seeds the loss
tops with their loss weights; without one, each output gets a random top diff
(recorded as topdiff/). Gradients of the blobs need `force_backward: true` in the net.
Nets fed by data layers: `--batches K` records every blob of K forward passes.
"""
import argparse
import json
import sys

import numpy as np

LABEL_LAYERS = ("SoftmaxWithLoss", "Accuracy", "MultinomialLogisticLoss", "InfogainLoss", "ContrastiveLoss",
                "LiftedStructSimilaritySoftmaxLoss", "SigmoidCrossEntropyLoss", "HingeLoss")
# The label is the second bottom, except ContrastiveLoss (a, b, similar).
LABEL_BOTTOM = {"ContrastiveLoss": 2}


def is_split_blob(name):
    """Caffe's automatic Split layers' tops (`x_conv1_0_split_1`): not in the user's net."""
    return "_split_" in name


def blob_key(kind, name):
    """`input/data`, `blob/conv1`, `diff/inception_3a/output`: blob names keep their `/`."""
    return "{}/{}".format(kind, name)


def param_key(layer, index):
    return "paramdiff/{}/{}".format(layer, index)


def label_inputs(net):
    """Input blobs that some loss or Accuracy layer reads as its label."""
    labels = set()
    for layer_name, layer in zip(net._layer_names, net.layers):
        bottoms = net.bottom_names[layer_name]
        index = LABEL_BOTTOM.get(layer.type, 1)
        if layer.type in LABEL_LAYERS and len(bottoms) > index:
            labels.add(bottoms[index])
    return labels & set(net.inputs)


def make_inputs(net, rng, num_labels, given=None):
    """{input blob: array}: `given` where it names the blob, else seeded random values."""
    given = given or {}
    labels = label_inputs(net)
    inputs = {}
    for name in net.inputs:
        shape = net.blobs[name].data.shape
        if name in given:
            inputs[name] = np.asarray(given[name], dtype=np.float32).reshape(shape)
        elif name in labels:
            inputs[name] = rng.integers(0, num_labels, size=shape).astype(np.float32)
        else:
            inputs[name] = rng.standard_normal(shape).astype(np.float32)
    return inputs


def forward_backward(net, inputs, rng):
    """Feed `inputs`, run forward and backward; returns the reference's arrays by key."""
    record = {}
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
        record[blob_key("input", name)] = value.copy()
    net.forward()
    for name, blob in net.blobs.items():
        if not is_split_blob(name):
            record[blob_key("blob", name)] = np.array(blob.data, dtype=np.float32)
    has_loss = any(weight for weight in net.blob_loss_weights.values())
    top_diffs = {}
    if not has_loss:
        for name in net.outputs:
            top_diffs[name] = rng.standard_normal(net.blobs[name].diff.shape).astype(np.float32)
            record[blob_key("topdiff", name)] = top_diffs[name]
    net.backward(**top_diffs)
    for name, blob in net.blobs.items():
        if not is_split_blob(name):
            record[blob_key("diff", name)] = np.array(blob.diff, dtype=np.float32)
    for layer, blobs in net.params.items():
        for index, blob in enumerate(blobs):
            record[param_key(layer, index)] = np.array(blob.diff, dtype=np.float32)
    return record


def batches(net, count):
    """Every blob of `count` forward passes of a net that feeds itself (data layers)."""
    record = {}
    for k in range(count):
        net.forward()
        for name, blob in net.blobs.items():
            if not is_split_blob(name):
                record["batch{}/{}".format(k, name)] = np.array(blob.data, dtype=np.float32)
    return record


def meta(case, seed, description, phase, caffe_version):
    return np.array(json.dumps({"case": case, "seed": seed, "description": description, "phase": phase,
                                "made_by": "caffe_compat.tools.caffe_reference",
                                "caffe_version": caffe_version}))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("net", help="NET.prototxt")
    parser.add_argument("weights", help="WEIGHTS.caffemodel")
    parser.add_argument("-o", "--output", required=True, help="REF.npz to write")
    parser.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and top diffs")
    parser.add_argument("--inputs", help="an .npz of input arrays by blob name (instead of random ones)")
    parser.add_argument("--num-labels", type=int, default=10, help="labels are drawn from 0..N-1 (default 10)")
    parser.add_argument("--batches", type=int, help="record K forward passes of a data-layer net instead")
    parser.add_argument("--description", default="", help="free text kept in the file's meta")
    parser.add_argument("--gpu", type=int, help="run on this GPU (default: CPU)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import caffe
    except ImportError:
        sys.exit("caffe_reference: this script runs under Caffe: pycaffe (import caffe) is not importable here")
    if args.gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_device(args.gpu)
        caffe.set_mode_gpu()
    net = caffe.Net(args.net, caffe.TRAIN if args.phase == "TRAIN" else caffe.TEST, weights=args.weights)
    rng = np.random.default_rng(args.seed)
    if args.batches:
        record = batches(net, args.batches)
    else:
        given = dict(np.load(args.inputs)) if args.inputs else None
        record = forward_backward(net, make_inputs(net, rng, args.num_labels, given), rng)
    case = args.output.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    record["meta"] = meta(case, args.seed, args.description, args.phase, getattr(caffe, "__version__", "unknown"))
    np.savez(args.output, **record)
    print("wrote {}: {} arrays".format(args.output, len(record) - 1))


if __name__ == "__main__":
    main()
