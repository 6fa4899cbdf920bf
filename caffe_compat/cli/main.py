"""The `caffe-compat` command: argument parsing, printing and exit codes only; each verb's work is in
the module of that verb."""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import textwrap
import traceback
import warnings
from typing import List, Optional

from .. import __version__
from ..errors import CaffeCompatError, terminal_line
from ..io.dialects import ENTRIES as DIALECT_ENTRIES

EXIT_BAD_INPUT = 2


def _cmd_inspect(args) -> int:
    from ..tools.inspect import format_inspection, inspect_net

    from ..deploy import parse_input_shapes
    from ..io.files import read_net

    shapes = parse_input_shapes(args.input_shape, read_net(args.net, args.dialect).net) if args.input_shape else None
    info = inspect_net(args.net, args.weights, args.phase, args.dialect, show_all=args.all, input_shapes=shapes)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _cmd_layers(args) -> int:
    from ..layers import catalog

    if args.json:
        print(json.dumps(catalog.as_json(), indent=2))
    else:
        print(catalog.format_markdown() if args.markdown else catalog.format_table())
    return 0


def _cmd_compare(args) -> int:
    from ..tools.compare import run_compare
    from ..memory import parse_size

    max_memory = parse_size(args.max_memory) if args.max_memory else None
    return run_compare(args.files, args.device, args.rtol, args.grad_rtol,
                       allow_missing_weights=args.allow_missing_weights, max_memory=max_memory)


def _cmd_convert(args) -> int:
    from ..converters.conversion import convert
    from ..memory import parse_size

    wrote = convert(args.source, args.output, args.weights, random_init=args.random_init, seed=args.seed,
                    phase=args.phase, dialect=args.dialect, input_shape=args.input_shape or [],
                    allow_missing_weights=args.allow_missing_weights,
                    max_memory=parse_size(args.max_memory) if args.max_memory else None,
                    preprocess=_preprocess_overrides(args))
    print("\n".join(wrote))
    return 0


def _preprocess_overrides(args):
    from ..converters.preprocess import PreprocessOverrides

    return PreprocessOverrides(args.mean_value, args.mean_file, args.scale, args.crop_size)


def _add_preprocess_options(p, what: str, crop: bool = True) -> None:
    """--mean-value/--mean-file/--scale (and --crop-size): preprocessing to `what`."""
    p.add_argument("--mean-value", type=float, nargs="+", metavar="B G R",
                   help=f"per-channel mean, B G R (or one for all), to {what}")
    p.add_argument("--mean-file", metavar="MEAN.binaryproto", help=f"mean image to {what}")
    p.add_argument("--scale", type=float, help=f"factor applied after the mean, to {what}")
    if crop:
        p.add_argument("--crop-size", type=int, help=f"centre crop, to {what}")


def _add_weights_options(p, memory: bool = True, seed: bool = True) -> None:
    p.add_argument("--allow-missing-weights", action="store_true",
                   help="let layers the weights do not cover keep their fillers' values (else an error)")
    if seed:
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the fillers' draws (--allow-missing-weights, --random-init): the same "
                            "values on every run (default 0)")
    if memory:
        p.add_argument("--max-memory", metavar="SIZE",
                       help="refuse nets whose parameters need more, e.g. 8G (default: the memory available)")


def _cmd_export_onnx(args) -> int:
    from ..converters.onnx import export_files, parse_shape
    from ..memory import parse_size

    summary = export_files(args.source, args.weights, args.onnx_file,
                           input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                           dialect=args.dialect, outputs=args.outputs, opset=args.opset,
                           l2_normalize=args.l2_normalize, static_batch=args.static_batch,
                           preprocess=_preprocess_overrides(args), allow_missing_weights=args.allow_missing_weights,
                           embed_preprocessing=args.embed_preprocessing, image_layout=args.image_layout,
                           max_memory=parse_size(args.max_memory) if args.max_memory else None)
    print(summary.describe())
    return 0


