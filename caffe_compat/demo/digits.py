"""The demo's data: scikit-learn's bundled handwritten digits (1,797 scans of 8x8 pixels,
read from the installed package, nothing downloaded), made harder and split as the
paper splits its datasets.

Each 8x8 digit is enlarged to 20x20 and drawn at a random place, with a random contrast,
on a 28x28 canvas of Gaussian noise over a random background level, so that an embedder
has to learn where the digit is and what it is whatever the lighting: random
convolutional weights no longer separate the classes almost perfectly, as they do on
clean centred digits (Recall@1 0.98 there with real Caffe, before any training). The
lighting is what lets the demo show the paper's point on classes never trained on:
random weights measure brightness and contrast as much as shape, and the invariance
training learns from 0-4 carries over to 5-9 (Recall@1 on 5-9 +12 to +15 points over
three seeds). With place and noise alone, training improved 0-4 but left the unseen
classes within a few points of random weights (5-9: 82.8 -> 81.4; -1 to +4 points with
more noise, a smaller digit, a wider embedding at a lower learning rate, or training on
0-6 to retrieve 7-9).

The paper's protocol: train on some classes (0-4), retrieve among classes never seen in
training (5-9). Beside it, held-out images of the training classes show what training
did to those classes themselves. The training LMDB has the paper's layout: consecutive
records are same-class pairs, so a batch of B images holds B/2 pairs; each pass over
the training images draws them at fresh places with fresh noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from ..errors import CaffeCompatError

CANVAS = 28
DIGIT = 20
NOISE_STD = 40.0
CONTRAST_MIN = 0.3  # the digit's strokes are scaled by a factor drawn from [CONTRAST_MIN, 1)
BACKGROUND_MAX = 100.0  # the noise sits on a level drawn from [0, BACKGROUND_MAX)
TRAIN_CLASSES = (0, 1, 2, 3, 4)
HELD_OUT_FRACTION = 1 / 3


@dataclass(frozen=True)
class DigitSplits:
    digits: np.ndarray  # (n, DIGIT, DIGIT) float32, the enlarged clean digits, 0-255
    labels: np.ndarray  # (n,) int64
    train: np.ndarray  # indices: images of the training classes used for training
    held_out: np.ndarray  # indices: other images of the training classes
    unseen: np.ndarray  # indices: every image of the classes never trained on


def load_splits(seed: int = 0) -> DigitSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CaffeCompatError("the demo's dataset comes with scikit-learn: pip install 'caffe-compat[all]' "
                               "(or pip install scikit-learn)") from None
    from PIL import Image

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    digits = np.stack([
        np.asarray(Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((DIGIT, DIGIT), Image.BILINEAR))
        for image in bunch.images]).astype(np.float32)
    rng = np.random.default_rng(seed)
    seen = np.flatnonzero(np.isin(labels, TRAIN_CLASSES))
    shuffled = rng.permutation(seen)
    cut = int(round(len(shuffled) * HELD_OUT_FRACTION))
    return DigitSplits(digits, labels, train=np.sort(shuffled[cut:]), held_out=np.sort(shuffled[:cut]),
                       unseen=np.flatnonzero(~np.isin(labels, TRAIN_CLASSES)))


def render(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 1 x 28 x 28 uint8 image: the digit at a random place and contrast on fresh noise
    over a random background level."""
    canvas = rng.normal(0.0, NOISE_STD, (CANVAS, CANVAS)).astype(np.float32)
    canvas += rng.uniform(0.0, BACKGROUND_MAX)
    top, left = rng.integers(0, CANVAS - DIGIT + 1, size=2)
    canvas[top:top + DIGIT, left:left + DIGIT] += digit * rng.uniform(CONTRAST_MIN, 1.0)
    return np.clip(canvas, 0, 255).astype(np.uint8)[None]


def rendered(splits: DigitSplits, indices: np.ndarray, seed: int) -> List[Tuple[np.ndarray, int]]:
    """(image, label) records of `indices` in index order, each drawn once."""
    rng = np.random.default_rng(seed)
    return [(render(splits.digits[i], rng), int(splits.labels[i])) for i in indices]


def pair_records(splits: DigitSplits, records_wanted: int, seed: int) -> List[Tuple[np.ndarray, int]]:
    """Training records in the paper's layout: same-class pairs one after the other, the
    pairs in random class order. Whole passes over the training images (fresh pairs,
    places and noise each pass) until `records_wanted` are there."""
    rng = np.random.default_rng(seed)
    labels = splits.labels[splits.train]
    records: List[Tuple[np.ndarray, int]] = []
    while len(records) < records_wanted:
        pairs = []
        for c in np.unique(labels):
            members = rng.permutation(splits.train[labels == c])
            pairs += [(members[i], members[i + 1]) for i in range(0, len(members) - 1, 2)]
        for p in rng.permutation(len(pairs)):
            for index in pairs[p]:
                records.append((render(splits.digits[index], rng), int(splits.labels[index])))
    return records

