"""The `caffe` tool's own flags on the verbs that mirror it (`train`, `test`, `time`):
`caffe-compat train -solver S -weights W -gpu 0` runs as `caffe train` would. Flags that
map one to one are rewritten into this CLI's options; the others are answered with the
equivalent in one line. gflags spellings are all accepted: `-flag V`, `-flag=V`,
`--flag V`, `--flag=V`."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..errors import CaffeCompatError

VERBS = ("train", "test", "time")
# Flags whose value becomes a positional argument: (verb, flag) -> position among them.
_POSITIONAL = {("train", "solver"): 0, ("test", "model"): 0, ("time", "model"): 0,
               ("test", "weights"): 1, ("time", "weights"): 1}
_RENAMED = {"iterations": "--iterations", "phase": "--phase", "weights": "--weights"}
_ANSWERS = {
    "level": "net state levels are not supported; the nets run at level 0",
    "stage": "net state stages are not supported; use a prototxt without stage rules",
    "sigint_effect": "Ctrl-C always snapshots and stops (the resume command is printed)",
    "sighup_effect": "SIGTERM snapshots and stops; SIGHUP is not handled",
    "solver": "only `train` takes a solver",
    "model": "`train` takes the net from its solver (or --net); -model belongs to test and time",
}


def translate(argv: Sequence[str]) -> List[str]:
    """`argv` with the caffe tool's flags of a train / test / time command rewritten."""
    argv = list(argv)
    verb_at = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if verb_at is None or argv[verb_at] not in VERBS:
        return argv
    verb = argv[verb_at]
    head, rest = argv[:verb_at + 1], argv[verb_at + 1:]
    out: List[str] = []
    positional: List[Tuple[int, str]] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        name, value, used = _caffe_flag(token, rest[i + 1] if i + 1 < len(rest) else None)
        if name is None:
            out.append(token)
            i += 1
            continue
        i += used
        out += _rewrite(verb, name, value, positional)
    return head + [value for _, value in sorted(positional)] + out


def _caffe_flag(token: str, following: Optional[str]) -> Tuple[Optional[str], Optional[str], int]:
    """(flag name, its value, tokens used) when `token` is one of caffe's flags, else (None, None, 1)."""
    if not token.startswith("-") or token in ("-", "--"):
        return None, None, 1
    name, equals, value = token.lstrip("-").partition("=")
    known = name in _RENAMED or name in _ANSWERS or name in ("gpu", "snapshot", "solver", "model")
    # This CLI's own double-dash options (--weights, --iterations, --phase) pass as they are.
    if not known or (token.startswith("--") and name in _RENAMED):
        return None, None, 1
    if equals:
        return name, value, 1
    if following is None or following.startswith("-") and not following.lstrip("-").isdigit():
        raise CaffeCompatError(f"{token}: caffe's flag needs a value")
    return name, following, 2


def _rewrite(verb: str, name: str, value: str, positional: List[Tuple[int, str]]) -> List[str]:
    if (verb, name) in _POSITIONAL:
        if name == "weights" and "," in value:
            raise CaffeCompatError(f"-weights {value}: give one weights file (caffe-compat does not merge several)")
        positional.append((_POSITIONAL[verb, name], value))
        return []
    if name == "weights":
        if "," in value:
            raise CaffeCompatError(f"-weights {value}: give one weights file with --weights (caffe-compat does "
                                   f"not merge several)")
        return ["--weights", value]
    if name in _RENAMED:
        return [_RENAMED[name], value]
    if name == "gpu":
        if value == "all":
            raise CaffeCompatError("-gpu all: run one process per GPU with torchrun (see the README), each with "
                                   "--device cuda")
        if not value.isdigit():
            raise CaffeCompatError(f"-gpu {value}: give a GPU number (it becomes --device cuda:N)")
        return ["--device", f"cuda:{value}"]
    if name == "snapshot":
        if verb == "train" and value.endswith(".solverstate.pt"):
            return ["--resume", value]
        raise CaffeCompatError(f"-snapshot {value}: Caffe's .solverstate cannot be resumed here; give --resume "
                               f"a .solverstate.pt that caffe-compat wrote, or --weights the snapshot's .caffemodel")
    raise CaffeCompatError(f"-{name}: {_ANSWERS[name]}")
