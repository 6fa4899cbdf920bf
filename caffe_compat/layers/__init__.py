"""Caffe layer types as PyTorch modules (and ONNX nodes), one file per family.

Importing this package imports every module in it, which registers the built-in types.
"""
import importlib
import pkgutil

from .registry import REGISTRY, CaffeLayer, Converted, LayerContext, builder_for, register, register_onnx

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "CaffeLayer", "Converted", "LayerContext", "builder_for", "register", "register_onnx"]
