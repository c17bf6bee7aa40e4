#!/usr/bin/env bash
# Issue 16's fair comparison: Causal-EOS and GIRCSE with the same settings, and GIRCSE with averaged step losses (bench/results/training/comparison/).
#
#   bench/probes/training/comparison.sh [ROOT]     (ROOT: where the runs go; default runs/comparison)
#
# Both methods: one epoch of the 6,000 shipped pairs (375 steps x 16), lr 1e-4 (10% warmup, linear decay),
# tau 0.05, one same-section hard negative per query, no clipping, bf16 autocast, max_length 128, LoRA r 64 /
# alpha 32, K = 5 for GIRCSE; the third run differs from the second only in --step-reduction mean (the
# authors' code). The GIRCSE runs keep a checkpoint every 50 steps: the equal-wall-clock point (step 200)
# comes from a copy of ROOT/gircse-tau0.05/checkpoint.safetensors taken when its log reached step 200 (the
# trainer overwrites that file), scored with export_step.sh. Chosen on the Debian dev set. One job at a time.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
here=$(dirname "$0")
root=${1:-runs/comparison}
common=(--k 5 --lr 1e-4 --temperature 0.05 --num-negatives 1 --bf16 --max-length 128 --no-progress)
"$here/train_eval.sh" "$root/causal-eos-tau0.05" 1 --method causal-eos "${common[@]}" --checkpoint-every 0
"$here/train_eval.sh" "$root/gircse-tau0.05" 1,3,5,10,15,20 --method gircse "${common[@]}" --checkpoint-every 50
"$here/train_eval.sh" "$root/gircse-tau0.05-mean" 1,3,5,10,15,20 --method gircse "${common[@]}" \
  --checkpoint-every 50 --step-reduction mean
