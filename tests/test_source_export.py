"""`convert NET WEIGHTS -o model.py`: standalone PyTorch source that needs only torch and
gives the CaffeNet's numbers to the bit (its LRN is the PyTorch form, so the CaffeNet is
run with that form too; against the C kernel see test_lrn_against_the_c_kernel)."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.cli.main import main
from caffe_compat.layers import lrn
from caffe_compat.loading import load_net

from conftest import PAPER_MODEL, REFERENCE, require, run_python

LAYER_CASES = ["concat", "conv_1x1_stride", "conv_basic", "conv_group_dilation", "deconv", "inplace_chain",
               "ip_axis", "lifted_margin_half_far", "lifted_multi_pos_m32_d16", "lifted_pairs_m128_d64",
               "lrn_across", "lrn_within", "pointwise", "pool_ave_pad", "pool_clip_rule", "pool_global",
               "pool_max_ceil", "pool_max_pad", "pool_rect", "prelu", "relu_leaky", "shape_ops", "softmax",
               "threshold", "batchnorm_scale", "crop", "eltwise", "reduction_misc", "scale_bias_bottoms",
               "accuracy", "argmax", "contrastive_loss", "euclidean_loss", "ip_transpose", "softmax_loss"]
EXTRACT = PAPER_MODEL / "extract_googlenet_ebay_feature_embed64.prototxt"
TRAIN_VAL = PAPER_MODEL / "train_val_googlenet_finetune_liftedstructsim_softmax_pair_m128_multilabel_embed64.prototxt"
DOCS_MODEL = Path(__file__).resolve().parents[1] / "docs" / "paper_embedder_model.py"

# Runs generated files where caffe_compat cannot be imported: off sys.path, and refused by
# a finder ahead of the editable install's. Args: triples MODEL.py INPUTS.pt OUTPUTS.pt.
DRIVER = """
import importlib.abc, importlib.util, sys
from pathlib import Path

