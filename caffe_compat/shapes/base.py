"""What a shape rule sees of a layer, and the table of rules by Caffe type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..params.layer import LayerFacts, Shape


@dataclass
class LayerView(LayerFacts):
    """What a shape rule sees of one layer."""

    notes: List[str] = field(default_factory=list)

    def unknown(self, message: str) -> None:
        """A top shape the prototxt does not give: None, with the reason noted."""
        self.notes.append(f"layer '{self.name}' ({self.type}): {message}")

    def expect_rank(self, *ranks: int) -> Shape:
        shape = self.bottom_shapes[0]
        if len(shape) not in ranks:
            raise self.error(f"bottom '{self.bottoms[0]}' has shape {shape}, expected rank "
                             f"{' or '.join(map(str, ranks))}")
        return shape


# A rule: the layer -> (its top shapes, None where the prototxt does not give one; its
# parameter blob shapes in Caffe's order).
Rule = Callable[[LayerView], Tuple[List[Optional[Shape]], List[Shape]]]
RULES: Dict[str, Rule] = {}


def rule(*layer_types: str):
    def decorate(fn: Rule) -> Rule:
        for layer_type in layer_types:
            RULES[layer_type] = fn
        return fn
    return decorate


def same_shape(v: LayerView) -> Tuple[List[Shape], List[Shape]]:
    """One top of the (first) bottom's shape, no parameters."""
    return [v.bottom_shapes[0]], []
