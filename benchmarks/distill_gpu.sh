#!/bin/bash
# Issue #7 follow-up, one device call on nvidia-h200-x2 (run from the repo root):
#   1. torch.profiler over one distill step of the SmolLM2-135M architecture (30 layers, 8 x 512,
#      bf16, hedgehog map, online capture) on GPU 0: this tree, then (if BASE_SRC is given) the
#      sources before the overhead fixes, for a before/after on the same card;
#   2. torchrun 1 vs 2 GPUs at global batches 8x512 and 32x512 plus weak scaling (8x512 per GPU).
# Needs: a tokenizer folder ($TOK, default .carry/hh-smollm2: tokenizer.json, tokenizer_config.json)
# and a plain-text file ($TEXT, default .carry/hh-smollm2/kjv.txt). Logs and JSON go to $OUT.
# Time on an H200 x2 host (measured 2026-11-28): build ~15 s, each profile ~20 s, each torchrun
# ~25 s of start-up + eval plus STEPS x 0.3-0.4 s: the whole plan at STEPS=50 needs ~300 s (the
# 240 s call of that day finished the profiles and 3 of the 5 torchruns). AB=1 with BASE_SRC: also
# an alternating before/after step-time A/B (4 processes, ~25 s each).
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/distill_out}; mkdir -p "$OUT"
TOK=${TOK:-.carry/hh-smollm2}; TEXT=${TEXT:-.carry/hh-smollm2/kjv.txt}; STEPS=${STEPS:-40}
PY=python3; command -v python3 >/dev/null || PY=python
{ date -u +%FT%TZ; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'nccl',torch.cuda.nccl.version(),'transformers',transformers.__version__,'gpus',torch.cuda.device_count())"
  git log -1 --format='commit %H' 2>/dev/null; git status --short src benchmarks 2>/dev/null | head; } | tee "$OUT/env.txt"
DEV=${DEV:-cuda}; SEQ=${SEQ:-512}; GB=${GB:-8 32}; PGB=${PGB:-8}  # DEV=cpu SEQ=64 GB=4 PGB=2 LAYERS=2: a dry run
timeout 60 $PY benchmarks/distill_scaling.py build /tmp/smol --tokenizer "$TOK" ${LAYERS:+--layers $LAYERS} || exit 1
P="benchmarks/distill_scaling.py profile --model /tmp/smol --device $DEV --dtype ${DTYPE:-bf16} --batch $PGB --seq-len $SEQ --top 30"
CUDA_VISIBLE_DEVICES=0 timeout 60 $PY $P --out "$OUT/profile_after" 2>&1 | tee "$OUT/profile_after.log" | head -24
timeout ${SCALING_TIMEOUT:-190} $PY benchmarks/distill_scaling.py scaling --model /tmp/smol --text "$TEXT" --device $DEV \
  --dtype ${DTYPE:-bf16} --seq-len $SEQ --global-batches $GB --nprocs 1 2 --weak --per-gpu-batch $PGB --steps "$STEPS" \
  --timeout 80 --out "$OUT/scaling" 2>&1 | grep -v "^|" | tee "$OUT/scaling.log"
cat "$OUT/scaling/distill_scaling.md" 2>/dev/null
if [ -n "$BASE_SRC" ] && [ "${AB:-0}" = 1 ]; then  # alternating A/B of the step time, 20 steps per process
  for i in 1 2; do for src in "$BASE_SRC" src; do
    echo -n "A/B round $i, $src: "; CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD/$src timeout 40 $PY $P --warmup 3 --timed 20 \
      --top 0 2>&1 | grep -o '"wall_ms_per_step_unprofiled": [0-9.]*'
  done; done | tee "$OUT/ab.log"
fi
if [ -n "$BASE_SRC" ]; then  # the same profile on the sources before the fixes
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD/$BASE_SRC timeout 45 $PY $P --out "$OUT/profile_before" 2>&1 \
    | tee "$OUT/profile_before.log" | head -24
fi
true