class Refused(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("caffe_compat", "converters"):
            raise ImportError("the generated file imports " + name)

sys.meta_path.insert(0, Refused())
# A checkout leaves sys.path; an installed copy shares site-packages with torch, so the
# finder above refuses it there.
sys.path = [p for p in sys.path
            if not (Path(p or ".") / "caffe_compat").exists() or (Path(p or ".") / "torch").exists()]
import torch

args = sys.argv[1:]
for model_path, inputs_path, outputs_path in zip(args[0::3], args[1::3], args[2::3]):
    spec = importlib.util.spec_from_file_location(Path(model_path).stem, model_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load()
    with torch.no_grad():
        out = model(*torch.load(inputs_path, weights_only=True))
    out = out if isinstance(out, tuple) else (out,)
    torch.save(dict(zip(module.OUTPUTS, out)), outputs_path)
print(sorted(n for n in sys.modules if n.partition(".")[0] not in ("torch", "numpy")
             and n.partition(".")[0] in ("caffe_compat", "converters", "safetensors", "onnx")))
"""


def convert(*args) -> None:
    assert main(["convert", *map(str, args)]) == 0


def import_file(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases():
    """(name, prototxt, weights or None, CLI options, inputs) of every covered net."""
    cases = []
    for stem in [REFERENCE / "nets" / "googlenet_deploy", REFERENCE / "nets" / "v1_legacy" / "v1"] + \
            [REFERENCE / "layers" / name for name in LAYER_CASES]:
        proto, weights = require(stem.with_suffix(".prototxt")), require(stem.with_suffix(".caffemodel"))
        ref = np.load(stem.with_suffix(".npz"))
        net = load_net(proto, weights)
        inputs = [torch.from_numpy(ref[f"input/{name}"]) for name in net.input_names]
        cases.append((stem.name, proto, weights, [], inputs))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 227, 227, generator=generator) * 255
    cases.append(("paper_extract", require(EXTRACT), None, ["--random-init"], [images[:2]]))
    cases.append(("paper_train", require(TRAIN_VAL), None,
                  ["--random-init", "--phase", "TRAIN", "--input-shape", "data=4,3,227,227",
                   "--input-shape", "label=4"], [images, torch.tensor([0.0, 1.0, 0.0, 1.0])]))
    return cases


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Every covered net converted and run by its generated file in a Python without caffe_compat:
    (their folder, {name: (prototxt, weights, options, inputs, outputs by name)})."""
    tmp = tmp_path_factory.mktemp("source")
    cases, args = {}, []
    for name, proto, weights, options, inputs in _cases():
        model = tmp / f"{name}.py"
        convert(proto, *([weights] if weights else []), *options, "-o", model)
        torch.save(inputs, tmp / f"{name}.inputs.pt")
        args += [model, tmp / f"{name}.inputs.pt", tmp / f"{name}.outputs.pt"]
        cases[name] = (proto, weights, options, inputs)
    result = run_python(DRIVER, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # nothing but torch (and the standard library) was imported
    return tmp, {name: (*case, torch.load(tmp / f"{name}.outputs.pt", weights_only=True))
                 for name, case in cases.items()}


def _caffenet(proto, weights, options):
    phase = "TRAIN" if "TRAIN" in options else "TEST"
    shapes = {o.split("=")[0]: tuple(int(d) for d in o.split("=")[1].split(","))
              for o in options if "=" in o}
    torch.manual_seed(0)  # --random-init's seed: the same fillers
    # unfolded: the standalone form's numbers
    net = load_net(proto, weights, phase=phase, input_shapes=shapes or None, fold=False)
    return net.eval()


def test_outputs_equal_the_caffenets_to_the_bit(generated, monkeypatch):
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)  # the PyTorch LRN, as the generated file's
    for name, (proto, weights, options, inputs, outputs) in generated[1].items():
        net = _caffenet(proto, weights, options)
        with torch.no_grad():
            expected = net(*inputs)
        assert list(outputs) == list(net.output_names), name
        for blob, value in outputs.items():
            assert torch.equal(value, expected[blob]), f"{name}: {blob}"


def test_lrn_against_the_c_kernel(generated):
    """The C kernel (the CaffeNet's on CPU) rounds differently: within 1e-6 relative of it."""
    proto, weights, options, inputs, outputs = generated[1]["lrn_across"]
    kernel = load_net(proto, weights).eval()(*inputs)["lrn"]
    assert lrn._kernel_applies(inputs[0], 5)  # the fixture's local_size
    assert (outputs["lrn"] - kernel).abs().max() <= 1e-6 * kernel.abs().max()


@pytest.mark.parametrize("case", ["inplace_chain", "conv_group_dilation", "pool_ave_pad", "deconv", "prelu",
                                  "batchnorm_scale", "softmax_loss", "contrastive_loss", "ip_transpose"])
def test_gradients_equal_the_caffenets(tmp_path, case):
    stem = REFERENCE / "layers" / case
    proto, weights = stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel")
    convert(proto, weights, "-o", tmp_path / "model.py")
    model = import_file(tmp_path / "model.py").load()
    net = load_net(proto, weights).eval()
    ref = np.load(stem.with_suffix(".npz"))
    inputs = [torch.from_numpy(ref[f"input/{n}"]).requires_grad_() for n in net.input_names]
    twins = [x.detach().clone().requires_grad_() for x in inputs]
    ours = model(*twins)
    expected = net(*inputs)
    for (blob, value), top in zip(expected.items(), ours if isinstance(ours, tuple) else (ours,)):
        key = f"topdiff/{blob}"
        diff = torch.from_numpy(ref[key]) if key in ref else torch.ones_like(value)  # a loss: its weight, 1
        value.backward(diff, retain_graph=True)
        top.backward(diff, retain_graph=True)
    for a, b in zip(inputs, twins):  # labels get no gradient on either side
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    theirs = {name: p.grad for name, p in net.named_parameters()}
    mine = {name: p.grad for name, p in model.named_parameters()}
    assert len(mine) == len(theirs)
    for name, grad in mine.items():
        layer, attr = name.rsplit(".", 1)
        assert torch.equal(grad, theirs[f"layers.{layer}.{attr}"]), name


@pytest.mark.parametrize("case", ["lifted_pairs_m128_d64", "lifted_multi_pos_m32_d16", "lifted_margin_half_far"])
def test_lifted_loss_gradient_is_caffes(tmp_path, case):
    """The file's lifted loss is differentiated by autograd, not the package's hand-written
    backward: its gradient meets the fixtures' gradient tolerance against Caffe's (1e-4 relative)."""
    stem = REFERENCE / "layers" / case
    convert(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel"), "-o", tmp_path / "model.py")
    module = import_file(tmp_path / "model.py")
    ref = np.load(stem.with_suffix(".npz"))
    embeddings, labels = (torch.from_numpy(ref[f"input/{name}"]) for name in module.INPUTS)
    embeddings.requires_grad_()
    module.load()(embeddings, labels).backward()
    caffe = torch.from_numpy(ref[f"diff/{module.INPUTS[0]}"])
    assert (embeddings.grad - caffe).abs().max() <= 1e-4 * caffe.abs().max()


def test_files_are_pyflakes_clean_short_and_import_only_torch(generated):
    files = sorted(generated[0].glob("*.py"))
    for path in files:
        text = path.read_text()
        assert max(len(line) for line in text.splitlines()) <= 120, path.name
        imports = {line for line in text.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"from pathlib import Path", "import torch", "import torch.nn.functional as F",
                           "from torch import nn"}, path.name
    if importlib.util.find_spec("pyflakes") is not None:
        command = [sys.executable, "-m", "pyflakes"]
    elif shutil.which("pyflakes"):
        command = [shutil.which("pyflakes")]
    else:
        pytest.skip("pyflakes is not installed")
    result = subprocess.run(command + [str(path) for path in files], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout, result.stdout


def test_same_inputs_give_the_same_bytes(tmp_path):
    stem = REFERENCE / "nets" / "googlenet_deploy"
    proto, weights = stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel")
    convert(proto, weights, "-o", tmp_path / "a.py")
    convert(proto, weights, "-o", tmp_path / "b.py")
    text = (tmp_path / "a.py").read_text()
    assert text == (tmp_path / "b.py").read_text()
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
    assert "self.inception_3a_1x1 = nn.Conv2d(192, 64, 1)" in text


def test_docs_example_is_what_convert_writes(tmp_path):
    """docs/paper_embedder_model.py: the paper's 64-d embedder, --random-init --seed 0."""
    convert(EXTRACT, "--random-init", "--seed", "0", "-o", tmp_path / "paper_embedder_model.py")
    assert (tmp_path / "paper_embedder_model.py").read_text() == DOCS_MODEL.read_text()


def test_torch_compile_runs_the_generated_module(tmp_path):
    stem = REFERENCE / "layers" / "pool_clip_rule"
    convert(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel"), "-o", tmp_path / "model.py")
    model = import_file(tmp_path / "model.py").load()
    x = torch.from_numpy(np.load(stem.with_suffix(".npz"))["input/data"])
    assert torch.equal(torch.compile(model)(x), model(x))  # MAX pooling: exact whatever the kernel


def test_model_file_converts_to_source(tmp_path):
    """convert MODEL.pt -o model.py: the model's net and weights, its preprocessing in the header."""
    stem = REFERENCE / "layers" / "conv_basic"
    convert(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel"), "--mean-value", "104", "117", "123",
            "-o", tmp_path / "conv.pt")
    convert(tmp_path / "conv.pt", "-o", tmp_path / "model.py")
    module = import_file(tmp_path / "model.py")
    assert "# model conv.pt (sha256" in (tmp_path / "model.py").read_text()
    assert "mean 104.0,117.0,123.0 (mean_value)" in (tmp_path / "model.py").read_text()
    x = torch.from_numpy(np.load(stem.with_suffix(".npz"))["input/data"])
    expected = load_net(stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel")).eval()(x)["conv"]
    assert torch.equal(module.load()(x), expected)


def test_weights_never_overwrite_an_input(tmp_path, capsys):
    stem = REFERENCE / "layers" / "conv_basic"
    weights = tmp_path / "model.pth"
    shutil.copy(stem.with_suffix(".caffemodel"), weights)
    assert main(["convert", str(stem.with_suffix(".prototxt")), str(weights), "-o", str(tmp_path / "model.py")]) == 2
    assert "the conversion reads it" in capsys.readouterr().err
    assert weights.read_bytes() == stem.with_suffix(".caffemodel").read_bytes()
    assert not (tmp_path / "model.py").exists()


def test_layer_without_source_form_is_refused_in_one_line(tmp_path):
    """A user-registered type has no source emitter: refused, naming the layer and its type, nothing written."""
    (tmp_path / "net.prototxt").write_text(
        'name: "custom"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
        'layer { name: "mine" type: "MyOwnType" bottom: "data" top: "out" }\n')
    code = (
        "import sys\n"
        "from caffe_compat.layers import register\n"
        "from caffe_compat.layers.activation import Sigmoid\n"
        "register('MyOwnType')(lambda ctx: ctx.wire(Sigmoid()))\n"
        "from caffe_compat.cli.main import main\n"
        "sys.exit(main(['convert', 'net.prototxt', '--random-init', '-o', 'model.py']))\n")
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "layer 'mine' (MyOwnType)" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


def test_long_statements_wrap_inside_brackets():
    """A Split into many long-named tops: both sides bracketed, broken after commas, within 120 columns."""
    from caffe_compat.converters.source import wrap

    tops = ", ".join(f"inception_{i}_split_output" for i in range(8))
    lines = wrap(f"{tops} = {', '.join(['pool2_3x3_s2'] * 8)}", " " * 8)
    assert len(lines) > 1 and max(map(len, lines)) <= 120
    namespace = {}
    exec(compile("def split(pool2_3x3_s2):\n" + "\n".join(lines) + "\n        return inception_7_split_output",
                 "generated", "exec"), namespace)
    assert namespace["split"](5) == 5


SIAMESE = """name: "siamese"
layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "a" top: "fa" param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "b" top: "fb" param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


def test_shared_parameters_stay_shared(tmp_path):
    (tmp_path / "net.prototxt").write_text(SIAMESE)
    convert(tmp_path / "net.prototxt", "--random-init", "-o", tmp_path / "model.py")
    model = import_file(tmp_path / "model.py").load()
    assert model.ip_b.weight is model.ip_a.weight and model.ip_b.bias is model.ip_a.bias
    net = _caffenet(tmp_path / "net.prototxt", None, ["--random-init"])
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    expected = net(a, b)
    assert all(torch.equal(x, expected[name]) for x, name in zip(model(a, b), ("fa", "fb")))


MORE_TYPES = """name: "more"
layer { name: "ids" type: "Input" top: "ids" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "embed" type: "Embed" bottom: "ids" top: "e"
        embed_param { num_output: 5 input_dim: 10 weight_filler { type: "gaussian" }
                      bias_filler { type: "gaussian" } } }
layer { name: "clip" type: "Clip" bottom: "x" top: "c" clip_param { min: -0.5 max: 0.7 } }
layer { name: "swish" type: "Swish" bottom: "x" top: "s" swish_param { beta: 1.5 } }
"""


def test_embed_clip_swish_equal_the_caffenets(tmp_path):
    (tmp_path / "net.prototxt").write_text(MORE_TYPES)
    convert(tmp_path / "net.prototxt", "--random-init", "-o", tmp_path / "model.py")
    model = import_file(tmp_path / "model.py").load()
    net = _caffenet(tmp_path / "net.prototxt", None, ["--random-init"])
    ids = torch.tensor([[0.0, 9.0, 3.7], [1.0, 2.0, 5.0], [8.0, 8.0, 0.2], [4.0, 6.0, 7.0]])
    x = torch.randn(4, 6)
    x[0, 0] = float("nan")
    expected = net(ids, x)
    for value, name in zip(model(ids, x), ("e", "c", "s")):  # bit for bit, the NaN that Swish passes on too
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, equal_nan=True)