def _cmd_extract(args) -> int:
    from ..memory import parse_size
    from ..tools.extract import extract_to_file

    print(extract_to_file(args.net, args.weights, args.data, args.output, args.blob, dialect=args.dialect,
                          device=args.device, batch_size=args.batch_size, root=args.root, mean_file=args.mean_file,
                          mean_values=args.mean_value, allow_missing_weights=args.allow_missing_weights,
                          max_memory=parse_size(args.max_memory) if args.max_memory else None))
    return 0


def _cmd_evaluate(args) -> int:
    from ..evaluation.evaluate import format_table, run_evaluate

    if args.train_log and not args.figure_dir:
        raise CaffeCompatError("--train-log draws a figure: give --figure-dir too")
    if args.dataset and not args.figure_dir:
        raise CaffeCompatError("--dataset draws the paper's curve in a figure: give --figure-dir too")
    result = run_evaluate(args.features, args.recall_k, args.use_assignments, args.json, args.figure_dir,
                          args.device, args.train_log, args.dataset)
    print(format_table(result))
    return 0


def _cmd_prepare(args) -> int:
    from ..evaluation.datasets import prepare

    summary = prepare(args.dataset, args.source, args.output, args.format)
    for split, info in summary.items():
        print(f"{split}: {info['images']} images of {info['classes']} classes -> {info['path']}")
    return 0


def _cmd_reproduce(args) -> int:
    from ..evaluation.reproduce import reproduce

    result = reproduce(args.dataset, args.source, args.weights, args.workdir, args.embedding, args.device,
                       args.max_iter, args.batch_size, mean_file=args.mean_file)
    if not result.get("stopped_early"):
        return 0
    return 128 + result["stop_signal"] if result["stop_signal"] else 1  # the shell's code for that signal


def _cmd_demo(args) -> int:
    from ..demo.run import run_demo

    return run_demo(args.workdir, args.iterations)


def _cmd_time(args) -> int:
    from ..tools.timing import time_net

    time_net(args.net, args.weights, args.iterations, args.phase, args.device, args.batch_size)
    return 0


def _cmd_test(args) -> int:
    from ..tools.timing import score_net

    score_net(args.net, args.weights, args.iterations, args.phase, args.device, all_values=args.all_values)
    return 0


def _cmd_train(args) -> int:
    from ..solver import train

    result = train(args.solver, weights=args.weights, resume=args.resume, device=args.device,
                   max_iter=args.max_iter, output=args.output, log_path=args.log, sampler=args.sampler,
                   precision=args.precision or "fp32", memory_format=args.memory_format,
                   allow_missing_weights=args.allow_missing_weights, net=args.net, mean_file=args.mean_file,
                   mean_values=args.mean_value)
    if not result.stopped_early:
        return 0
    state = str(result.snapshots[-1])
    again = ["caffe-compat", "train", args.solver, "--resume", state]
    for option in ("net", "device", "max_iter", "output", "log", "sampler", "precision", "memory_format",
                   "mean_file"):
        if getattr(args, option) is not None:
            again += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if args.mean_value:
        again += ["--mean-value", *map(str, args.mean_value)]
    print(f"caffe-compat: stopped by {signal.Signals(result.stop_signal).name} at iteration {result.iterations}; "
          f"snapshot {state}; resume with: {shlex.join(again)}", file=sys.stderr)
    return 128 + result.stop_signal  # the shell's code for a process ended by that signal


class _OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes end as bad input does: one line, exit 2 (the usage is in --help)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {terminal_line(message)} (see {self.prog} --help)\n")


DESCRIPTION = ("Caffe nets, weights and the lifted structured embedding loss in PyTorch and ONNX, number for "
               "number, with no Caffe installed: read Caffe's files (and its forks'), run and train them as Caffe "
               "does, evaluate as the paper does, export to ONNX or back to caffemodels.")

EPILOG = """a first session:
  caffe-compat demo                                   the whole path on a built-in example
  caffe-compat inspect deploy.prototxt model.caffemodel
  caffe-compat convert deploy.prototxt model.caffemodel -o model.safetensors
  caffe-compat export-onnx deploy.prototxt model.caffemodel -o model.onnx

`caffe-compat VERB --help` explains each verb, with an example."""


