"""The paper's released prototxts convert as they are, with no dataset on disk: their
data layers, whose sources exist only on the authors' machines, become inputs, and
the nets equal the project's own definition of them (caffe_compat.evaluation.recipes) given the
same weights. `convert --random-init` gives seeded filler weights to nets without a
caffemodel."""
import warnings

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.cli.main import main
from caffe_compat.converters.artifact import load as load_artifact
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io.files import NetFile, read_caffemodel, weights_of
from caffe_compat.io.schema import messages
from caffe_compat.loading import load_net
from caffe_compat.evaluation.recipes import paper_net
from conftest import PAPER_MODEL, require, run_cli

PAPER = PAPER_MODEL
EXTRACT = "extract_googlenet_ebay_feature_embed64.prototxt"
TRAIN_VAL = "train_val_googlenet_finetune_liftedstructsim_softmax_pair_m128_multilabel_embed64.prototxt"
SMALL = {"data": (2, 3, 227, 227)}


def paper_file(name: str):
    return require(PAPER / name)


def recipe(phase: str) -> NetFile:
    return NetFile(paper_net(64, phase), "lifted", PAPER / f"recipe_{phase}.prototxt")


@pytest.fixture(scope="module")
def weights():
    """The paper net's filler weights, seeded: the ImageNet-trained ones are not here."""
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="is absent"):
        return load_net(recipe("TEST"), input_shapes=SMALL).caffe_weights()


def test_the_extract_net_builds_without_its_data(weights):
    with pytest.warns(UserWarning) as caught:
        net = load_net(paper_file(EXTRACT))
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and "'/cvgl/u/hsong/ebay/cache/validation_set_cars196.lmdb' is absent" in notes[0]
    assert "'data' 26x3x227x227" in notes[0]
    assert net.input_names == ["data"]
    assert net.blob_shapes["data"] == (26, 3, 227, 227)
    assert net.blob_shapes["pool5/7x7_s1"] == (26, 1024, 1, 1)
    assert net.blob_shapes["fc_embedding"] == (26, 64)
    assert net.output_names == ["fc_embedding"]
    assert sum(a.size for arrays in net.caffe_weights().values() for a in arrays) == 6_039_152


def test_the_train_val_net_takes_images_and_labels_in_train(weights):
    with pytest.warns(UserWarning, match=r"the TRAIN net takes inputs instead: 'data' 128x3x227x227, 'label' 128"):
        net = load_net(paper_file(TRAIN_VAL), phase="TRAIN")
    assert net.input_names == ["data", "label"]
    assert net.blob_shapes["label"] == (128,)
    assert net.loss_terms == [("loss", 1.0)]


def test_the_extract_net_equals_the_recipe_net(weights):
    with pytest.warns(UserWarning, match="is absent"):
        theirs = load_net(paper_file(EXTRACT), input_shapes=SMALL, allow_missing_weights=False)
    theirs.load_caffe_weights(weights)
    with pytest.warns(UserWarning, match="is absent"):
        ours = load_net(recipe("TEST"), input_shapes=SMALL)
    ours.load_caffe_weights(weights)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 227, 227) * 255 - 120
    with torch.no_grad():
        expected = ours(images)["fc_embedding"]
        assert torch.equal(theirs(images)["fc_embedding"], expected)
    assert expected.abs().max() > 0  # random weights still give a non-trivial embedding


