"""`caffe-compat convert`: what a conversion is, told by its inputs and the output's suffix.

From a net (NET.prototxt with WEIGHTS, or --random-init for the fillers' values): a
caffemodel, standalone PyTorch source (.py), a torch.export program (.pt2), else a model
file. From a model file: a caffemodel, .py or .pt2 from its weights, or the model file
written again (another container, or new preprocessing)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..deploy import parse_input_shapes
from ..errors import CaffeCompatError
from ..io.files import read_prototxt, with_weights, write_caffemodel
from ..loading import load_net
from .artifact import model_to_caffemodel, rewrite_model, save_model
from .preprocess import PreprocessOverrides, describe as describe_preprocess, preprocess_metadata
from .program import model_to_program, write_program
from .source import model_to_source, net_to_source

PathLike = Union[str, Path]
MODEL_SUFFIXES = (".pt", ".safetensors")
SOURCE_WROTE = "standalone PyTorch, needs only torch"
PROGRAM_WROTE = "torch.export program, dynamic batch; torch.export.load reads it"


def convert(source: PathLike, output: PathLike, weights: Optional[PathLike] = None, random_init: bool = False,
            seed: int = 0, phase: str = "TEST", dialect: Optional[str] = None,
            input_shape: Sequence[str] = (), allow_missing_weights: bool = False, max_memory: Optional[int] = None,
            preprocess: Optional[PreprocessOverrides] = None) -> List[str]:
    """Convert `source` into `output`; returns the lines that say what was written.

    `seed` is the one the fillers' generator was seeded with (by the caller), recorded in
    what is written; `input_shape` holds `[BLOB=]N,C,H,W` strings."""
    source, out = Path(source), Path(output)
    from_model = weights is None and not random_init
    if from_model and out.suffix == ".caffemodel":
        model_to_caffemodel(source, out)
        return [f"wrote {out} (Caffe weights)"]
    if from_model and source.suffix in MODEL_SUFFIXES:
        return _from_model(source, out, preprocess)
    if (weights is None) == (not random_init):
        raise CaffeCompatError("convert takes NET.prototxt WEIGHTS.caffemodel -o OUT, NET.prototxt --random-init "
                               "-o OUT (weights from the prototxt's fillers), or MODEL -o NET.caffemodel"
                               + (": give WEIGHTS or --random-init, not both" if random_init else ""))
    net_file = read_prototxt(source, dialect)
    input_shapes = parse_input_shapes(list(input_shape), net_file.net)
    net = load_net(net_file, weights, phase=phase, dialect=dialect, input_shapes=input_shapes,
                   allow_missing_weights=allow_missing_weights, max_memory=max_memory)
    if out.suffix == ".caffemodel":
        write_caffemodel(with_weights(net.graph.net, net.caffe_weights()), out)
        origin = f"the fillers', seed {seed}" if random_init else weights
        return [f"wrote {out}: Caffe weights of {len(net.caffe_weights())} layers ({origin})"]
    recorded = preprocess_metadata(net_file.net, source.resolve().parent, preprocess,
                                   {name: net.blob_shapes[name] for name in net.input_names})
    if out.suffix == ".py":
        weights_out = net_to_source(net, out, net_file, weights, seed, recorded)
        return [f"wrote {out} ({SOURCE_WROTE}) and its weights {weights_out}"]
    if out.suffix == ".pt2":
        write_program(net, out, recorded)
        return [f"wrote {out} ({PROGRAM_WROTE})"]
    save_model(net, out, net_file.dialect, recorded)
    count = sum(p.numel() for p in net.state_dict().values())
    return [f"wrote {out}: {len(net.layers)} layers, {count:,} values, phase {net.phase}, dialect {net_file.dialect}",
            f"preprocess: {describe_preprocess(recorded)}"]


def _from_model(source: Path, out: Path, preprocess: Optional[PreprocessOverrides]) -> List[str]:
    """A model file as source (.py), program (.pt2), or written again: another container,
    or new preprocessing."""
    if out.suffix == ".py":
        return [f"wrote {out} ({SOURCE_WROTE}) and its weights {model_to_source(source, out)}"]
    if out.suffix == ".pt2":
        model_to_program(source, out)
        return [f"wrote {out} ({PROGRAM_WROTE})"]
    payload = rewrite_model(source, out, preprocess)
    return [f"wrote {out}: {len(payload['weights'])} layers from {source}, phase {payload['phase']}, "
            f"dialect {payload['dialect']}",
            f"preprocess: {describe_preprocess(payload['preprocess'])}"]