class _HelpFormatter(argparse.HelpFormatter):
    """Prose wrapped to the terminal; indented lines (command examples) kept as written."""

    def _fill_text(self, text, width, indent):
        return "\n".join(indent + line if not line or line.startswith("  ")
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def _verb(sub, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A verb's parser: `summary` in the verb list, `description` and `examples` on its --help page."""
    return sub.add_parser(name, help=summary, description=description, epilog="example:\n" + examples,
                          formatter_class=_HelpFormatter)


def _add_phase(p, default: str, what: str) -> None:
    p.add_argument("--phase", default=default, choices=["TRAIN", "TEST"], type=str.upper,
                   help=f"which phase's layers {what} (include/exclude rules; default {default})")


def _add_device(p, default: Optional[str] = "cpu") -> None:
    p.add_argument("--device", default=default,
                   help="cpu, cuda or cuda:N" + (f" (default {default})" if default else ""))


def _add_dialect(p) -> None:
    forks = "; ".join(f"{name}: {entry.fork}" for name, entry in DIALECT_ENTRIES.items())
    p.add_argument("--dialect", choices=list(DIALECT_ENTRIES), metavar="DIALECT",
                   help=f"read the files as this Caffe fork's schema instead of the one detected from them "
                        f"(field names in a prototxt, field numbers in a caffemodel). {forks}")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="caffe-compat", description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"caffe-compat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    p = _verb(sub, "inspect", "list a net's layers, blobs and parameters",
              "A net's layers, wiring, settings, blob shapes and parameter counts, computed from the prototxt "
              "alone (no torch, nothing allocated); with weights, which layers each side lacks. Layers of "
              "Caffe's forks are shown with the fork they come from.",
              "  caffe-compat inspect train_val.prototxt --phase TRAIN\n"
              "  caffe-compat inspect deploy.prototxt bvlc_googlenet.caffemodel --json")
    p.add_argument("net", help="NET.prototxt (or a caffemodel, which holds its net)")
    p.add_argument("weights", nargs="?", help="WEIGHTS.caffemodel to check against the net")
    _add_phase(p, "TEST", "to show")
    _add_dialect(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="also show the split layers Caffe inserted (in caffemodels)")
    p.add_argument("--input-shape", action="append", metavar="[BLOB=]N,C,H,W",
                   help="shape of an input, or of a data layer's top, as convert takes it (repeatable)")
    p.set_defaults(run=_cmd_inspect)

    p = _verb(sub, "layers", "list the supported Caffe layer types and their ONNX mappings",
              "Every Caffe layer type caffe-compat builds, the file of its family, and whether it exports to ONNX.",
              "  caffe-compat layers --markdown")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--markdown", action="store_true", help="as the README's table")
    p.set_defaults(run=_cmd_layers)

    p = _verb(sub, "compare", "compare a converted net with Caffe's recorded numbers",
              "Runs the net on the inputs Caffe was given (REF.npz: input/, blob/, diff/, paramdiff/ keys, as "
              "tools/caffe_reference.py writes them) and compares every recorded blob, gradient and parameter; "
              "one row per key, then 'N passed, M failed'. Exit 1 when any row fails.",
              "  caffe-compat compare net.prototxt net.caffemodel reference.npz\n"
              "  caffe-compat compare cases/            (every NAME.npz with its NAME.prototxt)")
    p.add_argument("files", nargs="+", help="NET.prototxt [WEIGHTS.caffemodel] REF.npz, or a directory of cases")
    _add_device(p)
    p.add_argument("--rtol", type=float, help="forward tolerance (default 1e-5; 1e-4 for nets over 10 layers)")
    p.add_argument("--grad-rtol", type=float, help="gradient tolerance (default 1e-4)")
    _add_weights_options(p)
    p.set_defaults(run=_cmd_compare)

    p = _verb(sub, "convert", "Caffe -> caffe-compat model, or model -> caffemodel",
              "Writes a self-contained model (net, weights, the preprocessing it expects, checksums) that "
              "caffe_compat.load() reads; or Caffe weights, from a model or from the prototxt's fillers; or "
              "a model that needs no caffe-compat: standalone PyTorch source (.py) or a torch.export program "
              "(.pt2). The output's suffix says which.",
              "  caffe-compat convert deploy.prototxt bvlc_googlenet.caffemodel -o googlenet.safetensors\n"
              "  caffe-compat convert train_val.prototxt --random-init --seed 0 -o init.caffemodel\n"
              "  caffe-compat convert googlenet.safetensors -o back.caffemodel\n"
              "  caffe-compat convert deploy.prototxt bvlc_googlenet.caffemodel -o googlenet.py")
    p.add_argument("source", help="NET.prototxt, or a MODEL written by convert/train")
    p.add_argument("weights", nargs="?", help="WEIGHTS.caffemodel")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="MODEL.pt or MODEL.safetensors (caffe_compat.load reads them), WEIGHTS.caffemodel, model.py "
                        "(standalone PyTorch source, weights in model.pth) or model.pt2 (a torch.export program); "
                        "written to a temporary and renamed")
    _add_phase(p, "TEST", "the model holds")
    _add_dialect(p)
    _add_preprocess_options(p, "record in the model (shown by export-onnx and caffe_compat.load)")
    p.add_argument("--random-init", action="store_true",
                   help="no WEIGHTS: fill the parameters from the prototxt's fillers (seeded by --seed)")
    p.add_argument("--input-shape", action="append", metavar="[BLOB=]N,C,H,W",
                   help="shape of an input, or of a data layer's top whose source is absent; without BLOB=, "
                        "the image input (repeatable)")
    _add_weights_options(p)
    p.set_defaults(run=_cmd_convert)

    p = _verb(sub, "export-onnx", "Caffe net (or a converted/trained model) -> ONNX",
              "ONNX written from the Caffe graph with standard operators, the TEST phase's layers up to the "
              "outputs; the preprocessing the net expects is recorded in metadata_props (or done in the graph "
              "with --embed-preprocessing).",
              "  caffe-compat export-onnx deploy.prototxt bvlc_googlenet.caffemodel -o googlenet.onnx --output prob\n"
              "  caffe-compat export-onnx embedder.safetensors -o embedder.onnx --l2-normalize "
              "--embed-preprocessing rgb")
    p.add_argument("source", help="NET.prototxt, or a MODEL written by convert/train")
    p.add_argument("weights", nargs="?", help="WEIGHTS.caffemodel (with NET.prototxt)")
    # -o is the file and --output a blob, as in the project's documented usage.
    p.add_argument("-o", dest="onnx_file", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 or later (default 17)")
    p.add_argument("--output", dest="outputs", action="append", metavar="BLOB",
                   help="export up to this blob (repeatable; default fc_embedding, else the net's "
                        "outputs that are not losses)")
    p.add_argument("--l2-normalize", action="store_true",
                   help="append x / max(||x||_2, 1e-12) per example to each output (cosine retrieval)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a symbolic N")
    p.add_argument("--embed-preprocessing", choices=("rgb", "bgr"), type=str.lower,
                   help="take uint8 images in this channel order as input 'image', the channel order, crop, "
                        "mean and scale done in the graph (default: Caffe's float BGR input)")
    p.add_argument("--image-layout", choices=("nhwc", "nchw"), default="nhwc", type=str.lower,
                   help="layout of the images --embed-preprocessing takes (default nhwc, as image libraries "
                        "give them)")
    p.add_argument("--input-shape", metavar="[BLOB=]N,C,H,W",
                   help="shape of the image input (needed for data layers without crop_size)")
    _add_dialect(p)
    _add_preprocess_options(p, "record in metadata_props")
    _add_weights_options(p)
    p.set_defaults(run=_cmd_export_onnx)

    p = _verb(sub, "time", "per-layer forward and backward times, as `caffe time` prints them",
              "One warm-up pass, then each layer's forward and backward timed over the iterations, averaged, "
              "and the totals; the same lines as `caffe time`. Takes caffe's own flags too (-model, -iterations).",
              "  caffe-compat time deploy.prototxt --phase TEST --iterations 10\n"
              "  caffe-compat time -model train_val.prototxt -iterations 5")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("weights", nargs="?", help="WEIGHTS.caffemodel (default: the prototxt's fillers)")
    p.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50, as caffe's)")
    _add_phase(p, "TRAIN", "to time (TRAIN as caffe's)")
    _add_device(p)
    p.add_argument("--batch-size", type=int, help="override the data layers' and Input blobs' batch size")
    p.set_defaults(run=_cmd_time)

    p = _verb(sub, "test", "score a net on its TEST data: each output blob's mean, as `caffe test`",
              "Runs the net's data layers for the iterations and prints each output per batch and its mean "
              "(accuracy, loss with its weight), as `caffe test` does. Takes caffe's own flags too.",
              "  caffe-compat test train_val.prototxt snapshot_iter_20000.caffemodel --iterations 100\n"
              "  caffe-compat test -model train_val.prototxt -weights final.caffemodel -iterations 100")
    p.add_argument("net", help="NET.prototxt with data layers for the phase")
    p.add_argument("weights", help="WEIGHTS.caffemodel")
    p.add_argument("--iterations", type=int, default=50, help="batches to run (default 50, as caffe's)")
    _add_phase(p, "TEST", "to run")
    _add_device(p)
    p.add_argument("--all-values", action="store_true",
                   help="print every element of every output per batch, as caffe test does (default: a "
                        "scalar output's value, a larger one's shape and mean)")
    p.set_defaults(run=_cmd_test)

    p = _verb(sub, "train", "train a net with a Caffe solver prototxt, as `caffe train`",
              "Caffe's solver arithmetic (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam), lr policies, "
              "iter_size, test passes and snapshots (.caffemodel and a resumable .solverstate.pt); Ctrl-C "
              "snapshots and prints the resume command. Takes caffe's own flags too (-solver, -weights, -gpu).",
              "  caffe-compat train solver.prototxt --weights bvlc_googlenet.caffemodel --log train.csv\n"
              "  caffe-compat train solver.prototxt --net train_val.prototxt --mean-value 104 117 123\n"
              "  caffe-compat train -solver solver.prototxt -weights init.caffemodel -gpu 0")
    p.add_argument("solver", help="SOLVER.prototxt (its paths resolve from the working directory)")
    p.add_argument("--weights", help="INIT.caffemodel to fine-tune from")
    p.add_argument("--resume", help="a .solverstate.pt snapshot to continue from")
    p.add_argument("--net", help="NET.prototxt to train in place of the solver's net (the paper's solver names "
                                 "its authors' absolute path); the test passes use it too unless the solver "
                                 "names test nets")
    p.add_argument("--mean-file", metavar="MEAN.binaryproto",
                   help="subtract this mean image in every data layer instead of the net's")
    p.add_argument("--mean-value", type=float, nargs="+", metavar="B G R",
                   help="subtract these channel means in every data layer instead of the net's")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the solver's solver_mode and device_id, "
                                    "as in Caffe; on CPU when the machine has no GPU)")
    p.add_argument("--max-iter", type=int, help="override the solver's max_iter")
    p.add_argument("--output", help="write the final weights to this caffemodel")
    # --log-csv: torchrun's own parser rejects `--log` as an ambiguous abbreviation.
    p.add_argument("--log", "--log-csv", dest="log",
                   help="write iteration,loss,lr,smoothed_loss per iteration to this CSV")
    p.add_argument("--sampler", help="ImageData batches: sequential (Caffe's), pairs, or pk:P,K "
                                     "(P classes x K images)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fp32 (default): Caffe's arithmetic; bf16/fp16: autocast, faster, less exact")
    p.add_argument("--memory-format", choices=("nchw", "channels_last"),
                   help="layout of the 4-d weights and activations (default: channels_last, but nchw for fp32 on CUDA)")
    _add_weights_options(p, memory=False, seed=False)  # the solver's random_seed, as Caffe's
    p.set_defaults(run=_cmd_train)

    p = _verb(sub, "extract", "run a net's TEST phase over a dataset and save one blob per image",
              "Feeds the net's TEST data layer from --data in order (no shuffling, its own transform_param) and "
              "saves one blob per image with the labels (and an image list's paths) for `evaluate`.",
              "  caffe-compat extract extract.prototxt final.caffemodel --data cub/test.txt -o features.npz\n"
              "  caffe-compat extract extract.prototxt final.caffemodel --data test_lmdb --mean-value 104 117 123 "
              "-o features.npz")
    p.add_argument("net", help="NET.prototxt with a Data or ImageData layer in its TEST phase")
    p.add_argument("weights", help="WEIGHTS.caffemodel")
    p.add_argument("--data", required=True, help="an LMDB folder of Datum records, or an image list file")
    p.add_argument("--root", help="folder the list's relative image paths resolve against (default: the list "
                                  "file's folder; the prototxt's root_folder is not used)")
    p.add_argument("--blob", default="fc_embedding", help="the blob to save per image (default fc_embedding, "
                                                          "the paper's embedding)")
    p.add_argument("-o", "--output", required=True,
                   help="FEATURES.npz (embeddings, labels, image paths relative to its folder or absolute)")
    _add_device(p)
    p.add_argument("--batch-size", type=int, help="override the data layer's batch size")
    p.add_argument("--mean-file", metavar="MEAN.binaryproto", help="subtract this mean image instead of the net's")
    p.add_argument("--mean-value", type=float, nargs="+", metavar="B G R",
                   help="subtract these channel means instead of the net's mean")
    _add_dialect(p)
    _add_weights_options(p)
    p.set_defaults(run=_cmd_extract)

    p = _verb(sub, "evaluate", "Recall@K, NMI, F1 and RI as the paper's MATLAB code computes them",
              "Retrieval (Recall@K) and clustering (k-means with k the number of classes: NMI, pair F1, RI) of "
              "the embeddings in FEATURES.npz, as the paper's evaluation computes them; figures on request.",
              "  caffe-compat evaluate features.npz\n"
              "  caffe-compat evaluate features.npz --figure-dir figures --train-log train.csv --dataset cub")
    p.add_argument("features", help="FEATURES.npz with embeddings and labels")
    p.add_argument("--recall-k", type=int, nargs="+", help="K values (default 1 2 4 8)")
    p.add_argument("--use-assignments", action="store_true",
                   help="score the file's own 'assignments' clustering instead of running k-means")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--figure-dir", help="write a Recall@K curve and a retrieval grid here (needs matplotlib)")
    p.add_argument("--train-log", help="also plot this training log (the CSV of `train --log`)")
    p.add_argument("--dataset", choices=["cub", "cars", "sop"],
                   help="draw the paper's published Recall@K for this dataset beside ours")
    _add_device(p)
    p.set_defaults(run=_cmd_evaluate)

    p = _verb(sub, "prepare", "a dataset's official archive -> the paper's splits and preprocessing",
              "CUB-200-2011, Stanford Cars or Stanford Online Products (see the README for where each comes "
              "from) to the paper's train/test splits, as image lists or LMDBs; nothing under --source is "
              "written, and the output appears only when complete.",
              "  caffe-compat prepare cub --source ~/data/CUB_200_2011 -o cub\n"
              "  caffe-compat prepare sop --source ~/data --format lmdb -o sop_lmdb")
    p.add_argument("dataset", choices=["cub", "cars", "sop"], help="which dataset the archive holds")
    p.add_argument("--source", required=True, help="the extracted official archive (or the folder above it)")
    p.add_argument("-o", "--output", required=True, help="a new or empty output folder")
    p.add_argument("--format", choices=["list", "lmdb"], default="list",
                   help="image lists (Caffe ImageData) or LMDBs of Datum records (default list)")
    p.set_defaults(run=_cmd_prepare)

    p = _verb(sub, "reproduce", "the paper's protocol: prepare, fine-tune, extract, evaluate",
              "Checks every input, estimates the whole run, then prepares the data, fine-tunes the paper's "
              "GoogLeNet embedder with its solver, extracts the test set's embeddings and evaluates them beside "
              "the paper's published numbers.",
              "  caffe-compat reproduce --dataset cub --source ~/data --weights bvlc_googlenet.caffemodel "
              "--device cuda")
    p.add_argument("--dataset", required=True, choices=["cub", "cars", "sop"], help="the paper's dataset to run")
    p.add_argument("--source", required=True, help="the dataset's extracted official archive")
    p.add_argument("--weights", required=True, help="bvlc_googlenet.caffemodel (ImageNet weights)")
    p.add_argument("--embedding", type=int, default=64, choices=[64, 128, 256, 512],
                   help="embedding size (default 64)")
    _add_device(p)
    p.add_argument("--workdir", default="reproduce", help="where data, snapshots and results go (default ./reproduce)")
    p.add_argument("--max-iter", type=int, default=20000, help="the paper's 20000 by default")
    p.add_argument("--batch-size", type=int, default=128, help="the paper's 128 by default")
    p.add_argument("--mean-file", help="imagenet_mean.binaryproto (default: its channel means 104,117,123)")
    p.set_defaults(run=_cmd_reproduce)

    p = _verb(sub, "demo", "train, evaluate and export a digits embedder end to end (about a minute)",
              "The paper's method on real data shipped with scikit-learn: a LeNet embedder written as Caffe "
              "prototxts, trained with the lifted loss and Caffe's solver on some digit classes, evaluated on "
              "held-out and unseen classes before and after, exported to ONNX and checked in ONNX Runtime.",
              "  caffe-compat demo\n"
              "  caffe-compat demo --workdir /tmp/demo --iterations 200")
    p.add_argument("--workdir", default="caffe-compat-demo", help="where the demo writes (default ./caffe-compat-demo)")
    p.add_argument("--iterations", type=int, default=500, help="training iterations (default 500)")
    p.set_defaults(run=_cmd_demo)
    return parser


