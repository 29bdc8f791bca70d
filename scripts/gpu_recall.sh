#!/usr/bin/env bash
# Associative-recall sweep on one or more GPUs of one host (device tool, launched by the coordinator):
# one `hedgehog recall` process per GPU (pinned with CUDA_VISIBLE_DEVICES, jobs split with --shard I/N,
# all writing into the config's out_dir), each running its share of the (variant, seed) runs side by side
# (--workers). Every run is capped (--set train.max_seconds, computed from the wall budget) so that it
# records its steps and results before the budget ends; then one --report-only builds the table and plots.
# Writes back at most two files: $OUT/r_results.tgz (report, run JSONs, logs, env) and $OUT/r_log.txt (the
# tail of every log), or with WEIGHTS=1 $OUT/r_weights.tgz (final weights in bfloat16, as many as fit in
# 15 MiB) instead of r_log.txt.
#
# Usage (repo root):
#   RECALL_CONFIG=configs/recall_probe.yaml GPUS=1,2 OUT=/tmp/out bash scripts/gpu_recall.sh
# Env: RECALL_CONFIG (config), GPUS (comma list of physical GPU ids; default $CUDA_VISIBLE_DEVICES, else 0),
#   WALL (s from start until everything is written, default 455), WORKERS (runs at once per GPU, default 8),
#   DEVICE (cuda; cpu for a smoke test), STARTUP (s reserved for process spawn/imports, default 30),
#   POST (s reserved after training for evaluation, report and tar, default 40), WEIGHTS (1: return final
#   weights as r_weights.tgz), PYTHON (interpreter, default python3),
#   EXTRA (extra args for every shard, e.g. "--set train.steps=3000").
set -uo pipefail
T0=$(date +%s)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/recall_out}"; mkdir -p "$OUT"
CFG="${RECALL_CONFIG:-configs/recall_probe.yaml}"
GPUS="${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
WALL="${WALL:-455}"; WORKERS="${WORKERS:-8}"; DEVICE="${DEVICE:-cuda}"
STARTUP="${STARTUP:-30}"; POST="${POST:-40}"; PY="${PYTHON:-python3}"; EXTRA="${EXTRA:-}"
LOGS=$(mktemp -d /tmp/recall_logs.XXXX)
elapsed() { echo $(( $(date +%s) - T0 )); }

out_dir=$($PY -c "import yaml; print(yaml.safe_load(open('$CFG'))['out_dir'])") || { echo "cannot read $CFG"; exit 2; }
{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  echo "config $CFG gpus $GPUS wall $WALL workers $WORKERS device $DEVICE extra '$EXTRA'"
  git rev-parse --short HEAD 2>/dev/null
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY -c 'import triton; print("triton", triton.__version__)' 2>/dev/null
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu --format=csv,noheader
  nproc
} >"$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

IFS=, read -ra G <<<"$GPUS"
n=${#G[@]}
train_s=$(( WALL - POST - STARTUP - $(elapsed) ))
job_s=$(( WALL - POST + 15 - $(elapsed) ))  # hard stop of a shard: after the cap, before the report
if (( train_s < 10 )); then echo "WALL=$WALL leaves no training time"; exit 2; fi
echo "per-run cap ${train_s}s, shard timeout ${job_s}s"
pids=()
for i in "${!G[@]}"; do
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  CUDA_VISIBLE_DEVICES=${G[$i]} timeout -k 10 "$job_s" $PY -m hedgehog_attention.cli recall --config "$CFG" \
    --device "$DEVICE" --workers "$WORKERS" --shard "$i/$n" --set "train.max_seconds=$train_s" $EXTRA \
    >"$LOGS/shard$i.log" 2>&1 &
  pids+=($!)
done
( for _ in 1 2 3; do sleep 90; command -v nvidia-smi >/dev/null && \
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; uptime; done ) \
  >"$LOGS/smi.txt" 2>&1 &
smi_pid=$!
for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "shard $i exit $? at $(elapsed)s" | tee -a "$LOGS/env.txt"; done
kill "$smi_pid" 2>/dev/null
timeout -k 5 40 $PY -m hedgehog_attention.cli recall --config "$CFG" --device "$DEVICE" --report-only $EXTRA \
  >"$LOGS/report.log" 2>&1
echo "report exit $? at $(elapsed)s" | tee -a "$LOGS/env.txt"
for f in "$LOGS"/*.txt "$LOGS"/*.log; do echo "=== $f"; tail -n 40 "$f"; done >"$LOGS/r_log.txt" 2>&1
cp -r "$LOGS" "$out_dir/logs" 2>/dev/null
tar czf "$OUT/r_results.tgz" --exclude='*.pt' --exclude='ckpt' "$out_dir"
if [[ "${WEIGHTS:-0}" == 1 ]]; then
  # Second file = final weights (bfloat16 state dicts + config), lowest seed first in config order, as many
  # as fit in 15 MiB; the log tail is then only inside r_results.tgz (at most 2 files come back).
  timeout -k 5 60 $PY - "$out_dir" "$LOGS/w" <<'PYEOF' && tar czf "$OUT/r_weights.tgz" -C "$LOGS" w
import sys, json, pathlib, torch
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]); dst.mkdir(parents=True, exist_ok=True)
cfg = json.loads((src / "config.json").read_text())["config"]
names = [v["name"] for v in cfg["variants"]]
files = sorted((src / "weights").glob("*.pt"), key=lambda p: (int(p.stem.rsplit("_s", 1)[1]), names.index(p.stem.rsplit("_s", 1)[0])))
total, kept = 0, []
for f in files:
    d = torch.load(f, map_location="cpu")
    d["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in d["model"].items()}
    d["note"] = "final weights cast to bfloat16 for transfer (trained in float32); no optimizer state"
    out = dst / f.name
    torch.save(d, out)
    if total + out.stat().st_size > 15 * 2**20:
        out.unlink(); continue
    total += out.stat().st_size; kept.append(f.name)
print("weights kept:", kept, total)
PYEOF
else
  cp "$LOGS/r_log.txt" "$OUT/r_log.txt"
fi
ls -la "$OUT"; echo "done at $(elapsed)s"
