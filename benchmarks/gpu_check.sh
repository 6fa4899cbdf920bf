#!/usr/bin/env bash
# On a machine with CUDA: the test suite with CUDA visible, then the CUDA rows of every
# benchmark; their tables go into one section of benchmarks/RESULTS.md,
# "## CUDA (benchmarks/gpu_check.sh)", leaving the CPU sections as they are. Within 10
# minutes. On a machine without CUDA it says so and exits 0, changing nothing.
#
#   bash benchmarks/gpu_check.sh            (from anywhere; the project installed)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch here: nothing to check, RESULTS.md unchanged."
  exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=()
step() {  # step SECONDS NAME COMMAND...: run with a time limit, keep its output, note a failure
  local limit=$1 name=$2
  shift 2
  printf '\n### %s\n\n```\n' "$name" >> "$log"
  echo "== $name (at most ${limit}s)"
  if ! timeout "$limit" "$@" 2>&1 | tee -a "$log"; then
    failed+=("$name")
  fi
  printf '```\n' >> "$log"
}

step 240 "tests, CUDA visible" "$python" -m pytest -q -p no:cacheprovider
# The lifted loss benchmark adds a CUDA row to each size when CUDA is there (goal: <= 0.2 ms at 128, 64).
step 90 "lifted loss" "$python" benchmarks/lifted_loss.py --sizes 128,64,2 512,128,8 4096,512,8
step 120 "training: fp32 / bf16 / fp16, channels_last" "$python" benchmarks/train.py --cpu-batch 0 --no-data --iterations 3 --no-write
step 90 "GoogLeNet inference: eager, compiled, ONNX Runtime" "$python" benchmarks/inference.py --device cuda --seconds 3 --batches 16 64 128 --no-write
step 30 "LRN" "$python" benchmarks/lrn.py --device cuda --no-write

"$python" - "$log" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import os
import torch
from bench_common import machine_line, write_section

section = "## CUDA (benchmarks/gpu_check.sh)"
body = open(sys.argv[1]).read()
write_section(section, f"{section}\n\n{machine_line(os.getloadavg())} GPU: {torch.cuda.get_device_name()}.\n{body}")
PY

if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: failed or timed out: %s\n' "${failed[@]}"
  exit 1
fi
echo "gpu_check: done; see the CUDA section of benchmarks/RESULTS.md"
