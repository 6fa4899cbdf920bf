"""caffe-compat: Caffe nets, weights and the lifted structured embedding loss in PyTorch and ONNX."""

__version__ = "0.1.0"