def test_the_train_val_loss_equals_the_recipe_loss(weights):
    shapes = {"data": (4, 3, 227, 227), "label": (4,)}
    nets = []
    for source in (paper_file(TRAIN_VAL), recipe("TRAIN")):
        with pytest.warns(UserWarning, match="is absent"):
            nets.append(load_net(source, phase="TRAIN", input_shapes=shapes))
        nets[-1].load_caffe_weights(weights)
        nets[-1].eval()  # no dropout: the same numbers from both
    torch.manual_seed(1)
    images, labels = torch.rand(4, 3, 227, 227) * 255 - 120, torch.tensor([0.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        losses = [net(images, labels)["loss"] for net in nets]
    assert losses[0].shape == () and losses[0] > 0 and torch.equal(losses[0], losses[1])


def test_convert_random_init_then_convert_the_paper_file(tmp_path, weights):
    extract = paper_file(EXTRACT)
    random_weights, model = tmp_path / "W.caffemodel", tmp_path / "m.pt"
    with pytest.warns(UserWarning, match="is absent"):
        assert main(["convert", str(extract), "--random-init", "--seed", "5", "-o", str(random_weights)]) == 0
    result = run_cli("convert", extract, random_weights, "-o", model, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"caffe-compat: warning: {extract}: layer 'data' (Data): data_param.source "
        f"'/cvgl/u/hsong/ebay/cache/validation_set_cars196.lmdb' is absent; the TEST net takes an input "
        f"instead: 'data' 26x3x227x227",
        "caffe-compat: warning: mean file /cvgl/u/hsong/cache/imagenet_mean.binaryproto: not readable here, so no "
        "mean is recorded; give --mean-value B G R (or --mean-file MEAN.binaryproto)"]
    converted = load_artifact(model).eval()
    with pytest.warns(UserWarning, match="is absent"):
        ours = load_net(recipe("TEST"), input_shapes=SMALL)
    ours.load_caffe_weights(weights_of(read_caffemodel(random_weights)))
    images = torch.rand(2, 3, 227, 227) * 255 - 120  # the converted net takes any batch size
    with torch.no_grad():
        assert torch.equal(converted(images)["fc_embedding"], ours.eval()(images)["fc_embedding"])


# ---------------------------------------------------------------- random init and its errors

SMALL_NET = """
name: "small"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 6 } data_param { source: "nowhere.lmdb" batch_size: 4 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 6 } data_param { source: "nowhere_test.lmdb" batch_size: 2 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_random_init_is_seeded(tmp_path):
    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(SMALL_NET)

    def weights_with(*seed):
        out = tmp_path / f"w{'_'.join(seed)}.caffemodel"
        with pytest.warns(UserWarning, match="is absent"):
            assert main(["convert", str(prototxt), "--random-init", *(("--seed",) + seed if seed else ()),
                         "-o", str(out)]) == 0
        return weights_of(read_caffemodel(out))["ip"][0]

    assert np.array_equal(weights_with(), weights_with("0"))
    assert not np.array_equal(weights_with("0"), weights_with("1"))
    assert weights_with("1").std() > 0.5  # the prototxt's gaussian filler, std 1


def test_convert_without_weights_suggests_random_init(tmp_path, capsys):
    prototxt = tmp_path / "small.prototxt"
    prototxt.write_text(SMALL_NET)
    assert main(["convert", str(prototxt), "-o", str(tmp_path / "m.pt")]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "--random-init" in stderr


def parsed(text: str):
    net = messages("bvlc").NetParameter()
    text_format.Parse(text, net)
    return NetFile(net, "bvlc", "small.prototxt")


def test_in_test_the_label_goes_with_the_layers_that_score_the_net():
    with pytest.warns(UserWarning, match="'nowhere_test.lmdb' is absent"):
        net = load_net(parsed(SMALL_NET))
    assert net.input_names == ["data"] and net.blob_shapes["data"] == (2, 3, 6, 6)
    assert net.output_names == ["ip"]
    with pytest.warns(UserWarning, match="'nowhere.lmdb' is absent"):
        net = load_net(parsed(SMALL_NET), phase="TRAIN", input_shapes={"data": (5, 3, 6, 6), "label": (5,)})
    assert net.input_names == ["data", "label"] and net.blob_shapes["label"] == (5,)
    outputs = net(torch.rand(5, 3, 6, 6), torch.tensor([0.0, 1, 2, 0, 1]))
    assert outputs["loss"].shape == ()


def test_a_size_nothing_gives_must_come_as_an_input_shape():
    text = SMALL_NET.replace("transform_param { crop_size: 6 } data_param { source: \"nowhere_test",
                             "data_param { source: \"nowhere_test")
    with pytest.raises(CaffeCompatError, match=r"layer 'data' \(Data\): its source is absent.*--input-shape data="):
        load_net(parsed(text))
    with pytest.warns(UserWarning, match="'data' 1x3x9x9"):
        assert load_net(parsed(text), input_shapes={"data": (1, 3, 9, 9)}).blob_shapes["ip"] == (1, 3)
    with pytest.raises(CaffeCompatError, match="input shape given for lable"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note on the absent source comes first
        load_net(parsed(SMALL_NET), phase="TRAIN", input_shapes={"lable": (2,)})


def test_an_image_list_without_crop_is_shaped_by_its_new_size():
    text = """
    layer { name: "images" type: "ImageData" top: "data" top: "label"
      image_data_param { source: "absent.txt" batch_size: 3 new_height: 20 new_width: 30 is_color: false } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }"""
    with pytest.warns(UserWarning, match=r"image_data_param.source 'absent.txt' is absent.*'data' 3x1x20x30"):
        assert load_net(parsed(text)).blob_shapes["data"] == (3, 1, 20, 30)


def test_a_present_source_is_still_read(tmp_path, monkeypatch):
    listed = tmp_path / "list.txt"
    listed.write_text("")  # present but empty: the data layer itself reads and refuses it
    monkeypatch.chdir(tmp_path)
    text = """
    layer { name: "images" type: "ImageData" top: "data" top: "label"
      image_data_param { source: "list.txt" batch_size: 3 new_height: 20 new_width: 30 } }"""
    with pytest.raises(CaffeCompatError, match="lists no images"):
        load_net(parsed(text))
