#!/usr/bin/env bash
# More seeds of the finetuned conversion (issue #5 item 3) on ONE GPU: each seed is a full run of
# `scripts/gpu_conversion.sh fc` (own teacher, own dev split, the 9 methods in 4 processes), the seeds
# side by side. Needs .carry/fc (carried; `hedgehog finetuned-conversion --pack .carry/fc`).
# Back under $OUT: c_fc_seeds.tgz (reports, results.json, logs incl. summary.log; no checkpoints), one file.
# Summarise afterwards (CPU): python -m hedgehog_attention.experiments.seeds <seed dirs>/results.json --out ...
# Usage (repo root):  OUT=/tmp/out GPU=3 SEEDS="1 2" FC_SECONDS=430 bash scripts/gpu_fc_seeds.sh
set -uo pipefail
# 8 processes share the host with other jobs: a few CPU threads each (torch defaults to all cores)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
OUT="${OUT:-/tmp/hedgehog_out}"; mkdir -p "$OUT"
GPU="${GPU:-0}"; SEEDS="${SEEDS:-1 2}"; FC_SECONDS="${FC_SECONDS:-430}"
# no method starts later than this into a process (each process runs 2-3 methods one after another)
METHOD_START_CAP="${METHOD_START_CAP:-$((FC_SECONDS - 110))}"
work=/tmp/fc_seeds; rm -rf "$work"; mkdir -p "$work"
pids=()
for s in $SEEDS; do
  OUT="$work/seed$s" FC_OUT="runs/finetuned_conversion_gpu_seed$s" FC_SECONDS="$FC_SECONDS" \
    FC_GROUPS="$GPU:hedgehog,t2r $GPU:t2r-hh,performer $GPU:1+elu,relu $GPU:cosformer,exp-t1,exp-t2" \
    EXTRA_SET="--set seed=$s --set max_seconds=$METHOD_START_CAP ${EXTRA_SET:-}" \
    bash scripts/gpu_conversion.sh fc >"$work/seed$s.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for s in $SEEDS; do echo "== seed $s"; tail -n 14 "$work/seed$s.log"; done | tee "$work/summary.log"
tar czf "$OUT/c_fc_seeds.tgz" --exclude='*.pt' "$work" runs/finetuned_conversion_gpu_seed* 2>/dev/null
ls -la "$OUT"
