#!/usr/bin/env bash
# Issue 16's second lr sweep: Causal-EOS alone at lr 1e-4 / 2e-5 for 150 steps (bench/results/training/lr-sweep-150-steps-causal-eos/).
#
#   bench/probes/training/lr-sweep-150-steps-causal-eos.sh [ROOT]  (default ROOT: runs/lr-sweep-150-steps-causal-eos)
#
# The baseline gets more tuning than GIRCSE here (the conservative direction): 150 steps x 16 pairs, one
# same-section hard negative per query, tau 0.02, no clipping, bf16 autocast, max_length 128, LoRA r 64 /
# alpha 32, 10% warmup, linear decay. Chosen on the Debian dev set (never test data). One job at a time.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(dirname "$0")
root=${1:-runs/lr-sweep-150-steps-causal-eos}
for lr in 1e-4 2e-5; do
  "$here/train_eval.sh" "$root/causal-eos-lr$lr" 1 --method causal-eos --k 5 --lr $lr --temperature 0.02 \
    --num-negatives 1 --bf16 --max-length 128 --max-steps 150 --checkpoint-every 0 --no-progress
done
