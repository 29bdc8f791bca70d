#!/usr/bin/env bash
# Nsight Compute profile of the fused Triton kernels on ONE GPU (device tool; Firecracker
# machines read the hardware counters). Clocks are left alone (--clock-control none).
# Usage (repo root): bash benchmarks/gpu_ncu.sh NAME T REGEX SKIP COUNT 'CONFIG_JSON'
#   e.g. bash benchmarks/gpu_ncu.sh fc 4096 _fc_ 3 3 '{"design": "fused_chunk"}'
# Writes $OUT/ncu_NAME.txt (details page: speed of light, occupancy, warp stall reasons) and
# $OUT/ncu_NAME_src.csv.gz (per-SASS-instruction stall samples).
set -uo pipefail
NAME=$1; T=$2; REGEX=$3; SKIP=$4; COUNT=$5; CFG=${6:-"{}"}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
rep=/tmp/ncu_$NAME
"$NCU" --clock-control none -k "regex:$REGEX" --launch-skip "$SKIP" --launch-count "$COUNT" --set full \
  --import-source yes -f -o "$rep" python3 benchmarks/ncu_target.py --T "$T" --iters 2 --config "$CFG" 2>&1 | tail -20
"$NCU" -i "$rep.ncu-rep" --page details --print-units base > "$OUT/ncu_$NAME.txt" 2>&1
"$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu_${NAME}_src.csv.gz"
ls -l "$OUT"/ncu_"$NAME"*
