"""One registry keyed by Caffe layer type.

Each type has a builder (layer -> PyTorch module plus its blob wiring) and, where
ONNX has an equivalent, an emitter (layer -> ONNX nodes), and where plain torch can
say it exactly, a source emitter (layer -> lines of standalone PyTorch source). Both are registered by
decorators that refuse a second registration of the same type. The built-in types'
family modules are imported on the first lookup of one of their types (the catalog
says which module), so that only the families a net uses are imported.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CaffeCompatError
from ..io.dialects import add_layer_parameter, likely_fork
from ..params.layer import LayerFacts, Shape
from .catalog import CATALOG


@dataclass
class LayerContext(LayerFacts):
    """What a builder sees of one Caffe layer."""

    phase: str  # "TRAIN" or "TEST"
    loss_weights: List[float] = field(default_factory=list)

    def wire(self, module: nn.Module, top_shapes: Optional[Sequence[Shape]] = None,
             bottoms: Optional[Sequence[str]] = None) -> "Converted":
        """The usual wiring: all bottoms in, all tops out."""
        return Converted(module, list(self.bottoms if bottoms is None else bottoms), list(self.tops),
                         None if top_shapes is None else [tuple(s) for s in top_shapes])

    def expect_rank(self, index: int, *ranks: int) -> None:
        rank = len(self.bottom_shapes[index])
        if rank not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise self.error(f"bottom '{self.bottoms[index]}' has rank {rank} "
                             f"(shape {self.bottom_shapes[index]}), expected rank {want}")


@dataclass
class Converted:
    """A built layer: the module, the blobs it reads (forward's positional order) and
    writes, and the top shapes when the builder knows them (else they are inferred by
    running the module on meta tensors)."""

    module: nn.Module
    bottoms: List[str]
    tops: List[str]
    top_shapes: Optional[List[Shape]] = None


class CaffeLayer(nn.Module):
    """Base of every layer module. `blob_names` lists, in Caffe's order, the attributes
    holding the layer's Caffe blobs (parameters or buffers), so weights load into and
    write back from them."""

    blob_names: Tuple[str, ...] = ()

    def caffe_blobs(self) -> List[torch.Tensor]:
        return caffe_blobs(self)


def caffe_blobs(module: nn.Module) -> List[torch.Tensor]:
    """A built layer's Caffe blobs in Caffe's order; none for modules that are not
    CaffeLayers (such as the plain loss modules)."""
    return [getattr(module, name) for name in getattr(module, "blob_names", ())]


Builder = Callable[[LayerContext], Converted]


@dataclass
class LayerEntry:
    build: Optional[Builder] = None
    to_onnx: Optional[Callable] = None
    to_source: Optional[Callable] = None


class Registry(Mapping[str, LayerEntry]):
    """Caffe type -> LayerEntry. Looking up a built-in type imports its family module,
    whose decorators fill the entry; iterating imports every module of the package."""

    def __init__(self):
        self._entries: Dict[str, LayerEntry] = {}

    def __getitem__(self, layer_type: str) -> LayerEntry:
        if layer_type not in self._entries and layer_type in CATALOG:
            importlib.import_module(CATALOG[layer_type].module)
        return self._entries[layer_type]

    def __iter__(self) -> Iterator[str]:
        load_all()
        return iter(dict(self._entries))

    def __len__(self) -> int:
        load_all()
        return len(self._entries)

    def registered(self, layer_type: str) -> bool:
        """Whether a builder for `layer_type` was registered from outside the catalog's
        families (imports nothing)."""
        found = self._entries.get(layer_type)
        return found is not None and found.build is not None

    def entry(self, layer_type: str) -> LayerEntry:
        """The entry to register into, created if new."""
        return self._entries.setdefault(layer_type, LayerEntry())


REGISTRY = Registry()


def load_all() -> None:
    """Import every module of the package, registering every built-in type."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def _registrar(slot: str, what: str, layer_types):
    def decorate(fn):
        for layer_type in layer_types:
            home = CATALOG.get(layer_type)
            if home is not None and home.module != fn.__module__:
                # a built-in type registered from elsewhere: load its own family first,
                # so that a duplicate is refused now, not when the family loads later
                importlib.import_module(home.module)
            entry = REGISTRY.entry(layer_type)
            existing = getattr(entry, slot)
            if existing is not None:
                raise ValueError(f"{what} for Caffe type '{layer_type}' is already registered "
                                 f"({existing.__module__}.{existing.__name__})")
            setattr(entry, slot, fn)
        return fn

    return decorate


def register(*layer_types: str, param=None, field: Optional[Tuple[str, int]] = None):
    """Register a PyTorch builder for one or more Caffe layer types. `param` adds the
    layers' parameter message to the schema of every dialect, so that prototxts and
    caffemodels carrying it read with its settings decoded: a .proto snippet (the message,
    and `message LayerParameter { optional MyParameter my_param = N; }` unless `field`
    gives (name, number)) or a message Descriptor with `field`. Register before reading
    the net's files."""
    if param is not None:
        add_layer_parameter(param, field, f"@register({', '.join(map(repr, layer_types))})", layer_types)
    elif field is not None:
        raise CaffeCompatError("register(field=...) needs param=, the message the field holds")
    return _registrar("build", "a builder", layer_types)


def register_onnx(*layer_types: str):
    """Register an ONNX emitter for one or more Caffe layer types."""
    return _registrar("to_onnx", "an ONNX emitter", layer_types)


def register_source(*layer_types: str):
    """Register a standalone PyTorch source emitter (see converters.source) for Caffe layer types."""
    return _registrar("to_source", "a source emitter", layer_types)


def no_source_form(ctx: LayerContext, why: str) -> CaffeCompatError:
    """A source emitter's refusal: one line naming the layer, its type and why."""
    return ctx.error(f"has no standalone PyTorch source form ({why}); convert to .pt or .safetensors instead")


def builder_for(layer_name: str, layer_type: str) -> Builder:
    entry = REGISTRY.get(layer_type)
    if entry is None or entry.build is None:
        raise CaffeCompatError(
            f"layer '{layer_name}': unknown layer type '{layer_type}' (from {likely_fork(layer_type)}). "
            f"Register a builder with @caffe_compat.layers.register('{layer_type}') (a function taking a "
            f"LayerContext and returning ctx.wire(module)) before building the net")
    return entry.build
