#!/usr/bin/env bash
# One device job on ONE GPU (the caller sets CUDA_VISIBLE_DEVICES; this script never changes it):
# the GPU correctness tests of the Triton kernels at real sizes, then the speed benchmark
# (benchmarks/attention_speed.py: fla warmed first, then the config sweep, then the full table).
# Usage (repository root, carry .whl = the fla 0.6.0 wheels):
#   bash benchmarks/gpu_run.sh TEST_SECONDS BENCH_SECONDS [attention_speed.py args]
# Env: NPROC (pytest processes, default 8), PREFIX (file prefix under $OUT, default k_), TEST_K (a
#   pytest -k expression: only those tests),
#   SWEEP_S / SWEEP_ARGS: a separate attention_speed.py process for the config sweep (run before
#   the main one, so that a variant that crashes the compiler cannot take the main table with it;
#   its JSON lands in sweep/attention_speed.json), limited to SWEEP_S seconds.
# Writes back exactly two files: $OUT/${PREFIX}log.txt (everything printed) and
# $OUT/${PREFIX}results.tgz (JSON, pytest log, bench stderr, nvidia-smi, versions).
set -o pipefail
# (with one argument or none, "shift 2" would shift nothing: TEST_S would reach attention_speed.py)
TEST_S=${1:-95}; BENCH_S=${2:-330}; shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-/tmp/out}; PREFIX=${PREFIX:-k_}; NPROC=${NPROC:-8}
W=/tmp/${PREFIX}work; rm -rf "$W"; mkdir -p "$W" "$OUT"
LOG="$OUT/${PREFIX}log.txt"
export PYTHONUNBUFFERED=1
main() {
  date -u
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || echo "WHEELS NOT INSTALLED"
  export PYTHONPATH=/tmp/site:$PWD/src
  echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  local sel=(); [[ "$CUDA_VISIBLE_DEVICES" =~ ^[0-9]+$ ]] && sel=(-i "$CUDA_VISIBLE_DEVICES")
  nvidia-smi "${sel[@]}" --query-gpu=index,name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used,utilization.gpu \
    --format=csv | tee "$W/gpu.txt"
  python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'gpu', torch.cuda.get_device_name(), 'sms', torch.cuda.get_device_properties(0).multi_processor_count)" \
    | tee -a "$W/gpu.txt"
  git log -1 --format='commit %H %cd' 2>/dev/null | tee -a "$W/gpu.txt"
  git status --short -- src benchmarks tests 2>/dev/null | head -20 | tee -a "$W/gpu.txt"
  if (( TEST_S > 0 )); then
    local t0=$SECONDS ids=$W/test_ids
    python3 -m pytest --collect-only -q -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} tests/test_triton_ops.py \
      | grep "::" > "$ids"
    split -n r/"$NPROC" "$ids" "$W/test_ids_part_"
    # SIGINT at the limit: pytest then still prints its summary (failures with their causes)
    [[ -s "$ids" ]] || echo "NO TESTS COLLECTED (TEST_K=$TEST_K)"
    for f in "$W"/test_ids_part_*; do
      # fewer tests than processes leaves empty parts: pytest without ids would run every test file
      [[ -s "$f" ]] || continue
      ( mapfile -t part < "$f"
        timeout -s INT -k 10 "$TEST_S" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider "${part[@]}" \
          > "$f.log" 2>&1
        echo "pytest part exit $?" >> "$f.log" ) &
    done
    wait
    cat "$W"/test_ids_part_*.log > "$W/pytest.log"
    echo "tests took $(( SECONDS - t0 )) s"
    grep -E "CHECK FAIL|passed|failed|FAILED|Error|exit|Interrupt" "$W/pytest.log" | cut -c1-600
  fi
  if [[ -n "$SWEEP_ARGS" ]] && (( ${SWEEP_S:-0} > 0 )); then
    mkdir -p "$W/sweep"
    timeout "$SWEEP_S" python3 benchmarks/attention_speed.py --out "$W/sweep" --backends "" --extra-backends "" --seq-lens "" \
      --no-decode $SWEEP_ARGS 2>&1
    echo "sweep exit $?"
  fi
  if (( BENCH_S > 0 )); then
    # progress lines (stderr) and the final table (stdout) both into the log: a run cut by the
    # outer time limit still leaves every finished row there
    timeout "$BENCH_S" python3 benchmarks/attention_speed.py --out "$W" "$@" 2>&1
    echo "bench exit $?"
  fi
  date -u
}
main "$@" 2>&1 | tee "$LOG"
tar czf "$OUT/${PREFIX}results.tgz" -C "$W" . && ls -l "$OUT"
