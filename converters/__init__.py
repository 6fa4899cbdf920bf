"""Caffe -> PyTorch artifact, -> ONNX, -> caffemodel."""
