"""`inspect` by arithmetic: the torch-free shapes and parameter counts equal the built
CaffeNet's, nothing is allocated, the table fits the terminal, JSON holds objects."""
import json
import math
import textwrap
from pathlib import Path

import pytest

from caffe_compat.graph import build_graph
from caffe_compat.tools.inspect import format_inspection, inspect_net
from caffe_compat.io.files import read_net
from caffe_compat.layers.catalog import CATALOG
from caffe_compat.shapes import RULES, net_shapes
from conftest import PAPER_MODEL, REFERENCE, require, run_cli, run_python

PAPER = PAPER_MODEL
EMBED64 = "train_val_googlenet_finetune_liftedstructsim_softmax_pair_m128_multilabel_embed64.prototxt"
EXTRACT64 = "extract_googlenet_ebay_feature_embed64.prototxt"


def _fixture_nets():
    cases = [(p, "TEST") for p in sorted((REFERENCE / "layers").glob("*.prototxt"))]
    cases += [(REFERENCE / "nets" / "googlenet_deploy.prototxt", "TEST"),
              (REFERENCE / "nets" / "v1_legacy" / "v1.prototxt", "TEST"),
              (REFERENCE / "nets" / "data_layer" / "data.prototxt", "TEST"),
              (REFERENCE / "nets" / "solver" / "train.prototxt", "TRAIN"),
              (PAPER / EMBED64, "TRAIN"), (PAPER / EXTRACT64, "TEST")]
    cases += [(p, "TEST") for p in sorted((REFERENCE / "forks" / "ssd").glob("*.prototxt"))]
    return [pytest.param(p, phase, id=f"{p.parent.name}/{p.stem}-{phase}") for p, phase in cases]


def test_every_catalogued_type_has_a_shape_rule():
    missing = sorted(set(CATALOG) - set(RULES))
    assert not missing, ("add a shape rule (@rule(...)) in caffe_compat/shapes.py for: " + ", ".join(missing))


def _built(net_file, phase):
    """The CaffeNet of `phase`, and whether its data layers had to become inputs (their
    sources are absent: the paper's nets) with the layers scoring the net dropped."""
    from caffe_compat.deploy import deploy_net
    from caffe_compat.graph import layer_included
    from caffe_compat.net import CaffeNet

    sources = [layer.data_param.source if layer.type == "Data" else layer.image_data_param.source
               for layer in net_file.net.layer if layer.type in ("Data", "ImageData") and layer_included(layer, phase)]
    absent = any(not Path(source).exists() for source in sources)
    net_param = deploy_net(net_file.net) if absent else net_file.net
    return CaffeNet(build_graph(net_param, phase, net_file.dialect)), absent


@pytest.mark.parametrize("path, phase", _fixture_nets())
def test_shapes_and_parameters_equal_the_built_net(path, phase, monkeypatch):
    from caffe_compat.layers.registry import caffe_blobs

    monkeypatch.chdir(require(path).parent)  # data sources resolve from the working directory
    net_file = read_net(path)
    arithmetic = net_shapes(build_graph(net_file.net, phase, net_file.dialect))
    net, deployed = _built(net_file, phase)
    compared = 0
    for blob, shape in net.blob_shapes.items():
        if arithmetic.blobs.get(blob) is None:
            # only where the prototxt does not give the size (a Data layer without crop_size)
            assert any("the image size is in the records" in note for note in arithmetic.notes), (blob, shape)
            continue
        assert arithmetic.blobs[blob] == tuple(shape), blob
        compared += 1
    assert compared == len(net.blob_shapes) or arithmetic.notes
    unique = {}
    for module_name, module in net.layers.items():
        layer = net.layer_names[module_name]
        blobs = [tuple(t.shape) for t in caffe_blobs(module)]
        assert arithmetic.params[layer] == blobs or (arithmetic.params[layer] is None and arithmetic.notes), layer
        unique.update({id(t): t.numel() for t in caffe_blobs(module)})
    if not arithmetic.notes and not deployed:  # shared blobs counted once, as the built net holds them once
        assert arithmetic.total_params() == (sum(unique.values()), True)


def test_input_shapes_size_data_layers_the_prototxt_leaves_open():
    net = require(REFERENCE / "nets" / "data_layer" / "data.prototxt")
    assert inspect_net(net)["layers"][1]["top_shapes"] == {"data2": None, "label2": [6]}
    info = inspect_net(net, input_shapes={"data2": (6, 3, 32, 30)})
    assert info["layers"][1]["top_shapes"] == {"data2": [6, 3, 32, 30], "label2": [6]}
    assert not info["shape_notes"] and info["total_params_complete"]


