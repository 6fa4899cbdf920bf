"""The paper's protocol end to end on a tiny archive in CUB-200-2011's layout, from
GoogLeNet weights (the reference fixture's random BVLC GoogLeNet stands in for
ImageNet's): prepare, fine-tune, extract, evaluate, compare with the paper."""
import numpy as np
from PIL import Image

from caffe_compat.reproduce import PUBLISHED, reproduce
from conftest import REFERENCE, require


def make_cub(root, classes, per_class):
    cub = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    lines, labels = [], []
    image_id = 0
    for c in classes:
        for i in range(per_class):
            image_id += 1
            name = f"{c:03d}.bird/{i}.jpg"
            (cub / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(rng.normal(c % 200, 20, (60, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(cub / "images" / name)
            lines.append(f"{image_id} {name}\n")
            labels.append(f"{image_id} {c}\n")
    (cub / "images.txt").write_text("".join(lines))
    (cub / "image_class_labels.txt").write_text("".join(labels))
    return root


def test_reproduce_cub_layout(tmp_path, capsys):
    weights = require(REFERENCE / "nets" / "googlenet_deploy.caffemodel")
    source = make_cub(tmp_path / "archive", classes=[1, 2, 101, 102, 103], per_class=4)
    result = reproduce("cub", source, weights, tmp_path / "work", embedding=64, max_iter=1, batch_size=4,
                       extract_batch_size=5)
    assert result["n"] == 12 and result["classes"] == 3  # classes 101-200 are the test split
    assert set(result["recall"]) == {"1", "2", "4", "8"}
    features = np.load(tmp_path / "work" / "features.npz")
    assert features["embeddings"].shape == (12, 64) and np.isfinite(features["embeddings"]).all()
    assert sorted(set(features["labels"].tolist())) == [101, 102, 103]
    assert (tmp_path / "work" / "cub_embed64.caffemodel").exists()
    log = (tmp_path / "work" / "train_log.csv").read_text().splitlines()
    assert log[0] == "iteration,loss,lr,smoothed_loss" and len(log) == 2
    printed = capsys.readouterr().out
    assert f"{PUBLISHED['cub']['recall'][0]:.1f}" in printed and "R@8" in printed
