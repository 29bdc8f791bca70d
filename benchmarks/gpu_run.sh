#!/usr/bin/env bash
# One device call: GPU correctness tests of the Triton kernels at real sizes, and the speed sweep.
# Usage (device tool, carry .whl): bash benchmarks/gpu_run.sh TEST_SECONDS BENCH_SECONDS [attention_speed.py args]
# With two GPUs the tests run on GPU 1 while the benchmark times GPU 0 (timings are not disturbed;
# the CPUs compile both); with one GPU they run one after the other. The tests run as 6 pytest
# processes (compiling the many kernel variants is what takes the time; it is single-threaded).
set -o pipefail
TEST_S=${1:-150}; BENCH_S=${2:-330}; shift 2 || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)" \
  | tee -a "$OUT/gpu.txt"
NGPU=$(nvidia-smi -L | wc -l)
run_tests() {
  local dev=$1 ids=/tmp/test_ids
  CUDA_VISIBLE_DEVICES=$dev python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_triton_ops.py \
    | grep "::" > $ids
  split -n r/6 $ids /tmp/test_ids_part_
  for f in /tmp/test_ids_part_*; do
    ( CUDA_VISIBLE_DEVICES=$dev timeout "$TEST_S" xargs -a "$f" python3 -m pytest -q -s -rf -p no:cacheprovider \
        > "$f.log" 2>&1; echo "pytest part exit $?" >> "$f.log" ) &
  done
  wait
  cat /tmp/test_ids_part_*.log > "$OUT/pytest.log"
}
TP=
if (( TEST_S > 0 )); then
  run_tests $(( NGPU > 1 ? 1 : 0 )) &
  TP=$!
  (( NGPU > 1 )) || wait $TP
fi
if (( BENCH_S > 0 )); then
  CUDA_VISIBLE_DEVICES=0 timeout "$BENCH_S" python3 benchmarks/attention_speed.py --out "$OUT" "$@" 2> "$OUT/bench.err" \
    | tee "$OUT/bench.txt"
  echo "bench exit $?"; tail -3 "$OUT/bench.err"
fi
[[ -n "$TP" ]] && wait $TP
grep -E "passed|failed|FAILED|exit|CHECK FAIL|Error" "$OUT/pytest.log" | cut -c1-1200 | tail -24
