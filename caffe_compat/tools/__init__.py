"""Caffe's tools on a loaded net: inspect, compare with what Caffe recorded, extract
features, time and score; and scripts that run outside caffe-compat's own environment,
e.g. under a user's pycaffe (`python -m caffe_compat.tools.caffe_reference`)."""
