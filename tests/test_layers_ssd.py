"""The SSD fork's layers (weiliu89/caffe@4817bf8b, branch ssd): Normalize, Permute,
PriorBox, DetectionOutput. The fork's reference cases (tests/fixtures/caffe-reference/
forks/ssd) run as nets; the options those cases leave out are checked against
transcriptions of the fork's C++ loops written here box by box (PriorBox's Forward_cpu,
DetectionOutput's Forward_cpu with bbox_util's DecodeBBox, JaccardOverlap and
ApplyNMSFast), which the vectorized layers must reproduce row for row."""
import glob
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.tools.compare import compare_case
from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers.bbox import libstdcxx_sort
from conftest import REFERENCE, require, run_cli
from layer_harness import build, rel_err

SSD = REFERENCE / "forks" / "ssd"
CASES = sorted(Path(p).stem for p in glob.glob(str(SSD / "*.npz")))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
f32 = np.float32


def ssd_layer(layer_type, params, shapes):
    return build(layer_type, params, shapes, dialect="ssd")


# ---- the fork's own numbers --------------------------------------------------------

def test_every_kind_of_case_is_there():
    kinds = {case.split("_")[0] for case in CASES}
    assert {"normalize", "permute", "priorbox", "detout", "glue", "net"} <= kinds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_fixture_case(case, device):
    folder = require(SSD)
    model = folder / f"{case}.caffemodel"
    rows = compare_case(folder / f"{case}.prototxt", model if model.exists() else None, folder / f"{case}.npz",
                        device=device)
    assert rows and all(r.ok for r in rows), "\n".join(r.format() for r in rows if not r.ok)


def _detection_outputs(case):
    """Each DetectionOutput layer of a case run on the fork's own bottoms: (ours, the fork's top)."""
    from caffe_compat.loading import load_net  # noqa: PLC0415  (heavy)
    ref = np.load(SSD / f"{case}.npz")
    model = SSD / f"{case}.caffemodel"
    net = load_net(SSD / f"{case}.prototxt", model if model.exists() else None)
    outputs = []
    for layer in net.graph.layers:
        if layer.type == "DetectionOutput":
            module = net.layers[net.module_names[layer.name]]
            ours = module(*(torch.from_numpy(ref[f"blob/{b}"]) for b in layer.bottoms))
            outputs.append((ours.numpy(), ref[f"blob/{layer.tops[0]}"]))
    assert outputs
    return outputs


def assert_same_rows(ours, ref):
    """The same rows in the same order: image and label exact, score and box within 1e-6."""
    ours, ref = np.asarray(ours).reshape(-1, 7), np.asarray(ref).reshape(-1, 7)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours[:, :2], ref[:, :2])
    np.testing.assert_allclose(ours[:, 2:], ref[:, 2:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("detout", "net"))])
def test_detection_rows_bit_for_bit(case):
    for ours, ref in _detection_outputs(case):
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)  # the fork's float arithmetic, op for op