def test_the_paper_net_counts_its_parameters_from_the_prototxt(tmp_path):
    result = run_cli("inspect", require(PAPER / EMBED64), "--phase", "TRAIN", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["total_params"] == 6_039_152 and info["total_params_complete"]
    fc = {r["name"]: r for r in info["layers"]}["fc_embedding"]
    assert fc["blobs"] == [[64, 1024], [64]] and fc["top_shapes"] == {"fc_embedding": [128, 64]}


def test_a_phase_without_data_suggests_the_other(tmp_path):
    result = run_cli("inspect", require(PAPER / EMBED64), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "produced by no layer of the TEST net" in lines[0] and "--phase TRAIN" in lines[0]


def test_json_gives_parameters_as_objects():
    info = inspect_net(require(PAPER / EMBED64), phase="TRAIN")
    conv = info["layers"][1]["params"]["convolution_param"]
    assert conv["num_output"] == 64 and conv["kernel_size"] == [7] and conv["pad"] == [3]
    assert conv["weight_filler"] == {"type": "xavier", "std": 0.1}  # float32 0.1, not 0.10000000149
    data = info["layers"][0]["params"]
    assert data["data_param"]["backend"] == "LMDB" and data["transform_param"]["crop_size"] == 227
    assert info["layers"][-1]["params"]["lifted_struct_sim_softmax_loss_param"] == {"margin": 1.0}


@pytest.mark.parametrize("columns", [60, 80, 120, 400])
def test_the_table_fits_the_terminal(columns):
    info = inspect_net(require(REFERENCE / "nets" / "googlenet_deploy.prototxt"))
    lines = format_inspection(info, columns=columns).splitlines()
    assert max(len(line) for line in lines) <= columns
    text = "\n".join(lines)
    assert "inception_5b/output" in text and "1,025,000" in text and "total: 143 layers, 6,998,552 parameters" in text
    if columns == 400:  # wide enough: one line per layer
        assert len(lines) == 1 + 2 + 143 + 1


def test_automatic_split_layers_are_hidden_unless_all(tmp_path):
    caffemodel = require(REFERENCE / "layers" / "concat.caffemodel")
    shown = inspect_net(caffemodel)
    assert [r["name"] for r in shown["layers"]] == ["a", "b", "c1", "c2"] and shown["hidden_split_layers"] == 1
    assert {r["name"]: r["bottoms"] for r in shown["layers"]}["c2"] == ["a", "a"]  # the split's source
    everything = inspect_net(caffemodel, show_all=True)
    assert "a_a_0_split" in [r["name"] for r in everything["layers"]]
    # a Split the prototxt declares itself stays
    assert "split" in [r["name"] for r in inspect_net(require(REFERENCE / "layers" / "shape_ops.caffemodel"))["layers"]]
    result = run_cli("inspect", caffemodel, "--all", cwd=tmp_path)
    assert result.returncode == 0 and "a_a_0_split" in result.stdout


def test_stored_blobs_that_do_not_fit_are_named(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(require(REFERENCE / "layers" / "conv_basic.prototxt").read_text().replace(
        "num_output: 5", "num_output: 6"))
    if "num_output: 6" not in net.read_text():
        pytest.fail("conv_basic.prototxt changed: adapt this test")
    info = inspect_net(net, REFERENCE / "layers" / "conv_basic.caffemodel")
    assert len(info["weights_mismatched"]) == 1 and "the net needs" in info["weights_mismatched"][0]


def test_layers_missing_from_either_side_are_named_both_ways(tmp_path):
    """The weights' layers the net lacks, and the net's layers with parameters the weights
    lack (they would keep their fillers' values): both listed."""
    solver = require(REFERENCE / "nets" / "solver")
    net = tmp_path / "net.prototxt"
    net.write_text((solver / "train.prototxt").read_text().replace('name: "fc_embedding"', 'name: "fc_new"'))
    result = run_cli("inspect", net, solver / "init.caffemodel", "--phase", "TRAIN", "--input-shape",
                     "data=16,3,32,30", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "in the weights but not this net: fc_embedding" in text
    assert "in this net but not the weights (their fillers' values unless given): fc_new" in text
    assert "at least" not in text  # --input-shape sized the data layer's top: every count is known


def test_data_layers_whose_records_are_here_shape_from_the_first_one(tmp_path, monkeypatch):
    """A TRAIN net with its data at hand: the Data layer's tops take the first record's
    size (and an ImageData layer's the first listed image's), so every shape is known."""
    from PIL import Image

    solver = require(REFERENCE / "nets" / "solver")
    monkeypatch.chdir(solver)
    import lmdb

    from caffe_compat.io.schema import messages
    with lmdb.open("train_lmdb", readonly=True, lock=False) as env, env.begin() as txn:
        datum = messages("bvlc").Datum.FromString(next(iter(txn.cursor()))[1])
    info = inspect_net("train.prototxt", phase="TRAIN")
    assert info["layers"][0]["top_shapes"] == {"data": [16, datum.channels, datum.height, datum.width],
                                               "label": [16]}
    assert info["total_params_complete"] and not info["shape_notes"]
    Image.new("RGB", (20, 12)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 0\n")
    net = tmp_path / "net.prototxt"
    net.write_text(f'layer {{ name: "images" type: "ImageData" top: "data" top: "label" image_data_param {{ '
                   f'source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" batch_size: 4 }} }}')
    assert inspect_net(net)["layers"][0]["top_shapes"] == {"data": [4, 3, 12, 20], "label": [4]}


def test_a_type_without_a_shape_rule_shows_question_marks(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(textwrap.dedent("""
        layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "mine" type: "MyPythonLayer" bottom: "x" top: "y" }
        layer { name: "fc" type: "InnerProduct" bottom: "y" top: "z" inner_product_param { num_output: 4 } }
        layer { name: "fc0" type: "InnerProduct" bottom: "x" top: "w" inner_product_param { num_output: 4 } }
    """))
    info = inspect_net(net)
    rows = {r["name"]: r for r in info["layers"]}
    assert rows["fc"]["top_shapes"] == {"z": None} and rows["fc"]["param_count"] is None
    assert rows["fc0"]["param_count"] == 16
    assert info["total_params"] == 16 and not info["total_params_complete"]
    text = format_inspection(info, columns=200)
    assert "no shape rule for type 'MyPythonLayer'" in text and "at least 16 parameters" in text


def test_a_huge_layer_is_counted_not_allocated(tmp_path):
    # 10 million outputs on 301 inputs: 3 billion weights (12 GB), under a 300 MB address space.
    net = tmp_path / "huge.prototxt"
    net.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 301 } } }\n'
                   'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" '
                   'inner_product_param { num_output: 10000000 } }\n')
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (300 * 2 ** 20, 300 * 2 ** 20))
        from caffe_compat.cli.main import main
        sys.exit(main(["inspect", {str(net)!r}, "--json"]))
    """)
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = run_python(code, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    fc = json.loads(result.stdout)["layers"][1]
    assert fc["param_count"] == 301 * 10_000_000 + 10_000_000 and fc["top_shapes"] == {"y": [1, 10_000_000]}
    assert math.prod(fc["blobs"][0]) == 3_010_000_000


NEWER_TYPES = """
layer { name: "x" type: "DummyData" top: "x" top: "sel" top: "idx" top: "H"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 9 dim: 7 } shape { dim: 4 dim: 1 } shape { dim: 6 }
                     shape { dim: 1 dim: 1 } } }
