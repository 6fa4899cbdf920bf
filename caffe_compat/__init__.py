"""caffe-compat: Caffe nets, weights and the lifted structured embedding loss in PyTorch and ONNX."""

from pathlib import Path as _Path

__version__ = "0.2.0.dev0"

# In a source checkout `proto/` and `converters/` sit beside this package and install inside
# it (`proto` and `converters` name other PyPI packages). Run from the checkout's root, the
# source tree shadows the installed package, so let the subpackages be found beside it too.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "proto").is_dir() and (_checkout / "proto" / "caffe.proto").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's own __path__)


def load(path, phase=None):
    """The `CaffeNet` a converted model file holds (see `caffe-compat convert`), in its
    saved phase unless `phase` is given."""
    # Imported here so that `import caffe_compat` does not import torch.
    from .converters.artifact import load as load_model

    return load_model(path, phase)
