"""Scripts that run outside caffe-compat's own environment, e.g. under a user's pycaffe
(`python -m caffe_compat.tools.caffe_reference`)."""
