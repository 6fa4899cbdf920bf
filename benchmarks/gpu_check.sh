#!/usr/bin/env bash
# On a machine with CUDA: the test suite with CUDA visible, then the CUDA rows of every
# benchmark, each writing its own section of benchmarks/RESULTS.md; within 10 minutes.
# On a machine without CUDA it says so and exits 0, changing nothing.
#
#   bash benchmarks/gpu_check.sh            (from the repository root, project installed)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch here: nothing to check, RESULTS.md unchanged."
  exit 0
fi
"$python" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__)'

failed=()
step() {  # step SECONDS NAME COMMAND...: run with a time limit, note a failure, go on
  local limit=$1 name=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  if ! timeout "$limit" "$@"; then
    failed+=("$name")
  fi
}

step 240 "tests (CUDA visible)" "$python" -m pytest -q -p no:cacheprovider -x
step 60 "lifted loss, CUDA" "$python" benchmarks/lifted_loss.py --device cuda --update-results
step 120 "training, CUDA (bf16/fp16, channels_last)" "$python" benchmarks/train.py --cpu-batch 0 --iterations 3
step 90 "GoogLeNet inference, CUDA" "$python" benchmarks/inference.py --device cuda --seconds 3 --batches 16 64 128
step 30 "LRN, CUDA" "$python" benchmarks/lrn.py --device cuda

if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: failed or timed out: %s\n' "${failed[@]}"
  exit 1
fi
echo "gpu_check: done; see benchmarks/RESULTS.md"
