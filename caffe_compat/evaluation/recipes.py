"""The paper's net and solver, defined here: BVLC GoogLeNet without its auxiliary
heads, dropout 0.4 on pool5, `fc_embedding` (lr_mult 10/20) and the lifted loss,
fed by an LMDB `Data` layer; SGD at 1e-4 with momentum 0.9 and weight decay 2e-4.

Layer for layer these equal the authors' train_val / extract prototxts (names,
wiring, settings, fillers); only the data paths and batch size are the caller's."""
from __future__ import annotations

from typing import Optional

from ..io.schema import messages

# GoogLeNet's inception blocks: name -> (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj).
INCEPTIONS = [
    ("inception_3a", (64, 96, 128, 16, 32, 32)),
    ("inception_3b", (128, 128, 192, 32, 96, 64)),
    ("pool3/3x3_s2", None),
    ("inception_4a", (192, 96, 208, 16, 48, 64)),
    ("inception_4b", (160, 112, 224, 24, 64, 64)),
    ("inception_4c", (128, 128, 256, 24, 64, 64)),
    ("inception_4d", (112, 144, 288, 32, 64, 64)),
    ("inception_4e", (256, 160, 320, 32, 128, 128)),
    ("pool4/3x3_s2", None),
    ("inception_5a", (256, 160, 320, 32, 128, 128)),
    ("inception_5b", (384, 192, 384, 48, 128, 128)),
]

# BVLC GoogLeNet's xavier "std" values (ignored by the xavier filler, kept for fidelity).
BRANCH_STD = {"1x1": 0.03, "3x3_reduce": 0.09, "3x3": 0.03, "5x5_reduce": 0.2, "5x5": 0.03, "pool_proj": 0.1}


class _NetBuilder:
    def __init__(self, name: str):
        self.net = messages("lifted").NetParameter(name=name)

    def layer(self, name: str, type_: str, bottoms=(), tops=()):
        layer = self.net.layer.add(name=name, type=type_)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        return layer

    def conv(self, name, bottom, num_output, kernel, std, pad=0, stride=1):
        layer = self.layer(name, "Convolution", [bottom], [name])
        layer.param.add(lr_mult=1, decay_mult=1)
        layer.param.add(lr_mult=2, decay_mult=0)
        p = layer.convolution_param
        p.num_output = num_output
        if pad:
            p.pad.append(pad)
        p.kernel_size.append(kernel)
        if stride != 1:
            p.stride.append(stride)
        p.weight_filler.type = "xavier"
        p.weight_filler.std = std
        p.bias_filler.type = "constant"
        p.bias_filler.value = 0.2
        return name

    def relu(self, name, blob):
        self.layer(name, "ReLU", [blob], [blob])

    def pool(self, name, bottom, method, kernel, stride, pad=0):
        layer = self.layer(name, "Pooling", [bottom], [name])
        p = layer.pooling_param
        p.pool = p.PoolMethod.Value(method)
        p.kernel_size = kernel
        p.stride = stride
        if pad:
            p.pad = pad
        return name

    def lrn(self, name, bottom):
        layer = self.layer(name, "LRN", [bottom], [name])
        layer.lrn_param.local_size = 5
        layer.lrn_param.alpha = 0.0001
        layer.lrn_param.beta = 0.75
        return name

    def inception(self, prefix, bottom, widths):
        n1, n3r, n3, n5r, n5, npool = widths
        outputs = []
        for branch, width, kernel, pad, source in (("1x1", n1, 1, 0, bottom), ("3x3_reduce", n3r, 1, 0, bottom),
                                                   ("3x3", n3, 3, 1, None), ("5x5_reduce", n5r, 1, 0, bottom),
                                                   ("5x5", n5, 5, 2, None)):
            name = f"{prefix}/{branch}"
            source = source or f"{prefix}/{branch}_reduce"
            self.conv(name, source, width, kernel, BRANCH_STD[branch], pad=pad)
            self.relu(f"{prefix}/relu_{branch}", name)
            if not branch.endswith("reduce"):
                outputs.append(name)
        pooled = self.pool(f"{prefix}/pool", bottom, "MAX", 3, 1, pad=1)
        proj = self.conv(f"{prefix}/pool_proj", pooled, npool, 1, BRANCH_STD["pool_proj"])
        self.relu(f"{prefix}/relu_pool_proj", proj)
        outputs.append(proj)
        self.layer(f"{prefix}/output", "Concat", outputs, [f"{prefix}/output"])
        return f"{prefix}/output"


