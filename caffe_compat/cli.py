"""The `caffe-compat` command: argument parsing, progress and exit codes only."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional

from .errors import CaffeCompatError

EXIT_BAD_INPUT = 2


def _cmd_inspect(args) -> int:
    from .inspect import format_inspection, inspect_net

    info = inspect_net(args.net, args.weights, args.phase, args.dialect)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _cmd_compare(args) -> int:
    from .compare import HEADER, cases_in, compare_case

    paths = [Path(p) for p in args.files]
    if len(paths) == 1 and paths[0].is_dir():
        cases = cases_in(paths[0])
    else:
        npz = [p for p in paths if p.suffix == ".npz"]
        if len(npz) != 1:
            raise CaffeCompatError("compare takes NET.prototxt [WEIGHTS.caffemodel] REF.npz, or a directory")
        proto = next((p for p in paths if p.suffix != ".npz" and p.suffix != ".caffemodel"), None)
        model = next((p for p in paths if p.suffix == ".caffemodel"), None)
        if proto is None and npz[0].with_suffix(".prototxt").exists():
            proto = npz[0].with_suffix(".prototxt")
            model = model or (npz[0].with_suffix(".caffemodel") if npz[0].with_suffix(".caffemodel").exists() else None)
        cases = [(proto, model, npz[0])]
    print(HEADER)
    passed = failed = 0
    for proto, model, npz in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = compare_case(proto, model, npz, args.device, args.rtol, args.grad_rtol)
        except CaffeCompatError as err:
            if len(cases) == 1:
                raise
            print(f"{npz.stem:<24} ERROR: {err}")
            failed += 1
            continue
        for row in rows:
            print(row.format())
            passed += row.ok
            failed += not row.ok
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


def _cmd_convert(args) -> int:
    from .converters.artifact import model_to_caffemodel, save_model
    from .loading import load_net
    from .io.files import read_prototxt

    source = Path(args.source)
    out = Path(args.output)
    if args.weights is None and out.suffix == ".caffemodel":
        model_to_caffemodel(source, out)
        print(f"wrote {out} (Caffe weights)")
        return 0
    if args.weights is None:
        raise CaffeCompatError("convert takes NET.prototxt WEIGHTS.caffemodel -o OUT, or MODEL -o NET.caffemodel")
    net_file = read_prototxt(source, args.dialect)
    net = load_net(net_file, args.weights, phase=args.phase, dialect=args.dialect)
    save_model(net, out, net_file.dialect)
    count = sum(p.numel() for p in net.state_dict().values())
    print(f"wrote {out}: {len(net.layers)} layers, {count:,} values, phase {net.phase}, dialect {net_file.dialect}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caffe-compat", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a net's layers, blobs and parameters")
    p.add_argument("net", help="NET.prototxt (or a caffemodel)")
    p.add_argument("weights", nargs="?", help="WEIGHTS.caffemodel")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], type=str.upper)
    p.add_argument("--dialect", choices=["bvlc", "lifted"], help="override the detected schema dialect")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("compare", help="compare a converted net with Caffe's recorded numbers")
    p.add_argument("files", nargs="+", help="NET.prototxt [WEIGHTS.caffemodel] REF.npz, or a directory of cases")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rtol", type=float, help="forward tolerance (default 1e-5; 1e-4 for nets over 10 layers)")
    p.add_argument("--grad-rtol", type=float, help="gradient tolerance (default 1e-4)")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("convert", help="Caffe -> caffe-compat model, or model -> caffemodel")
    p.add_argument("source", help="NET.prototxt, or a MODEL written by convert/train")
    p.add_argument("weights", nargs="?", help="WEIGHTS.caffemodel")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"], type=str.upper)
    p.add_argument("--dialect", choices=["bvlc", "lifted"])
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("demo", help="run the built-in example end to end")
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder)")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CaffeCompatError as err:
        if args.debug:
            traceback.print_exc()
        print(f"caffe-compat: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("caffe-compat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
