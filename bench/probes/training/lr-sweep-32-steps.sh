#!/usr/bin/env bash
# Issue 16's first lr sweep: both methods at lr 1e-4 / 5e-5 / 2e-5 for 32 steps (bench/results/training/lr-sweep-32-steps/).
#
#   bench/probes/training/lr-sweep-32-steps.sh [ROOT]     (ROOT: where the runs go; default runs/lr-sweep-32-steps)
#
# The same small lr budget for both methods: 32 steps x 16 pairs of the shipped training set, one same-section
# hard negative per query, tau 0.02, no clipping, bf16 autocast, max_length 128, LoRA r 64 / alpha 32, 10% warmup,
# linear decay. Chosen on the Debian dev set (never test data). One job at a time: nothing else on the cores.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(dirname "$0")
root=${1:-runs/lr-sweep-32-steps}
for lr in 1e-4 5e-5 2e-5; do
  for method in causal-eos gircse; do
    ks=$([ $method = gircse ] && echo 1,5,10 || echo 1)
    "$here/train_eval.sh" "$root/$method-lr$lr" $ks --method $method --k 5 --lr $lr --temperature 0.02 \
      --num-negatives 1 --bf16 --max-length 128 --max-steps 32 --checkpoint-every 0 --no-progress
  done
done
