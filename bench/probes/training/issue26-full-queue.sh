#!/usr/bin/env bash
# Issue 26, experiments 2: the gradient-clipping setting (max_grad_norm 1.0) taken to the end of the 375-step
# schedule for GIRCSE, and the same care for Causal-EOS (its clipped run scored at step 200, then taken to the
# end). Continues the step-200 runs of issue26-queue.sh and the clipped Causal-EOS run paused at step 100:
#
#   bench/probes/training/issue26-full-queue.sh RUNS_DIR
#
# RUNS_DIR must hold clip1-s200 (finished at step 200, with its checkpoint) and eos-clip1-s200 (a checkpoint).
# Each step-200 run is copied before it is continued, so both points stay scored. Appends one line per
# finished item to RUNS_DIR/progress.txt; items whose dev.json exists are skipped (train_eval.sh).
set -uo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2 ;; esac
R=$(realpath -m "$1")
cd "$(dirname "$0")/../../.."
T=bench/probes/training/train_eval.sh
CLIP="--lr 1e-4 --temperature 0.05 --bf16 --max-length 128 --checkpoint-every 50 --no-progress --max-grad-norm 1.0"
GIRCSE="--method gircse --k 5 $CLIP"
EOS="--method causal-eos --k 5 --num-negatives 1 $CLIP"
log() { echo "$(date '+%F %T') $*" >> "$R/progress.txt"; }
# continue RUN_AT_200 as RUN_FULL: a copy of the paused run without its step-200 scores
fork() { [ -d "$R/$2" ] || { cp -r "$R/$1" "$R/$2" && rm -f "$R/$2/dev.json"; }; }
log "full queue start $(git rev-parse --short HEAD)"
fork clip1-s200 clip1
$T "$R/clip1" 1,5,10 $GIRCSE; log "clip1 (375 steps) done"
$T "$R/eos-clip1-s200" 1 $EOS --stop-at-step 200; log "eos-clip1-s200 done"
fork eos-clip1-s200 eos-clip1
$T "$R/eos-clip1" 1 $EOS; log "eos-clip1 (375 steps) done"
log "full queue end"
