"""`caffe-compat demo`: the whole path (train, extract, evaluate, export) on scikit-learn's
handwritten digits."""
