#!/usr/bin/env bash
# Session-2 runner (LM run 2, recall run 3). The latest runs use scripts/gpu_lm.sh (LM run 3) and
# scripts/gpu_recall.sh with configs/recall_final.yaml (recall run 5), launched side by side by scripts/gpu_jobs.sh.
# Full-size runs of `hedgehog lm` and `hedgehog recall` in one GPU call (device tool, kind nvidia-h200-x2):
# the LM sweep on GPU 0 and the recall sweep on GPU 1 (CUDA_VISIBLE_DEVICES per job), both on the
# Trainer, single-process runs side by side (--workers). Reports, run JSONs and logs are tarred to $OUT;
# checkpoints (*.pt) stay on the device machine (too large to return).
# Needs .carry/lm_tokens.npz (written by `hedgehog lm --config configs/lm.yaml --prepare-data ...`).
# Usage (repo root):  OUT=/tmp/out bash scripts/gpu_experiments.sh
#   LM_CONFIG / RECALL_CONFIG / LM_WORKERS / RECALL_WORKERS / JOB_TIMEOUT override the defaults below.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/hedgehog_out}"; mkdir -p "$OUT"
LM_CONFIG="${LM_CONFIG:-configs/lm_gpu.yaml}"; RECALL_CONFIG="${RECALL_CONFIG:-configs/recall_gpu.yaml}"
JOB_TIMEOUT="${JOB_TIMEOUT:-245}"
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/env.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/env.txt"
lm_gpu=0; recall_gpu=$(( ngpu > 1 ? 1 : 0 ))
CUDA_VISIBLE_DEVICES=$lm_gpu timeout -k 10 "$JOB_TIMEOUT" python3 -m hedgehog_attention.cli lm --config "$LM_CONFIG" \
  --device cuda --workers "${LM_WORKERS:-5}" >"$OUT/lm.log" 2>&1 &
lm_pid=$!
CUDA_VISIBLE_DEVICES=$recall_gpu timeout -k 10 "$JOB_TIMEOUT" python3 -m hedgehog_attention.cli recall \
  --config "$RECALL_CONFIG" --device cuda --workers "${RECALL_WORKERS:-12}" >"$OUT/recall.log" 2>&1 &
recall_pid=$!
( sleep 60; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv ) >"$OUT/smi.txt" 2>&1 &
wait $lm_pid; echo "lm exit $?" | tee -a "$OUT/env.txt"
wait $recall_pid; echo "recall exit $?" | tee -a "$OUT/env.txt"
# A short 2-GPU check of the torchrun path (DDP over NCCL, one LM trained by both ranks), when 2 GPUs exist.
if [[ "$ngpu" -gt 1 && "${DDP_CHECK:-1}" == 1 ]]; then
  timeout -k 5 "${DDP_TIMEOUT:-45}" python3 -m torch.distributed.run --nproc_per_node=2 --master_port=29533 \
    -m hedgehog_attention.cli lm --config "$LM_CONFIG" --device cuda --workers 1 --out runs/lm_ddp_check \
    --set train.steps=30 --set train.warmup_steps=5 --set train.log_every=10 --set train.checkpoint_every=30 \
    --set data.max_eval_blocks=16 --set train.max_seconds=null \
    --set "variants=[{name: softmax, attention: softmax}, {name: hedgehog, attention: hedgehog}]" \
    >"$OUT/lm_ddp_check.log" 2>&1
  echo "ddp check exit $?" | tee -a "$OUT/env.txt"
fi
lm_out=$(python3 -c "import yaml,sys; print(yaml.safe_load(open('$LM_CONFIG'))['out_dir'])")
recall_out=$(python3 -c "import yaml,sys; print(yaml.safe_load(open('$RECALL_CONFIG'))['out_dir'])")
tar czf "$OUT/results.tgz" --exclude='*.pt' "$lm_out" "$recall_out" runs/lm_ddp_check 2>/dev/null
ls -la "$OUT"; tail -n 30 "$OUT/lm.log"; tail -n 25 "$OUT/recall.log"