layer { name: "cols" type: "Im2col" bottom: "x" top: "cols" convolution_param { kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "spp" type: "SPP" bottom: "x" top: "spp" spp_param { pyramid_height: 3 } }
layer { name: "spp1" type: "SPP" bottom: "x" top: "spp1" spp_param { pyramid_height: 1 pool: AVE } }
layer { name: "floor" type: "Pooling" bottom: "x" top: "floor"
  pooling_param { kernel_size: 2 stride: 2 round_mode: FLOOR } }
layer { name: "clip" type: "Clip" bottom: "spp" top: "clip" clip_param { min: -1 max: 1 } }
layer { name: "swish" type: "Swish" bottom: "clip" top: "swish" }
layer { name: "filter" type: "Filter" bottom: "swish" bottom: "sel" top: "kept" }
layer { name: "reindex" type: "BatchReindex" bottom: "swish" bottom: "idx" top: "picked" }
layer { name: "scores" type: "InnerProduct" bottom: "picked" top: "scores" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "InfogainLoss" bottom: "scores" bottom: "idx" bottom: "H" top: "loss" top: "prob" }
layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 5 dim: 2 } } }
layer { name: "seq" type: "DummyData" top: "seq" top: "cont" top: "static"
  dummy_data_param { shape { dim: 5 dim: 2 dim: 3 dim: 2 } shape { dim: 5 dim: 2 } shape { dim: 2 dim: 4 } } }
