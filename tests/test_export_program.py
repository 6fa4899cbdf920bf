"""`convert NET WEIGHTS -o model.pt2`: a torch.export program with a dynamic batch that
`torch.export.load` runs without caffe_compat, giving the CaffeNet's outputs (to the bit
against the CaffeNet with the PyTorch LRN, which the program traces; within 1e-6 relative
of the C kernel's)."""
import warnings

import numpy as np
import pytest
import torch

from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError
from caffe_compat.converters.program import export_program
from caffe_compat.layers import lrn
from caffe_compat.loading import load_net
from caffe_compat.losses import NoPositivePairsWarning

from conftest import FIXTURES, PAPER_MODEL, REFERENCE, require, run_python
from test_convert_fixture_nets import _input

# Exporting GoogLeNet takes about 5 s (one CPU core), the layer nets well under 1 s each.
LAYER_CASES = ["lrn_across", "lrn_within", "pool_clip_rule", "batchnorm_scale", "concat", "crop", "eltwise",
               "scale_bias_bottoms", "softmax_loss"]
EXTRACT = PAPER_MODEL / "extract_googlenet_ebay_feature_embed64.prototxt"
PUBLIC = FIXTURES / "public-nets"
BATCHES = (1, 3)

# Loads programs where caffe_compat cannot be imported: off sys.path, and refused by a
# finder ahead of the editable install's. Args: pairs PROGRAM.pt2 RUNS.pt, RUNS.pt holding
# a list of input tuples; each run's outputs are saved to RUNS.pt.out.
DRIVER = """
import importlib.abc, sys
from pathlib import Path

class Refused(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("caffe_compat", "converters"):
            raise ImportError("loading the program imports " + name)

sys.meta_path.insert(0, Refused())
# A checkout leaves sys.path; an installed copy shares site-packages with torch, so the
# finder above refuses it there.
sys.path = [p for p in sys.path
            if not (Path(p or ".") / "caffe_compat").exists() or (Path(p or ".") / "torch").exists()]
import torch

args = sys.argv[1:]
for program_path, runs_path in zip(args[0::2], args[1::2]):
    preprocess = {"preprocess.json": ""}
    module = torch.export.load(program_path, extra_files=preprocess).module()
    with torch.no_grad():
        outputs = [module(*inputs) for inputs in torch.load(runs_path, weights_only=True)]
    torch.save({"outputs": outputs, "preprocess": preprocess["preprocess.json"]}, runs_path + ".out")
print(sorted(n for n in sys.modules if n.partition(".")[0] in ("caffe_compat", "converters")))
"""


def _cases():
    """(name, prototxt, weights or None, CLI options) of the covered nets."""
    cases = [(stem.name, require(stem.with_suffix(".prototxt")), require(stem.with_suffix(".caffemodel")), [])
             for stem in [REFERENCE / "nets" / "googlenet_deploy", REFERENCE / "nets" / "v1_legacy" / "v1"]
             + [REFERENCE / "layers" / name for name in LAYER_CASES] + [REFERENCE / "forks" / "ssd" / "detout_05"]]
    return cases + [("paper_extract", require(EXTRACT), None, ["--random-init"])]


def _caffenet(proto, weights):
    torch.manual_seed(0)  # --random-init's seed: the same fillers
    return load_net(proto, weights, fold=False).eval()  # unfolded: the program's numbers


