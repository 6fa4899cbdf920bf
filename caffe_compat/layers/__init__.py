"""Caffe layer types as PyTorch modules (and ONNX nodes), one file per family.

Importing this package imports nothing heavy: `catalog` lists the built-in types, and
the registry (which needs torch) is imported on first use of one of the names below;
each family module is imported on the first lookup of one of its types.
"""
import importlib

__all__ = ["REGISTRY", "CaffeLayer", "Converted", "LayerContext", "builder_for", "register", "register_onnx"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.registry"), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
