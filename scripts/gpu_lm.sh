#!/usr/bin/env bash
# The from-scratch LM sweep (Table 1 analog) on one GPU: the variants of LM_CONFIG side by side
# (--workers). Needs .carry/lm_tokens.npz (carried). Back under $OUT: l_results.tgz (reports, run
# JSONs, curves; no checkpoints: ~360 MB each) and l_log.txt.
# Usage (repo root):  OUT=/tmp/out [LM_CONFIG=configs/lm_gpu.yaml] [LM_WORKERS=5] [LM_OUT=runs/x] bash scripts/gpu_lm.sh
#   LM_OUT: output folder instead of the config's out_dir (e.g. another seed: EXTRA_SET="--set seed=1")
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/hedgehog_out}"; mkdir -p "$OUT"
LM_CONFIG="${LM_CONFIG:-configs/lm_gpu.yaml}"
PY="${PY:-python3}"
out_dir="${LM_OUT:-$("$PY" -c "import yaml; print(yaml.safe_load(open('$LM_CONFIG'))['out_dir'])")}"
# shellcheck disable=SC2086  # EXTRA_SET is a list of arguments
"$PY" -m hedgehog_attention.cli lm --config "$LM_CONFIG" --device "${DEVICE:-cuda}" --workers "${LM_WORKERS:-5}" \
  --out "$out_dir" ${EXTRA_SET:-} 2>&1 | tee "$OUT/l_log.txt"
rc=${PIPESTATUS[0]}
tar czf "$OUT/l_results.tgz" --exclude='*.pt' "$out_dir" 2>/dev/null
exit "$rc"