def test_compare_cli_passes_every_row(tmp_path):
    result = run_cli("compare", require(SSD), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout and "FAIL" not in result.stdout


# ---- PriorBox against its Forward_cpu, loop by loop --------------------------------

def fork_prior_box(layer_h, layer_w, img_h, img_w, min_sizes, max_sizes=(), ratios=(), flip=True, clip=False,
                   variances=(0.1,), step_h=0.0, step_w=0.0, offset=0.5):
    ars = [f32(1)]
    for r in map(f32, ratios):
        if all(abs(r - a) >= 1e-6 for a in ars):
            ars.append(r)
            if flip:
                ars.append(f32(1.0 / float(r)))
    if not (step_h and step_w):
        step_w, step_h = f32(img_w) / f32(layer_w), f32(img_h) / f32(layer_h)
    step_w, step_h, offset = f32(step_w), f32(step_h), f32(offset)
    out = []

    def box(cx, cy, w, h):
        for v in (cx - float(w) / 2.0) / img_w, (cy - float(h) / 2.0) / img_h, \
                 (cx + float(w) / 2.0) / img_w, (cy + float(h) / 2.0) / img_h:
            out.append(f32(v))

    for h in range(layer_h):
        for w in range(layer_w):
            cx, cy = float((f32(w) + offset) * step_w), float((f32(h) + offset) * step_h)
            for s, min_size in enumerate(min_sizes):
                side = int(f32(min_size))
                box(cx, cy, f32(side), f32(side))
                if max_sizes:
                    root = f32(np.sqrt(float(side * int(f32(max_sizes[s])))))
                    box(cx, cy, root, root)
                for ar in ars:
                    if abs(float(ar) - 1.0) >= 1e-6:
                        box(cx, cy, f32(side) * np.sqrt(ar), f32(side) / np.sqrt(ar))
    boxes = np.array(out, f32)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    variances = np.resize(np.array(variances, f32), boxes.size)
    return np.stack([boxes, variances])[None]


PRIOR_OPTIONS = [
    # (prior_box_param text, fork_prior_box keywords, bottoms' shapes)
    ("min_size: 30 max_size: 60 min_size: 70 max_size: 111.5 aspect_ratio: 2 aspect_ratio: 3 clip: true",
     dict(min_sizes=(30, 70), max_sizes=(60, 111.5), ratios=(2, 3), clip=True), [(1, 1, 5, 7), (1, 3, 90, 120)]),
    ("min_size: 16 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 2.0000001 flip: false variance: 0.2",
     dict(min_sizes=(16,), ratios=(2, 0.5, 2.0000001), flip=False, variances=(0.2,)), [(2, 4, 3, 3), (2, 3, 33, 40)]),
    ("min_size: 21.7 aspect_ratio: 1.7 img_size: 97 step_h: 9.5 step_w: 7.25 offset: 0.25 "
     "variance: 0.1 variance: 0.15 variance: 0.2 variance: 0.25",
     dict(min_sizes=(21.7,), ratios=(1.7,), step_h=9.5, step_w=7.25, offset=0.25, variances=(0.1, 0.15, 0.2, 0.25)),
     [(1, 2, 4, 6)]),
    ("min_size: 40 max_size: 90 step: 12",
     dict(min_sizes=(40,), max_sizes=(90,), step_h=12, step_w=12), [(1, 8, 4), (1, 3, 50)]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params,expected,shapes", PRIOR_OPTIONS)
def test_prior_box_options_bit_for_bit(params, expected, shapes, device):
    _, converted = ssd_layer("PriorBox", f"prior_box_param {{ {params} }}", shapes)
    feature = torch.zeros(shapes[0], device=device)
    image = torch.zeros(shapes[1], device=device) if len(shapes) > 1 else None
    ours = converted.module(feature, image) if image is not None else converted.module(feature)
    layer_h, layer_w = (list(shapes[0][2:]) + [1, 1])[:2]
    img_h, img_w = (97, 97) if "img_size" in params else (list(shapes[1][2:]) + [1, 1])[:2]
    want = fork_prior_box(layer_h, layer_w, img_h, img_w, **expected)
    assert tuple(ours.shape) == want.shape == tuple(converted.top_shapes[0])
    np.testing.assert_array_equal(ours.cpu().numpy(), want)


# ---- DetectionOutput against its Forward_cpu, box by box ---------------------------

def fork_decode(prior, var, loc, code_type, in_target):
    if not in_target:
        scaled = [var[i] * loc[i] for i in range(4)]
    else:
        scaled = list(loc)
    if code_type == "CORNER":
        return [prior[i] + scaled[i] for i in range(4)]
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    if code_type == "CORNER_SIZE":
        return [prior[0] + scaled[0] * pw, prior[1] + scaled[1] * ph, prior[2] + scaled[2] * pw,
                prior[3] + scaled[3] * ph]
    pcx, pcy = (prior[0] + prior[2]) / f32(2), (prior[1] + prior[3]) / f32(2)
    cx, cy = scaled[0] * pw + pcx, scaled[1] * ph + pcy
    w = f32(np.exp(float(scaled[2]))) * pw
    h = f32(np.exp(float(scaled[3]))) * ph
    return [cx - w / f32(2), cy - h / f32(2), cx + w / f32(2), cy + h / f32(2)]


def fork_size(b):
    return f32(0) if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def fork_jaccard(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return f32(0)
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if not (iw > 0 and ih > 0):
        return f32(0)
    inter = iw * ih
    return inter / (fork_size(a) + fork_size(b) - inter)


def fork_detection_output(loc, conf, prior, num_classes, share_location=True, background=0, code_type="CORNER",
                          in_target=False, keep_top_k=-1, threshold=None, nms=0.3, eta=1.0, top_k=-1,
                          sort=libstdcxx_sort):
    num, priors = loc.shape[0], prior.shape[2] // 4
    loc_classes = 1 if share_location else num_classes
    flat = prior.reshape(-1)
    threshold = -np.finfo(f32).max if threshold is None else f32(threshold)
    rows = []
    for n in range(num):
        locs, confs = loc[n].reshape(priors, loc_classes, 4), conf[n].reshape(priors, num_classes)
        decoded = {}
        for c in range(loc_classes):
            label = -1 if share_location else c
            if label != background:
                decoded[label] = [fork_decode(flat[p * 4:p * 4 + 4], flat[(priors + p) * 4:(priors + p) * 4 + 4],
                                              locs[p, c], code_type, in_target) for p in range(priors)]
        indices = {}
        for c in range(num_classes):
            if c == background:
                continue
            boxes = decoded[-1 if share_location else c]
            candidates = sorted((p for p in range(priors) if confs[p, c] > threshold),
                                key=lambda p: -confs[p, c])  # std::stable_sort
            if top_k > -1:
                candidates = candidates[:top_k]
            kept, limit = [], f32(nms)
            for p in candidates:
                keep = all(fork_jaccard(boxes[p], boxes[k]) <= limit for k in kept)
                if keep:
                    kept.append(p)
                if keep and eta < 1 and limit > 0.5:
                    limit = limit * f32(eta)
            indices[c] = kept
        if keep_top_k > -1 and sum(map(len, indices.values())) > keep_top_k:
            pairs = [(confs[p, c], (c, p)) for c in sorted(indices) for p in indices[c]]
            sort(pairs, lambda a, b: a[0] > b[0])  # std::sort (libstdcxx_sort is checked against g++ below)
            indices = {}
            for _, (c, p) in pairs[:keep_top_k]:
                indices.setdefault(c, []).append(p)
        for c in sorted(indices):
            for p in indices[c]:
                rows.append([n, c, confs[p, c], *decoded[-1 if share_location else c][p]])
    if not rows:
        return np.array([[n] + [-1] * 6 for n in range(num)], f32)
    return np.array(rows, f32)


def detection_inputs(num, priors, num_classes, share_location, seed, quantize=None):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.2, 0.8, (priors, 2))
    sizes = rng.uniform(0.05, 0.4, (priors, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).astype(f32)
    variances = np.tile(np.array([0.1, 0.1, 0.2, 0.2], f32), (priors, 1))
    prior = np.stack([boxes.reshape(-1), variances.reshape(-1)])[None].astype(f32)
    loc_classes = 1 if share_location else num_classes
    loc = rng.normal(0, 0.6, (num, priors * loc_classes * 4)).astype(f32)
    conf = rng.uniform(0, 1, (num, priors * num_classes)).astype(f32)
    if quantize:
        conf = (np.round(conf * quantize) / quantize).astype(f32)
    return loc, conf, prior


DETECTION_OPTIONS = [
    # (detection_output_param text beside num_classes and nms_param, fork keywords)
    ("code_type: CORNER", dict(code_type="CORNER")),
    ("code_type: CENTER_SIZE confidence_threshold: 0.3", dict(code_type="CENTER_SIZE", threshold=0.3)),
    ("code_type: CORNER_SIZE", dict(code_type="CORNER_SIZE")),
    ("code_type: CENTER_SIZE variance_encoded_in_target: true", dict(code_type="CENTER_SIZE", in_target=True)),
    ("code_type: CORNER variance_encoded_in_target: true share_location: false",
     dict(code_type="CORNER", in_target=True, share_location=False)),
    ("code_type: CORNER_SIZE share_location: false background_label_id: 2 keep_top_k: 25",
     dict(code_type="CORNER_SIZE", share_location=False, background=2, keep_top_k=25)),
    ("share_location: false background_label_id: -1 code_type: CENTER_SIZE",
     dict(share_location=False, background=-1, code_type="CENTER_SIZE")),
    ("code_type: CENTER_SIZE keep_top_k: 7 confidence_threshold: 0.1", dict(code_type="CENTER_SIZE", keep_top_k=7,
                                                                          threshold=0.1)),
    ("confidence_threshold: 1.5", dict(threshold=1.5)),  # nothing detected: one -1 row per image
]
NMS_OPTIONS = [("", {}), ("nms_threshold: 0.7 eta: 0.8 top_k: 12", dict(nms=0.7, eta=0.8, top_k=12)),
               ("nms_threshold: 0.45 top_k: 5", dict(nms=0.45, top_k=5))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nms_text,nms", NMS_OPTIONS)
@pytest.mark.parametrize("params,fork", DETECTION_OPTIONS)
def test_detection_options_row_for_row(params, fork, nms_text, nms, device):
    num, priors, classes = 3, 30, 4
    loc, conf, prior = detection_inputs(num, priors, classes, fork.get("share_location", True), seed=len(params))
    _, converted = ssd_layer("DetectionOutput", f"detection_output_param {{ num_classes: {classes} {params} "
                                                f"nms_param {{ {nms_text} }} }}", [loc.shape, conf.shape, prior.shape])
    ours = converted.module(*(torch.from_numpy(a).to(device) for a in (loc, conf, prior)))
    want = fork_detection_output(loc, conf, prior, classes, **fork, **nms)
    assert ours.shape[:2] == (1, 1)
    assert_same_rows(ours.cpu().numpy(), want)


def test_adaptive_nms_changes_what_is_kept():
    """eta < 1 lowers the threshold after each kept box while above 0.5: with these boxes
    it keeps fewer than plain NMS at the same threshold (the option is not a no-op)."""
    loc, conf, prior = detection_inputs(1, 60, 2, True, seed=5)
    counts = []
    for eta in (1.0, 0.6):
        _, converted = ssd_layer("DetectionOutput", f"detection_output_param {{ num_classes: 2 "
                                                    f"nms_param {{ nms_threshold: 0.9 eta: {eta} }} }}",
                                 [loc.shape, conf.shape, prior.shape])
        counts.append(converted.module(*map(torch.from_numpy, (loc, conf, prior))).shape[2])
    assert counts[1] < counts[0]


@pytest.mark.parametrize("device", DEVICES)
def test_keep_top_k_among_equal_scores_follows_std_sort(device):
    """Quantized scores tie at the keep_top_k cut and within labels: the rows are those of
    the fork's unstable std::sort, not of a stable one."""
    loc, conf, prior = detection_inputs(2, 40, 3, True, seed=11, quantize=4)
    _, converted = ssd_layer("DetectionOutput", "detection_output_param { num_classes: 3 keep_top_k: 9 "
                                                "nms_param { nms_threshold: 0.8 } }",
                             [loc.shape, conf.shape, prior.shape])
    ours = converted.module(*(torch.from_numpy(a).to(device) for a in (loc, conf, prior))).cpu().numpy()
    want = fork_detection_output(loc, conf, prior, 3, keep_top_k=9, nms=0.8)
    assert_same_rows(ours, want)
    assert len(want) == 18
    # a stable sort chooses or orders differently here, or the case would test nothing
    stable = fork_detection_output(loc, conf, prior, 3, keep_top_k=9, nms=0.8,
                                   sort=lambda items, before: items.sort(key=lambda item: -item[0]))
    assert not np.array_equal(stable, want)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_among_equal_scores_keeps_the_lower_indices(device):
    """Quantized scores tie at the nms top_k cut: the candidates are those of the fork's
    std::stable_sort, equal scores in prior order."""
    loc, conf, prior = detection_inputs(2, 40, 3, True, seed=11, quantize=4)
    _, converted = ssd_layer("DetectionOutput", "detection_output_param { num_classes: 3 "
                                                "nms_param { nms_threshold: 0.8 top_k: 6 } }",
                             [loc.shape, conf.shape, prior.shape])
    ours = converted.module(*(torch.from_numpy(a).to(device) for a in (loc, conf, prior))).cpu().numpy()
    assert_same_rows(ours, fork_detection_output(loc, conf, prior, 3, nms=0.8, top_k=6))


@pytest.mark.parametrize("device", DEVICES)
def test_stable_top_orders_as_a_stable_descending_sort(device):
    """One topk over score-and-index keys ranks as a stable sort by descending score:
    equal scores (-0 and +0 among them) in index order, negatives and infinities in place."""
    from caffe_compat.layers.bbox import stable_top  # noqa: PLC0415
    values = np.array([-np.inf, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 3.0, np.inf], f32)
    scores = torch.from_numpy(np.random.default_rng(3).choice(values, size=(3, 4, 500))).to(device)
    want_scores, want_index = torch.sort(scores, dim=-1, descending=True, stable=True)
    for count in (1, 37, 500):
        ranked, index = stable_top(scores, count)
        assert torch.equal(index, want_index[..., :count])
        assert torch.equal(ranked, want_scores[..., :count])


def _quicksort_killer(n):
    """Scores on which introsort's partitions degrade (McIlroy's adversary, run against
    libstdcxx_sort itself): values are fixed only as the comparisons need them."""
    unset = n
    value, solid, candidate = [unset] * n, [0], [0]

    def before(x, y):
        if value[x] == unset and value[y] == unset:
            value[x if x == candidate[0] else y] = solid[0]
            solid[0] += 1
        if value[x] == unset:
            candidate[0] = x
        elif value[y] == unset:
            candidate[0] = y
        return value[x] < value[y]

    libstdcxx_sort(list(range(n)), before)
    return [-v for v in value]  # scores on which "higher first" decides as `before` did


def test_libstdcxx_sort_matches_gcc(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "needs a C++ compiler (as the LRN kernel needs a C compiler)"
    source = tmp_path / "sort.cpp"
    source.write_text("""#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>
static bool desc(const std::pair<float, int>& a, const std::pair<float, int>& b) { return a.first > b.first; }
int main() {
  int n;
  while (std::scanf("%d", &n) == 1) {
    std::vector<std::pair<float, int> > v(n);
    for (int i = 0; i < n; ++i) { std::scanf("%f", &v[i].first); v[i].second = i; }
    std::sort(v.begin(), v.end(), desc);
    for (int i = 0; i < n; ++i) std::printf("%d ", v[i].second);
    std::printf("\\n");
  }
}
""")
    subprocess.run([compiler, "-O1", "-o", str(tmp_path / "sort"), str(source)], check=True)
    rng = np.random.default_rng(3)
    cases = [list(rng.integers(0, levels, size) / 4) for size in (0, 1, 2, 15, 16, 17, 40, 300, 2000)
             for levels in (1, 2, 5, 1000)]
    cases.append(list(range(600)))
    cases += [_quicksort_killer(n) for n in (200, 1500)]  # these reach the heapsort fallback
    text = "".join(f"{len(c)} " + " ".join(map(str, c)) + "\n" for c in cases)
    lines = subprocess.run([str(tmp_path / "sort")], input=text, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for values, line in zip(cases, lines):
        items = list(enumerate(values))
        libstdcxx_sort(items, lambda a, b: a[1] > b[1])
        assert [i for i, _ in items] == [int(x) for x in line.split()]


# ---- Normalize ---------------------------------------------------------------------

def fork_normalize(x, scale, across_spatial, eps):
    data = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    axes = (1, 2) if across_spatial else (1,)
    norm = np.sqrt((data ** 2).sum(axis=axes, keepdims=True) + eps)
    return (data / norm * (scale if scale.ndim == 0 else scale[None, :, None])).reshape(x.shape), norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 6), (2, 5)])
def test_normalize_forward_and_the_forks_backward(shape, channel_shared, across_spatial, device):
    _, converted = ssd_layer("Normalize", f"norm_param {{ across_spatial: {str(across_spatial).lower()} "
                                          f"channel_shared: {str(channel_shared).lower()} eps: 0.01 }}", [shape])
    module = converted.module.to(device)
    rng = np.random.default_rng(0)
    scale = f32(1.7) if channel_shared else rng.uniform(0.5, 3, shape[1]).astype(f32)
    with torch.no_grad():
        module.scale.copy_(torch.as_tensor(scale))
    x = rng.normal(size=shape).astype(f32)
    dy = rng.normal(size=shape).astype(f32)
    tx = torch.tensor(x, device=device, requires_grad=True)
    y = module(tx)
    y.backward(torch.tensor(dy, device=device))
    want, norm = fork_normalize(x, np.asarray(scale, np.float64), across_spatial, 0.01)
    assert rel_err(y.detach().cpu(), want) < 1e-5
    # the fork's formulas: bottom_diff = scale * (dy - x * sum(x * dy) / norm^2) / norm,
    # the sum over what the norm spans, the scale outside it
    data, diff = (a.reshape(shape[0], shape[1], -1).astype(np.float64) for a in (x, dy))
    axes = (1, 2) if across_spatial else (1,)
    per_channel = np.asarray(scale, np.float64) if channel_shared else np.asarray(scale, np.float64)[None, :, None]
    grad = (diff - data * (data * diff).sum(axis=axes, keepdims=True) / norm ** 2) / norm * per_channel
    assert rel_err(tx.grad.cpu(), grad.reshape(shape)) < 1e-5
    top = want.reshape(data.shape)
    if channel_shared:
        scale_grad = (top * diff).sum() / float(scale)
    else:
        scale_grad = ((top * diff).sum(axis=2) / np.asarray(scale, np.float64)).sum(axis=0)
    assert rel_err(module.scale.grad.cpu(), scale_grad) < 1e-5


def test_normalize_gradient_is_the_forks_not_the_exact_one():
    """With per-channel scales that differ the fork's bottom gradient is not the
    derivative of its forward; with equal scales it is."""
    shape = (1, 3, 2, 2)
    x = torch.randn(shape, dtype=torch.float64)
    for scales, exact in (((2.0, 2.0, 2.0), True), ((1.0, 2.0, 3.0), False)):
        _, converted = ssd_layer("Normalize", "norm_param { across_spatial: false channel_shared: false }", [shape])
        module = converted.module.double()
        with torch.no_grad():
            module.scale.copy_(torch.tensor(scales))
        ok = torch.autograd.gradcheck(lambda t: module(t), (x.clone().requires_grad_(),), raise_exception=False)
        assert ok == exact


# ---- Permute -----------------------------------------------------------------------

def test_permute_completes_the_order_and_scatters_back():
    _, converted = ssd_layer("Permute", "permute_param { order: 2 order: 0 }", [(2, 3, 4, 5)])
    assert converted.top_shapes == [(4, 2, 3, 5)]
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = converted.module(x)
    assert torch.equal(y, x.permute(2, 0, 1, 3)) and y.is_contiguous()
    seed = torch.randn_like(y)
    y.backward(seed)
    assert torch.equal(x.grad, seed.permute(1, 2, 0, 3))


# ---- bad input: one line naming the layer and the field ----------------------------

@pytest.mark.parametrize("layer_type,params,shapes,field", [
    ("PriorBox", "prior_box_param { min_size: 30 max_size: 30 }", [(1, 1, 3, 3), (1, 3, 30, 30)], "max_size"),
    ("PriorBox", "prior_box_param { min_size: 30 max_size: 40 max_size: 50 }", [(1, 1, 3, 3), (1, 3, 30, 30)],
     "max_size"),
    ("PriorBox", "prior_box_param { aspect_ratio: 2 }", [(1, 1, 3, 3), (1, 3, 30, 30)], "min_size"),
    ("PriorBox", "prior_box_param { min_size: 30 variance: 0.1 variance: 0.2 }", [(1, 1, 3, 3), (1, 3, 9, 9)],
     "variance"),
    ("PriorBox", "prior_box_param { min_size: 30 }", [(1, 1, 3, 3)], "img_size"),
    ("DetectionOutput", "detection_output_param { num_classes: 3 }", [(1, 36), (1, 30), (1, 2, 40)], "num_classes"),
    ("DetectionOutput", "detection_output_param { num_classes: 3 share_location: false }",
     [(1, 40), (1, 30), (1, 2, 40)], "num_classes"),
    ("DetectionOutput", "detection_output_param { num_classes: 2 nms_param { eta: 1.5 } }",
     [(1, 40), (1, 20), (1, 2, 40)], "eta"),
    ("DetectionOutput", "detection_output_param { }", [(1, 40), (1, 20), (1, 2, 40)], "num_classes"),
    ("Permute", "permute_param { order: 0 order: 2 order: 0 }", [(1, 2, 3)], "permute_param.order"),
    ("Permute", "permute_param { order: 3 }", [(1, 2, 3)], "permute_param.order"),
])
def test_bad_settings_name_the_layer_and_field(layer_type, params, shapes, field):
    with pytest.raises(CaffeCompatError) as err:
        ssd_layer(layer_type, params, shapes)
    message = str(err.value)
    assert message.startswith(f"layer 'layer' ({layer_type}): ") and field in message and "\n" not in message


def test_bad_prototxt_is_one_cli_line(tmp_path):
    net = tmp_path / "bad.prototxt"
    net.write_text('layer { name: "f" type: "Input" top: "f" input_param { shape { dim: 1 dim: 1 dim: 3 dim: 3 } } }\n'
                   'layer { name: "i" type: "Input" top: "i" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } } }\n'
                   'layer { name: "pb" type: "PriorBox" bottom: "f" bottom: "i" top: "p" '
                   'prior_box_param { min_size: 8 max_size: 4 } }\n')
    result = run_cli("convert", net, "--random-init", "-o", tmp_path / "out.pt", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer 'pb' (PriorBox)" in lines[0] and "max_size" in lines[0], result.stderr


@pytest.mark.parametrize("layer_type,params,shapes,field", [
    ("PriorBox", "prior_box_param { min_size: 30 width: 10 height: 20 }", [(1, 1, 3, 3), (1, 3, 30, 30)],
     "prior_box_param.width"),
    ("DetectionOutput", "detection_output_param { num_classes: 2 normalized_bbox: false }",
     [(1, 40), (1, 20), (1, 2, 40)], "detection_output_param.normalized_bbox"),
])
def test_opencvs_extensions_are_refused_not_ignored(layer_type, params, shapes, field):
    with pytest.raises(CaffeCompatError, match=field):
        build(layer_type, params, shapes, dialect="opencv")
    build(layer_type, params.replace("width: 10 height: 20", "").replace("normalized_bbox: false", ""), shapes,
          dialect="opencv")


@pytest.mark.parametrize("code_type", ["CENTER_SIZE", "CORNER_SIZE"])
def test_a_prior_without_width_stops_decoding_as_the_forks_check(code_type):
    loc, conf, prior = detection_inputs(1, 10, 2, True, seed=2)
    prior[0, 0, 3 * 4 + 2] = prior[0, 0, 3 * 4]  # prior 3: xmax = xmin
    _, converted = ssd_layer("DetectionOutput", f"detection_output_param {{ num_classes: 2 code_type: {code_type} }}",
                             [loc.shape, conf.shape, prior.shape])
    with pytest.raises(CaffeCompatError, match="layer 'layer' \\(DetectionOutput\\): a prior box"):
        converted.module(*map(torch.from_numpy, (loc, conf, prior)))


def test_images_without_detections_have_no_rows_beside_others():
    loc, conf, prior = detection_inputs(3, 20, 3, True, seed=4)
    conf[1] = 0  # image 1 detects nothing above the threshold
    _, converted = ssd_layer("DetectionOutput", "detection_output_param { num_classes: 3 confidence_threshold: 0.2 }",
                             [loc.shape, conf.shape, prior.shape])
    ours = converted.module(*map(torch.from_numpy, (loc, conf, prior))).numpy().reshape(-1, 7)
    assert_same_rows(ours, fork_detection_output(loc, conf, prior, 3, threshold=0.2))
    assert set(ours[:, 0]) == {0, 2}


def test_nms_follows_a_long_chain_of_suppressions():
    """Each box overlaps the next by more than the threshold and the one after by less:
    greedy NMS keeps every other box, which takes one round per link to settle."""
    from caffe_compat.layers.bbox import box_size, greedy_nms  # noqa: PLC0415
    starts = torch.arange(40, dtype=torch.float32) * 0.1
    boxes = torch.stack([starts, torch.zeros(40), starts + 0.25, torch.ones(40)], dim=1)[None]
    kept = greedy_nms(boxes, box_size(boxes), torch.ones(1, 40, dtype=torch.bool), 0.3, 1.0)
    assert kept[0].tolist() == [i % 2 == 0 for i in range(40)]


def _pytorch_nms(boxes, sizes, valid, threshold):
    """greedy_nms's PyTorch form with the fixed threshold, as it runs without nms_kernel.c."""
    from caffe_compat.layers import bbox  # noqa: PLC0415
    return bbox._greedy_nms_cpu(boxes.permute(2, 0, 1).contiguous().permute(1, 2, 0), sizes, valid, threshold)


def _clustered_boxes(lists, length, seed):
    """Boxes around one centre, so that most pairs overlap and many near any threshold."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(lists, length, 2, generator=generator) * 0.3 + 0.35
    half = torch.rand(lists, length, 2, generator=generator) * 0.2 + 0.05
    return torch.cat([centre - half, centre + half], dim=-1)


@pytest.mark.parametrize("threshold", [0.45, 0.3, 0.0, -0.1, 1.0])
def test_nms_kernel_keeps_what_the_pytorch_form_keeps(threshold):
    """nms_kernel.c against the PyTorch form it replaces, with the values that take
    special paths: NaN and infinite corners, inverted and empty boxes, invalid candidates."""
    from caffe_compat.layers import bbox  # noqa: PLC0415
    assert bbox._nms_kernel() is not None, "nms_kernel.c did not build (is a C compiler installed?)"
    boxes = _clustered_boxes(30, 60, seed=1)
    for corner in range(4):  # in a box met late in its list, and in the first one, always kept
        boxes[corner, 3, corner] = float("nan")
        boxes[10 + corner, 0, corner] = float("nan")
    boxes[2, 5] = torch.tensor([0.0, 0.0, float("inf"), float("inf")])
    boxes[3, 1] = torch.tensor([float("-inf"), 0.2, 0.8, float("inf")])
    boxes[4, 2, 2] = boxes[4, 2, 0] - 0.1  # inverted: its size is 0
    boxes[5, 4, 2:] = boxes[5, 4, :2]  # a point
    sizes = bbox.box_size(boxes)
    sizes[6, 7] = float("nan")  # a NaN overlap clashes
    valid = torch.rand(30, 60, generator=torch.Generator().manual_seed(2)) < 0.8
    valid[:, :8] = True
    kept = bbox.greedy_nms(boxes, sizes, valid, threshold, 1.0)
    assert torch.equal(kept, _pytorch_nms(boxes, sizes, valid, threshold))
    assert 0 < kept.sum() < valid.sum() or threshold >= 1 or threshold < 0


def test_nms_kernel_overlaps_are_torchs_to_the_bit():
    """A threshold equal to torch's float32 overlap of two boxes keeps both, one float
    below drops the second: the kernel's overlap is torch's bit for bit (a fused
    multiply-add, say, would move some by one unit in the last place)."""
    from caffe_compat.layers import bbox  # noqa: PLC0415
    pairs = _clustered_boxes(400, 2, seed=3)
    sizes = bbox.box_size(pairs)
    overlaps = bbox.jaccard(pairs[:, 0], sizes[:, 0], pairs[:, 1], sizes[:, 1])
    valid = torch.ones(1, 2, dtype=torch.bool)
    met = 0
    for pair, size, overlap in zip(pairs, sizes, overlaps.tolist()):
        if overlap > 0:
            met += 1
            below = float(np.nextafter(np.float32(overlap), np.float32(0)))
            assert bbox.greedy_nms(pair[None], size[None], valid, overlap, 1.0).tolist() == [[True, True]]
            assert bbox.greedy_nms(pair[None], size[None], valid, below, 1.0).tolist() == [[True, False]]
    assert met > 300


def test_detection_rows_without_the_nms_kernel_are_the_same(monkeypatch):
    """DetectionOutput's rows with nms_kernel.c and with the PyTorch form it falls back to
    (no compiler, or CAFFE_COMPAT_NATIVE=0)."""
    from caffe_compat.layers import bbox  # noqa: PLC0415
    loc, conf, prior = detection_inputs(2, 300, 4, True, seed=6)
    _, converted = ssd_layer("DetectionOutput", "detection_output_param { num_classes: 4 confidence_threshold: 0.01 "
                                                "nms_param { nms_threshold: 0.45 top_k: 100 } keep_top_k: 150 }",
                             [loc.shape, conf.shape, prior.shape])
    bottoms = list(map(torch.from_numpy, (loc, conf, prior)))
    with_kernel = converted.module(*bottoms)
    monkeypatch.setattr(bbox, "_nms_kernel", lambda: None)
    without = converted.module(*bottoms)
    assert torch.equal(with_kernel, without) and with_kernel.shape[2] > 20


def test_label_columns_are_a_view_where_they_are_one_run():
    from caffe_compat.layers.ssd import _columns  # noqa: PLC0415
    x = torch.arange(24.0).reshape(2, 3, 4)
    for columns in ([1, 2, 3], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3], []):
        picked = _columns(x, columns)
        assert torch.equal(picked, x[..., columns])
        shares_memory = picked.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert shares_memory == (columns != [0, 2, 3])
