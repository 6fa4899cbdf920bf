"""Reading and writing Caffe's files."""
