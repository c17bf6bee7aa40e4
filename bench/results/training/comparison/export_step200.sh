#!/usr/bin/env bash
# Equal-wall-clock points of the GIRCSE tau-0.05 run: its weights at steps 200 and 250, exported and
# evaluated on the dev sets (K = 1, 5, 10).
set -uo pipefail
cd /work/main
for step in 200; do
  out=/work/runs/matched/gircse-tau0.05-step$step
  python -c "from gircse.training import export_checkpoint; print(export_checkpoint('smollm2-135m', '/work/runs/matched/ckpt$step.safetensors', '$out'))" > $out.export.log 2>&1
  python -m gircse.data.debian eval --model $out --k 1,5,10 --output $out/dev.json > $out.eval.log 2>&1
  echo "step $step eval done $(date)" >> /work/runs/matched/progress.txt
done
