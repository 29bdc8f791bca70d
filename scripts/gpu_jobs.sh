#!/usr/bin/env bash
# Several GPU jobs side by side in ONE device call, each pinned to its own GPUs (device tool, kind
# nvidia-h200-x4): e.g. the kernel benchmark alone on GPU 0 while experiments use GPUs 1-3.
# Each job is "GPUS=COMMAND"; COMMAND runs under bash with CUDA_VISIBLE_DEVICES=GPUS, writes its own
# files under $OUT and its output to /tmp/gpu_jobs/<n>.log. $OUT/jobs.txt gets the machine, versions,
# each job's exit code and seconds, and the end of each log. JOBS_TIMEOUT (s) caps every job.
# Usage (repo root):
#   OUT=/tmp/out JOBS_TIMEOUT=470 bash scripts/gpu_jobs.sh "0=bash benchmarks/gpu_run.sh" "3=bash scripts/gpu_lm.sh"
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/hedgehog_out}"; mkdir -p "$OUT"
logs=/tmp/gpu_jobs; rm -rf "$logs"; mkdir -p "$logs"
summary="$OUT/jobs.txt"
{ date -u +"%F %T UTC"; git rev-parse --short HEAD 2>/dev/null || echo "no git"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$summary" 2>&1
pids=(); t0=$SECONDS
n=0
for job in "$@"; do
  gpus="${job%%=*}"; cmd="${job#*=}"
  echo "job $n: GPUs $gpus: $cmd" >>"$summary"
  ( start=$SECONDS
    CUDA_VISIBLE_DEVICES="$gpus" timeout -k 10 "${JOBS_TIMEOUT:-470}" bash -c "$cmd" >"$logs/$n.log" 2>&1
    echo "job $n exit $? after $((SECONDS - start)) s" >>"$logs/$n.rc" ) &
  pids+=($!); n=$((n + 1))
done
( sleep 90; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader ) >"$logs/smi.txt" 2>&1 &
for p in "${pids[@]}"; do wait "$p"; done
{ echo "all jobs done after $((SECONDS - t0)) s"; cat "$logs"/*.rc; echo "nvidia-smi at 90 s:"; cat "$logs/smi.txt"
  for ((j = 0; j < n; j++)); do echo "===== job $j (last 40 lines)"; tail -n 40 "$logs/$j.log"; done
} >>"$summary" 2>&1
cat "$summary"
