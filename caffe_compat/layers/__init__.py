"""Caffe layer types as PyTorch modules (and ONNX nodes), one file per family.

Importing this package registers every built-in type.
"""
from .registry import REGISTRY, CaffeLayer, Converted, LayerContext, builder_for, register, register_onnx

__all__ = ["REGISTRY", "CaffeLayer", "Converted", "LayerContext", "builder_for", "register", "register_onnx"]
