#!/usr/bin/env bash
# Full-size runs of `hedgehog recall` and `hedgehog lm` in one GPU call (device tool), concurrently:
# recall's small models leave the GPU mostly idle, so the LM runs share it. Results are tarred to $OUT.
# Needs .carry/lm_tokens.npz (written by `hedgehog lm --config configs/lm.yaml --prepare-data ...`).
# Usage (repo root):  OUT=/tmp/out bash scripts/gpu_experiments.sh [recall] [lm]
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/hedgehog_out}"; mkdir -p "$OUT"
what="${*:-recall lm}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
pids=()
if [[ " $what " == *" recall "* ]]; then
  timeout ${RECALL_TIMEOUT:-320} python3 -m hedgehog_attention.cli recall --config configs/recall.yaml --device cuda \
    --workers 17 --out runs/recall >"$OUT/recall.log" 2>&1 &
  pids+=($!)
fi
if [[ " $what " == *" lm "* ]]; then
  timeout 330 python3 -m hedgehog_attention.cli lm --config configs/lm.yaml --device cuda \
    --workers 5 --out runs/lm >"$OUT/lm.log" 2>&1 &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; echo "job $p exit $?"; done
# Results in one tar; checkpoints (*.pt) stay on the device machine (too large to return).
tar czf "$OUT/results.tgz" --exclude='*.pt' runs/recall runs/lm 2>/dev/null
ls -la "$OUT"; tail -n 25 "$OUT/recall.log" "$OUT/lm.log" 2>/dev/null