layer { name: "lstm" type: "LSTM" bottom: "seq" bottom: "cont" top: "h" recurrent_param { num_output: 7 } }
layer { name: "rnn" type: "RNN" bottom: "seq" bottom: "cont" bottom: "static" top: "r"
  recurrent_param { num_output: 3 } }
layer { name: "unit_in" type: "DummyData" top: "c0" top: "gates" top: "c1"
  dummy_data_param { shape { dim: 1 dim: 2 dim: 3 } shape { dim: 1 dim: 2 dim: 12 } shape { dim: 1 dim: 2 } } }
layer { name: "unit" type: "LSTMUnit" bottom: "c0" bottom: "gates" bottom: "c1" top: "c" top: "hh" }
"""


def test_the_newer_types_shape_as_built(tmp_path):
    from caffe_compat.layers.registry import caffe_blobs
    from caffe_compat.net import CaffeNet

    net = tmp_path / "newer.prototxt"
    net.write_text(NEWER_TYPES)
    net_file = read_net(net)
    graph = build_graph(net_file.net, "TEST", net_file.dialect)
    arithmetic = net_shapes(graph)
    assert not arithmetic.notes
    built = CaffeNet(graph)
    assert {b: arithmetic.blobs[b] for b in built.blob_shapes} == {b: tuple(s) for b, s in built.blob_shapes.items()}
    for module_name, module in built.layers.items():
        layer = built.layer_names[module_name]
        assert arithmetic.params[layer] == [tuple(t.shape) for t in caffe_blobs(module)], layer


@pytest.mark.parametrize("layer, message", [
    ('type: "Reshape" bottom: "x" reshape_param { num_axes: -2 }', "num_axes must be >= 0, or -1 for all, got -2"),
    ('type: "Reshape" bottom: "x" reshape_param { shape { dim: 0 dim: 0 dim: 0 } axis: 1 }', "copies (0) axis 3"),
    ('type: "Reshape" bottom: "x" reshape_param { shape { dim: -2 dim: 3 } }',
     "a negative dimension other than -1"),
    ('type: "Convolution" bottom: "x" convolution_param { num_output: 1 kernel_size: 1 kernel_h: 1 kernel_w: 1 '
     'axis: 0 }',
     "give either kernel_size or kernel_h/kernel_w, not both"),
    ('type: "Convolution" bottom: "x" convolution_param { num_output: 1 kernel_h: 1 kernel_w: 1 }',
     "kernel_h & kernel_w can only be used for 2-D convolution"),
    ('type: "Convolution" bottom: "x" convolution_param { num_output: 1 kernel_size: 5 }',
     "kernel (5,) (dilation (1,), pad (0,), stride (1,)) does not fit the (4,) input"),
    ('type: "Flatten" bottom: "x" flatten_param { axis: 2 end_axis: 0 }', "end_axis 0 comes before axis 2"),
    ('type: "Slice" bottom: "x" slice_param { axis: 1 slice_dim: 1 }', "give either axis or slice_dim, not both"),
    ('type: "Slice" bottom: "x" slice_param { slice_dim: 1 slice_point: 0 } top: "z"',
     "slice_point [0] must increase strictly"),
    ('type: "Concat" bottom: "x" concat_param { concat_dim: 3 }',
     "concat_dim 3 is out of range for a bottom of rank 3"),
    ('type: "Pooling" bottom: "x4" pooling_param { kernel_size: 2 pad: 2 }',
     "pad (2, 2) must be smaller than the kernel (2, 2)"),
    ('type: "DummyData" dummy_data_param { num: 1 channels: 2 shape { dim: 2 } }',
     "give either shape or the legacy num/channels/height/width, not both"),
])
def test_inspect_notes_a_bad_parameter_as_the_builder_refuses_it(tmp_path, layer, message):
    from caffe_compat.errors import CaffeCompatError
    from caffe_compat.net import CaffeNet

    net = tmp_path / "net.prototxt"
    net.write_text(textwrap.dedent("""
        layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
        layer { name: "x4" type: "Input" top: "x4" input_param { shape { dim: 1 dim: 1 dim: 3 dim: 4 } } }
    """) + f'layer {{ name: "r" {layer} top: "y" }}\n')
    net_file = read_net(net)
    graph = build_graph(net_file.net, "TEST", net_file.dialect)
    arithmetic = net_shapes(graph)
    with pytest.raises(CaffeCompatError) as err:
        CaffeNet(graph)
    assert f"layer 'r' ({layer.split()[1][1:-1]})" in str(err.value) and message in str(err.value)
    assert arithmetic.blobs["y"] is None and arithmetic.notes == [str(err.value)]
