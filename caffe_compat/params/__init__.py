"""Layer settings read as Caffe (or the fork that adds the layer) reads them, without
torch: what the builders (layers/) and the shape rules (shapes/) share."""