def _runs(net, generator):
    """Inputs at each of BATCHES: the net's input shapes with the batch replaced (an input
    of another length than the first keeps its shape, as the program does)."""
    shapes = [net.blob_shapes[name] for name in net.input_names]
    runs = []
    for batch in BATCHES:
        runs.append(tuple(torch.rand((batch, *shape[1:]) if shape[0] == shapes[0][0] else shape,
                                     generator=generator) * 4 for shape in shapes))
    return runs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every covered net exported and run at two batch sizes in a Python without caffe_compat:
    {name: (prototxt, weights, runs, the program's outputs, its preprocess.json)}."""
    tmp = tmp_path_factory.mktemp("program")
    generator = torch.Generator().manual_seed(0)
    cases, args = {}, []
    for name, proto, weights, options in _cases():
        program = tmp / f"{name}.pt2"
        assert main(["convert", str(proto), *([str(weights)] if weights else []), *options, "-o", str(program)]) == 0
        runs = _runs(_caffenet(proto, weights), generator)
        torch.save(runs, tmp / f"{name}.runs.pt")
        args += [program, tmp / f"{name}.runs.pt"]
        cases[name] = (proto, weights, runs)
    result = run_python(DRIVER, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # the program loaded and ran without caffe_compat
    loaded = {name: torch.load(tmp / f"{name}.runs.pt.out", weights_only=True) for name in cases}
    return {name: (*case, loaded[name]["outputs"], loaded[name]["preprocess"]) for name, case in cases.items()}


def test_outputs_equal_the_caffenets_to_the_bit_at_two_batch_sizes(exported, monkeypatch):
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)  # the PyTorch LRN, as the program's
    for name, (proto, weights, runs, outputs, _) in exported.items():
        net = _caffenet(proto, weights)
        for inputs, program_out in zip(runs, outputs):
            with torch.no_grad():
                expected = net(*inputs)
            assert isinstance(program_out, dict) and list(program_out) == list(expected), name
            for blob, value in expected.items():
                rows = name == "detout_05"  # DetectionOutput's (1, 1, detections, 7)
                assert value.dim() == 0 or rows or value.shape[0] == inputs[0].shape[0], (name, blob)
                assert torch.equal(program_out[blob], value), (name, blob, inputs[0].shape[0])


def test_lrn_against_the_c_kernel(exported):
    """The C kernel (the CaffeNet's on CPU) rounds differently: within 1e-6 relative of it."""
    proto, weights, runs, outputs, _ = exported["googlenet_deploy"]
    with torch.no_grad():
        kernel = _caffenet(proto, weights)(*runs[1])["prob"]
    assert lrn._kernel_applies(torch.zeros(1, 3, 4, 4), 5)  # GoogLeNet's local_size: the CaffeNet runs the kernel
    assert (outputs[1]["prob"] - kernel).abs().max() <= 1e-6 * kernel.abs().max()


def test_preprocessing_is_stored_beside_the_program(exported):
    assert '"preprocess.channel_order": "BGR"' in exported["googlenet_deploy"][4]


def test_export_traces_the_pytorch_lrn_where_torch_does_not_report_compiling(monkeypatch):
    """torch versions whose export does not set is_compiling: is_exporting keeps the C kernel out."""
    stem = REFERENCE / "layers" / "lrn_across"
    net = load_net(require(stem.with_suffix(".prototxt")), stem.with_suffix(".caffemodel")).eval()
    x = torch.from_numpy(np.load(stem.with_suffix(".npz"))[f"input/{net.input_names[0]}"])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    program = export_program(net).module()
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)
    assert torch.equal(program(x)["lrn"], net(x)["lrn"])


def _pairs_batch(n, generator):
    """Embeddings (n, 64) far from the origin, two of them 1e-4 apart (an entry whose distance
    the loss takes from the difference), and labels of n // 3 + 1 classes (none shared at n = 1)."""
    x = torch.randn(n, 64, generator=generator) * 3 + 40
    x[-1] = x[0] + 1e-4
    return x, torch.randint(0, n // 3 + 1, (n,), generator=generator).float()


def test_the_lifted_loss_exports_and_equals_the_caffenets_at_other_batches(tmp_path):
    """Traced at batch 2: its near entries, pairs and pair count found when run, with the bits of
    the CaffeNet's loss (the fixture's batch, others, one without positive pairs); NaN labels
    stop the program as they stop the CaffeNet, whose one-line error is unchanged."""
    stem = REFERENCE / "layers" / "lifted_pairs_m128_d64"
    assert main(["convert", str(stem.with_suffix(".prototxt")), str(stem.with_suffix(".caffemodel")),
                 "-o", str(tmp_path / "model.pt2")]) == 0
    program = torch.export.load(tmp_path / "model.pt2").module()
    net = _caffenet(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel"))
    generator = torch.Generator().manual_seed(0)
    for n in (1, 7, 128, 300):
        x, labels = _pairs_batch(n, generator)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NoPositivePairsWarning)
            expected = net(x, labels)["loss"]
        assert torch.equal(program(x, labels)["loss"], expected), n
    labels[3] = float("nan")
    with pytest.raises(RuntimeError, match="LiftedStructSimilaritySoftmaxLoss: labels contain NaN"):
        program(x, labels)
    with pytest.raises(CaffeCompatError, match="^LiftedStructSimilaritySoftmaxLoss: labels contain NaN$"):
        net(x, labels)


def _detection_net(tmp_path, classes, priors, params, share_location=True):
    """A net of one DetectionOutput whose bottoms are inputs, built for 3 images."""
    loc = priors * (1 if share_location else classes) * 4
    proto = tmp_path / "detect.prototxt"
    proto.write_text(
        'name: "detect"\n' + _input("loc", 3, loc) + _input("conf", 3, priors * classes)
        + _input("prior", 1, 2, priors * 4) +
        'layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
        f'detection_output_param {{ num_classes: {classes} {params} }} }}\n')
    return load_net(proto, None).eval()


# name -> (classes, detection_output_param beside num_classes, share_location)
DETECTION_CASES = {
    "keep_top_k": (4, "code_type: CENTER_SIZE keep_top_k: 20 confidence_threshold: 0.3 "
                      "nms_param { nms_threshold: 0.45 top_k: 15 }", True),
    "adaptive_nms": (3, "code_type: CENTER_SIZE nms_param { nms_threshold: 0.7 eta: 0.8 top_k: 12 }", True),
    "per_class_locations": (3, "share_location: false background_label_id: -1 code_type: CORNER_SIZE "
                               "nms_param { nms_threshold: 0.45 }", False),
    "no_candidate": (3, "confidence_threshold: 1.5 nms_param { nms_threshold: 0.45 }", True),
}


@pytest.mark.parametrize("case", sorted(DETECTION_CASES))
def test_detection_output_program_gives_the_layers_rows(case, tmp_path):
    """The program's rows are the CaffeNet's, in order and to the bit, at other batch sizes than
    the traced one: with one image without detections (no rows for it), and with none detecting
    anything (the fork's one -1 row per image)."""
    from test_layers_ssd import detection_inputs  # noqa: PLC0415

    classes, params, share_location = DETECTION_CASES[case]
    net = _detection_net(tmp_path, classes, 30, params, share_location)
    program = export_program(net).module()
    loc, conf, prior = map(torch.from_numpy, detection_inputs(4, 30, classes, share_location, seed=7))
    quiet = conf.clone()
    quiet[1] = 0  # image 1's scores are under 0.3
    runs = {"three": (loc[:3], conf[:3]), "one": (loc[:1], conf[:1]), "image 1 quiet": (loc, quiet),
            "all quiet": (loc[:2], torch.zeros_like(conf[:2]))}
    for run, (loc_run, conf_run) in runs.items():
        with torch.no_grad():
            expected, ours = net(loc_run, conf_run, prior)["out"], program(loc_run, conf_run, prior)["out"]
        assert torch.equal(ours, expected), (case, run)
        images = set(expected[0, 0, :, 0].tolist())
        if case == "no_candidate" or (case == "keep_top_k" and run == "all quiet"):
            assert expected[0, 0, :, 1:].eq(-1).all() and expected.shape[2] == loc_run.shape[0], run
        else:
            assert images == set(range(loc_run.shape[0])) - ({1} if case == "keep_top_k" and run == "image 1 quiet"
                                                             else set()), run


def test_detection_output_program_without_torchs_scan(tmp_path, monkeypatch):
    """torch versions without the scan operator: the NMS loop is unrolled, with the same rows."""
    from caffe_compat.layers import bbox  # noqa: PLC0415
    from test_layers_ssd import detection_inputs  # noqa: PLC0415

    classes, params, share_location = DETECTION_CASES["adaptive_nms"]
    net = _detection_net(tmp_path, classes, 30, params, share_location)
    monkeypatch.setattr(bbox, "_scan", lambda: None)
    program = export_program(net)
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    assert not any("scan" in str(node.target) for graph in graphs for node in graph.nodes)
    loc, conf, prior = map(torch.from_numpy, detection_inputs(2, 30, classes, share_location, seed=8))
    with torch.no_grad():
        expected = net(loc, conf, prior)["out"]
    assert torch.equal(program.module()(loc, conf, prior)["out"], expected) and expected.shape[2] > 2


def test_a_proposal_layer_without_torchs_scan_is_refused_by_name(tmp_path, capsys, monkeypatch):
    """Its NMS unrolled over thousands of candidates (where scan is missing) would take far too long
    to export: one line naming the layer instead."""
    from caffe_compat.layers import bbox  # noqa: PLC0415

    monkeypatch.setattr(bbox, "_scan", lambda: None)
    proto = FIXTURES / "faster_rcnn" / "tiny_test.prototxt"
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.pt2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "model.pt2").exists()
    assert "tiny_test.prototxt': layer 'proposal' (Python): a program needs torch's scan operator" in err, err


def test_detection_output_program_takes_equal_scores_at_the_cut_stably(tmp_path):
    """Where keep_top_k cuts among equal scores, the CaffeNet follows the fork's unstable std::sort,
    which no program graph holds: the program takes them by label, then rank (a stable sort)."""
    from test_layers_ssd import detection_inputs, fork_detection_output  # noqa: PLC0415

    net = _detection_net(tmp_path, 3, 40, "keep_top_k: 9 nms_param { nms_threshold: 0.8 }")
    loc, conf, prior = detection_inputs(2, 40, 3, True, seed=11, quantize=4)
    ours = export_program(net).module()(*map(torch.from_numpy, (loc, conf, prior)))["out"]
    stable = fork_detection_output(loc, conf, prior, 3, keep_top_k=9, nms=0.8,
                                   sort=lambda items, before: items.sort(key=lambda item: -item[0]))
    assert np.array_equal(ours.reshape(-1, 7).numpy(), stable)
    with torch.no_grad():
        assert not torch.equal(ours, net(*map(torch.from_numpy, (loc, conf, prior)))["out"])


def test_mobilenet_ssd_program_gives_the_caffenets_rows():
    """MobileNet-SSD at batch 1 and 8, its class scores' weights scaled down: random weights
    saturate the softmax, and its scores of 1 tie at the keep_top_k cut (see the test above)."""
    torch.manual_seed(0)
    net = load_net(require(PUBLIC / "MobileNetSSD_deploy.prototxt"), None, fold=False).eval()
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if "mbox_conf" in name:
                parameter.mul_(0.01)
    program = export_program(net).module()
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        image = torch.rand((batch, *net.blob_shapes["data"][1:]), generator=generator) * 255
        with torch.no_grad():
            expected, ours = net(image)["detection_out"], program(image)["detection_out"]
        assert torch.equal(ours, expected), batch
        assert expected.shape[2] == 100 * batch  # every image's keep_top_k detections


def test_the_refusing_layer_is_found_behind_a_many_bottom_layer(tmp_path, capsys):
    """A Convolution's forward takes *bottoms: it traces alone, and the Reshape after it is named."""
    net = tmp_path / "net.prototxt"
    net.write_text('name: "fixed"\ninput: "data"\ninput_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\n'
                   'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                   'convolution_param { num_output: 2 kernel_size: 1 } }\n'
                   'layer { name: "flat" type: "Reshape" bottom: "conv" top: "flat" '
                   'reshape_param { shape { dim: 2 dim: -1 } } }\n')
    code = main(["convert", str(net), "--random-init", "-o", str(tmp_path / "model.pt2")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "layer 'flat' (Reshape)" in err


@pytest.mark.parametrize("batch", [2, 5])  # the batch the export traces at, and another
def test_a_reshape_that_fixes_the_batch_is_refused_by_name(tmp_path, capsys, batch):
    net = tmp_path / "net.prototxt"
    net.write_text(f'name: "fixed"\ninput: "data"\ninput_shape {{ dim: {batch} dim: 3 dim: 4 dim: 4 }}\n'
                   f'layer {{ name: "flat" type: "Reshape" bottom: "data" top: "flat" '
                   f'reshape_param {{ shape {{ dim: {batch} dim: -1 }} }} }}\n')
    code = main(["convert", str(net), "--random-init", "-o", str(tmp_path / "model.pt2")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "layer 'flat' (Reshape)" in err
    assert not (tmp_path / "model.pt2").exists()


def test_a_model_file_converts_too(tmp_path):
    stem = REFERENCE / "layers" / "conv_basic"
    model = tmp_path / "model.pt"
    assert main(["convert", str(stem.with_suffix(".prototxt")), str(stem.with_suffix(".caffemodel")),
                 "-o", str(model)]) == 0
    assert main(["convert", str(model), "-o", str(tmp_path / "model.pt2")]) == 0
    net = load_net(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel")).eval()
    x = torch.rand(3, *net.blob_shapes[net.input_names[0]][1:])
    out = torch.export.load(tmp_path / "model.pt2").module()(x)
    assert all(torch.equal(out[blob], value) for blob, value in net(x).items())
