"""The layer registry: one entry per Caffe type, duplicates refused, unknown types named,
and the torch-free catalog equal to what the family modules register."""
import textwrap

import pytest
from torch import nn

from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers import REGISTRY, builder_for, register, register_onnx
from caffe_compat.layers import registry
from caffe_compat.layers.catalog import CATALOG, FAMILIES

from conftest import run_python

EXPECTED_TYPES = {
    "Convolution", "Deconvolution", "Pooling", "LRN", "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power",
    "Exp", "Log", "BNLL", "Threshold", "Dropout", "InnerProduct", "Concat", "Slice", "Split", "Flatten", "Reshape",
    "Crop", "Eltwise", "BatchNorm", "Scale", "Bias", "Softmax", "Reduction", "MVN", "Tile", "ArgMax", "Accuracy",
    "Silence", "Embed", "SoftmaxWithLoss", "EuclideanLoss", "ContrastiveLoss", "SigmoidCrossEntropyLoss",
    "HingeLoss", "MultinomialLogisticLoss", "LiftedStructSimilaritySoftmaxLoss", "Data", "ImageData",
}
PACKAGE = "caffe_compat.layers."


def registered_families():
    """family -> {type: has an emitter}, from what the package's modules register."""
    registry.load_all()
    found = {}
    for layer_type, entry in registry.REGISTRY._entries.items():
        modules = {fn.__module__ for fn in (entry.build, entry.to_onnx) if fn is not None}
        family = min(modules)
        if not family.startswith(PACKAGE):
            continue  # a type some test registered
        found.setdefault(family[len(PACKAGE):], {})[layer_type] = entry.to_onnx is not None
    return found


def catalog_fixes(registered, catalog):
    """The edits that make `catalog` (FAMILIES) equal to `registered`, one line each."""
    where = "caffe_compat/layers/catalog.py FAMILIES"
    have = {t: (f, o) for f, types in catalog.items() for t, o in types.items()}
    want = {t: (f, o) for f, types in registered.items() for t, o in types.items()}
    fixes = []
    for layer_type in sorted(set(want) | set(have)):
        if layer_type not in have:
            family, onnx = want[layer_type]
            fixes.append(f'add to {where}["{family}"]: "{layer_type}": {onnx},')
        elif layer_type not in want:
            fixes.append(f'remove "{layer_type}" from {where}["{have[layer_type][0]}"] (nothing registers it)')
        elif have[layer_type] != want[layer_type]:
            family, onnx = want[layer_type]
            fixes.append(f'change "{layer_type}" in {where} to FAMILIES["{family}"]["{layer_type}"] = {onnx} '
                         f'(now {have[layer_type]})')
    return fixes


def test_the_catalog_is_what_the_family_modules_register():
    fixes = catalog_fixes(registered_families(), FAMILIES)
    assert not fixes, "the layer catalog is out of date:\n" + "\n".join(fixes)


def test_catalog_fixes_name_each_edit():
    registered = {"activation": {"ReLU": True, "Swish": False}, "loss": {"HingeLoss": False}}
    catalog = {"activation": {"ReLU": False}, "loss": {"HingeLoss": False, "Gone": False}}
    assert catalog_fixes(registered, catalog) == [
        'remove "Gone" from caffe_compat/layers/catalog.py FAMILIES["loss"] (nothing registers it)',
        'change "ReLU" in caffe_compat/layers/catalog.py FAMILIES to FAMILIES["activation"]["ReLU"] = True '
        "(now ('activation', False))",
        'add to caffe_compat/layers/catalog.py FAMILIES["activation"]: "Swish": False,',
    ]


def test_every_documented_type_has_a_builder():
    missing = sorted(t for t in EXPECTED_TYPES if t not in REGISTRY or REGISTRY[t].build is None)
    assert not missing
    assert EXPECTED_TYPES <= set(CATALOG)


def test_a_second_builder_or_emitter_is_refused():
    with pytest.raises(ValueError, match="a builder for Caffe type 'ReLU' is already registered"):
        register("ReLU")(lambda ctx: None)
    with pytest.raises(ValueError, match="an ONNX emitter for Caffe type 'ReLU' is already registered"):
        register_onnx("ReLU")(lambda *args: None)


def test_unknown_type_names_layer_type_and_how_to_register():
    with pytest.raises(CaffeCompatError, match=r"layer 'mine': unknown layer type 'MyLayer'.*register\('MyLayer'\)"):
        builder_for("mine", "MyLayer")


def test_a_new_type_can_be_registered(monkeypatch):
    monkeypatch.setattr(registry.REGISTRY, "_entries", dict(registry.REGISTRY._entries))

    @register("Doubler")
    def build_doubler(ctx):
        class Doubler(nn.Module):
            def forward(self, x):
                return 2 * x
        return ctx.wire(Doubler())

    assert builder_for("d", "Doubler") is build_doubler
    assert REGISTRY["Doubler"].to_onnx is None


def test_families_load_on_first_lookup_and_duplicates_are_refused_before_they_load():
    # A fresh interpreter: nothing registered yet.
    code = textwrap.dedent("""
        import sys
        from caffe_compat.layers import builder_for, register
        assert "caffe_compat.layers.softmax" not in sys.modules
        assert builder_for("s", "Softmax").__module__ == "caffe_compat.layers.softmax"
        assert "caffe_compat.layers.loss" not in sys.modules
        try:
            register("HingeLoss")(lambda ctx: None)  # its family has not loaded yet
        except ValueError as err:
            print(err)
    """)
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "a builder for Caffe type 'HingeLoss' is already registered (caffe_compat.layers.loss." in result.stdout
