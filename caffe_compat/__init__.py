"""caffe-compat: Caffe nets, weights and the lifted structured embedding loss in PyTorch and ONNX."""

__version__ = "0.1.0"


def load(path, phase=None):
    """The `CaffeNet` a converted model file holds (see `caffe-compat convert`), in its
    saved phase unless `phase` is given."""
    # Imported here so that `import caffe_compat` does not import torch.
    from .converters.artifact import load as load_model

    return load_model(path, phase)
