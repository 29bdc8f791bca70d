#!/usr/bin/env bash
# One device call: GPU correctness tests of the Triton kernels at real sizes, and the speed sweep.
# Usage (device tool, carry .whl): bash benchmarks/gpu_run.sh TEST_SECONDS BENCH_SECONDS [attention_speed.py args]
# With two GPUs the tests run on GPU 1 while the benchmark times GPU 0 (no shared GPU: timings are
# not disturbed; the CPUs compile both); with one GPU they run one after the other.
set -o pipefail
TEST_S=${1:-150}; BENCH_S=${2:-330}; shift 2 || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)" | tee -a "$OUT/gpu.txt"
NGPU=$(nvidia-smi -L | wc -l)
TP=
if (( TEST_S > 0 )); then
  TDEV=$(( NGPU > 1 ? 1 : 0 ))
  ( CUDA_VISIBLE_DEVICES=$TDEV timeout "$TEST_S" python3 -m pytest -q -rf tests/test_triton_ops.py -p no:cacheprovider \
      --durations=6 > "$OUT/pytest.log" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.log" ) &
  TP=$!
  (( NGPU > 1 )) || wait $TP
fi
if (( BENCH_S > 0 )); then
  CUDA_VISIBLE_DEVICES=0 timeout "$BENCH_S" python3 benchmarks/attention_speed.py --out "$OUT" "$@" 2> "$OUT/bench.err" \
    | tee "$OUT/bench.txt"
  echo "bench exit $?"; tail -3 "$OUT/bench.err"
fi
[[ -n "$TP" ]] && wait $TP
grep -E "passed|failed|FAILED|exit|Error" "$OUT/pytest.log" | cut -c1-1500 | tail -20
