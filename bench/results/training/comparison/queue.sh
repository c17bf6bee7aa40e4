#!/usr/bin/env bash
# Issue 16 queue: (1) dev eval of the tau-0.05 Causal-EOS run (375 steps = 1 epoch of the 6,000 pairs, one
# hard negative); (2) the CPU-kinds benchmark on quiet cores; (3) GIRCSE K=5 with exactly the same
# settings (tau 0.05, one hard negative, lr 1e-4, 375 steps, sum), dev eval at K = 1..20.
set -uo pipefail
cd /work/main
while kill -0 20104 2>/dev/null; do sleep 10; done
out=/work/runs/tau05/causal-eos-tau0.05
python -m gircse.data.debian eval --model $out --k 1 --output $out/dev.json > $out.eval.log 2>&1
echo "tau05 causal-eos eval done $(date)" >> /work/runs/matched/progress.txt
start=$(date +%s)
python -m pytest bench/test_bench_cpu_kinds.py -q -s --bench-out bench/results/cpu-amd-epyc-avx512bf16-2c/cpu-kinds \
  > /work/runs/matched/bench.log 2>&1
echo "cpu-kinds bench done in $(( $(date +%s) - start )) s $(date)" >> /work/runs/matched/progress.txt
out=/work/runs/tau05/gircse-tau0.05
start=$(date +%s)
python -m gircse train --method gircse --k 5 --lr 1e-4 --temperature 0.05 --num-negatives 1 --bf16 --max-length 128 \
  --checkpoint-every 50 --no-progress --out $out > $out.train.log 2>&1
echo "gircse tau05 train done in $(( $(date +%s) - start )) s $(date)" >> /work/runs/matched/progress.txt
python -m gircse.data.debian eval --model $out --k 1,3,5,10,15,20 --output $out/dev.json > $out.eval.log 2>&1
echo "gircse tau05 eval done $(date)" >> /work/runs/matched/progress.txt
