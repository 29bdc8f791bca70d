#!/usr/bin/env bash
# One device call: GPU correctness tests of the Triton kernels at real sizes, then the speed sweep.
# Usage (device tool, carry .whl): bash benchmarks/gpu_run.sh [TEST_SECONDS] [BENCH_SECONDS] [args to attention_speed.py]
set -o pipefail
TEST_S=${1:-150}; BENCH_S=${2:-330}; shift 2 || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)" | tee -a "$OUT/gpu.txt"
if (( TEST_S > 0 )); then
  timeout "$TEST_S" python3 -m pytest -q -rf tests/test_triton_ops.py -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/pytest.log" | tail -25
fi
if (( BENCH_S > 0 )); then
  timeout "$BENCH_S" python3 benchmarks/attention_speed.py --out "$OUT" "$@" 2> "$OUT/bench.err"
  tail -4 "$OUT/bench.err"
fi