# What each command-line input is, for the message of an output that would replace it.
_INPUT_OPTIONS = {"net": "the net", "weights": "the weights", "source": "the source", "solver": "the solver",
                  "resume": "the solver state to resume", "features": "the features", "files": "a file to compare",
                  "data": "the data", "mean_file": "the mean file", "train_log": "the training log"}
_OUTPUT_OPTIONS = ("output", "onnx_file", "json", "log")


def _refuse_output_over_input(args) -> None:
    """An output that is one of the command's inputs, or lies in an input folder, would destroy
    it (`extract -o WEIGHTS`, `-o LMDB/data.mdb`); `train` and `extract` also check the files
    their inputs name (nets, data, means, snapshots) before any work."""
    from ..io.run_inputs import RunInputs

    outputs = [value for value in (getattr(args, name, None) for name in _OUTPUT_OPTIONS) if isinstance(value, str)]
    if not outputs:
        return
    inputs = RunInputs()
    for name, what in _INPUT_OPTIONS.items():
        value = getattr(args, name, None)
        for given in value if isinstance(value, list) else [value]:
            if isinstance(given, str):
                inputs.add(given, what)
    for output in outputs:
        inputs.check_output(output)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"caffe-compat: warning: {terminal_line(str(message))}\n"


def _seed_fillers(args) -> None:
    """Fillers draw from torch's generator: seeded, a conversion gives the same values on every run."""
    if getattr(args, "seed", None) is None:
        return
    import torch

    if not -2 ** 63 <= args.seed < 2 ** 64:  # the range torch's generator takes
        raise CaffeCompatError(f"--seed {args.seed}: must be between -2**63 and 2**64 - 1")
    torch.manual_seed(args.seed)
    if args.allow_missing_weights:
        print(f"caffe-compat: layers the weights leave unset keep their fillers' values, drawn with "
              f"--seed {args.seed}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    from .caffe_flags import translate

    parser = build_parser()
    try:
        argv = translate(sys.argv[1:] if argv is None else argv)  # caffe's own -solver, -weights, -gpu ...
    except CaffeCompatError as err:
        print(f"caffe-compat: error: {terminal_line(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning  # notes, one line each
    try:
        _refuse_output_over_input(args)
        _seed_fillers(args)
        return args.run(args)
    except CaffeCompatError as err:
        if args.debug:
            traceback.print_exc()
        print(f"caffe-compat: error: {terminal_line(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("caffe-compat: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
