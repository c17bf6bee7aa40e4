#!/usr/bin/env bash
# Issue 26, experiments 1, in priority order: the default adapter scored in bf16 and fp32, then runs of the
# tau-0.05 GIRCSE setting (lr 1e-4, one hard negative, bf16, max_length 128, K = 5, the 375-step schedule)
# with one change each, paused at step 200 (the logged step-200 point of the shipped run: nDCG@10 0.666).
#
#   bench/probes/training/issue26-queue.sh RUNS_DIR
#
# Runs this checkout's code; appends one line per finished item to RUNS_DIR/progress.txt. Items whose
# output exists are skipped (train_eval.sh), so the queue can be restarted; a run paused by --stop-at-step
# resumes with `gircse train --resume` and the same options.
set -uo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2 ;; esac
R=$(realpath -m "$1")
mkdir -p "$R"
cd "$(dirname "$0")/../../.."
T=bench/probes/training/train_eval.sh
COMMON="--method gircse --k 5 --lr 1e-4 --temperature 0.05 --bf16 --max-length 128 --checkpoint-every 50 --no-progress"
log() { echo "$(date '+%F %T') $*" >> "$R/progress.txt"; }
log "queue start $(git rev-parse --short HEAD)"
for dtype in bfloat16 float32; do
  [ -f "$R/default-$dtype-dev.json" ] || python -m gircse.data.debian eval --model default --dtype $dtype \
    --k 1,5,10 --output "$R/default-$dtype-dev.json" > "$R/default-$dtype-dev.log" 2>&1
  log "default adapter $dtype eval done"
done
$T "$R/clip1-s200" 1,5,10 $COMMON --max-grad-norm 1.0 --stop-at-step 200; log "clip1 done"
$T "$R/lam0-s200" 1,5,10 $COMMON --lam 0 --stop-at-step 200; log "lam0 done"
$T "$R/continue-e2" 1,5,10 --model gircse/default_adapter --method gircse --k 5 --lr 5e-5 --warmup-ratio 0 \
  --temperature 0.05 --bf16 --max-length 128 --max-steps 200 --checkpoint-every 50 --no-progress; log "continue-e2 done"
$T "$R/lam0.5-s200" 1,5,10 $COMMON --lam 0.5 --stop-at-step 200; log "lam0.5 done"
$T "$R/k1" 1,5 --method gircse --k 1 --lr 1e-4 --temperature 0.05 --bf16 --max-length 128 --checkpoint-every 50 \
  --no-progress; log "k1 done"
log "queue end"
