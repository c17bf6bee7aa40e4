#!/usr/bin/env bash
# Issue 16, session 21: the tau-0.05 GIRCSE run with --step-reduction mean (the authors' code), all else identical.
set -uo pipefail
cd /work/main
out=/work/runs/s21/gircse-tau0.05-mean
start=$(date +%s)
python -m gircse train --method gircse --k 5 --lr 1e-4 --temperature 0.05 --num-negatives 1 --bf16 --max-length 128 \
  --step-reduction mean --checkpoint-every 50 --no-progress --out $out > $out.train.log 2>&1
echo "train done in $(( $(date +%s) - start )) s $(date)" >> /work/runs/s21/progress.txt
python -m gircse.data.debian eval --model $out --k 1,3,5,10,15,20 --output $out/dev.json > $out.eval.log 2>&1
echo "eval done $(date)" >> /work/runs/s21/progress.txt