def paper_net(embedding: int = 64, phase: str = "TRAIN", source: str = "train.lmdb", batch_size: int = 128,
              mean_file: Optional[str] = "imagenet_mean.binaryproto", crop_size: int = 227,
              margin: float = 1.0, name: str = "CaffeNet"):
    """The paper's training net (phase TRAIN: mirror, lifted loss) or its feature
    extraction net (phase TEST: no mirror, no loss), as a NetParameter of the fork's dialect."""
    b = _NetBuilder(name)
    data = b.layer("data", "Data", tops=["data", "label"])
    rule = data.include.add()
    rule.phase = rule.DESCRIPTOR.fields_by_name["phase"].enum_type.values_by_name[phase].number
    if phase == "TRAIN":
        data.transform_param.mirror = True
    data.transform_param.crop_size = crop_size
    if mean_file:
        data.transform_param.mean_file = mean_file
    data.data_param.source = source
    data.data_param.batch_size = batch_size
    data.data_param.backend = data.data_param.LMDB

    x = b.conv("conv1/7x7_s2", "data", 64, 7, 0.1, pad=3, stride=2)
    b.relu("conv1/relu_7x7", x)
    x = b.lrn("pool1/norm1", b.pool("pool1/3x3_s2", x, "MAX", 3, 2))
    x = b.conv("conv2/3x3_reduce", x, 64, 1, 0.1)
    b.relu("conv2/relu_3x3_reduce", x)
    x = b.conv("conv2/3x3", x, 192, 3, 0.03, pad=1)
    b.relu("conv2/relu_3x3", x)
    x = b.pool("pool2/3x3_s2", b.lrn("conv2/norm2", x), "MAX", 3, 2)
    for block, widths in INCEPTIONS:
        x = b.inception(block, x, widths) if widths else b.pool(block, x, "MAX", 3, 2)
    x = b.pool("pool5/7x7_s1", x, "AVE", 7, 1)
    b.layer("pool5/drop_7x7_s1", "Dropout", [x], [x]).dropout_param.dropout_ratio = 0.4
    fc = b.layer("fc_embedding", "InnerProduct", [x], ["fc_embedding"])
    fc.param.add(lr_mult=10, decay_mult=1)
    fc.param.add(lr_mult=20, decay_mult=0)
    fc.inner_product_param.num_output = embedding
    fc.inner_product_param.weight_filler.type = "xavier"
    fc.inner_product_param.bias_filler.type = "constant"
    fc.inner_product_param.bias_filler.value = 0
    if phase == "TRAIN":
        loss = b.layer("loss", "LiftedStructSimilaritySoftmaxLoss", ["fc_embedding", "label"], ["loss"])
        loss.lifted_struct_sim_softmax_loss_param.margin = margin
    return b.net


def paper_solver(net_path: str, max_iter: int = 20000, snapshot: int = 10000,
                 snapshot_prefix: str = "snapshot", base_lr: float = 1e-4):
    """The paper's solver: SGD, base_lr 1e-4, step policy (gamma 0.96, stepsize 32000 >
    max_iter, so the rate never changes), momentum 0.9, weight decay 2e-4."""
    solver = messages("bvlc").SolverParameter()
    solver.net = net_path
    solver.test_initialization = False
    solver.base_lr = base_lr
    solver.lr_policy = "step"
    solver.gamma = 0.96
    solver.stepsize = 32000
    solver.display = 5
    solver.max_iter = max_iter
    solver.momentum = 0.9
    solver.weight_decay = 0.0002
    solver.snapshot = snapshot
    solver.snapshot_prefix = snapshot_prefix
    return solver
