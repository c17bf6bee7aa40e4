#!/usr/bin/env bash
# Issue 16: the Causal-EOS run of comparison/ (as it ran: this script was stopped after its causal-eos
# training; the eval and the GIRCSE run came from queue.sh). No --max-steps, so one epoch of the 6,000
# shipped pairs = 375 steps; lr 1e-4, tau 0.05, one hard negative per query (the default), batch 16,
# no clipping, bf16 autocast, max_length 128, LoRA r 64 / alpha 32, 10% warmup, linear decay.
# Chosen on the Debian dev set only. One job at a time on the 2 cores.
set -euo pipefail
cd /work/main
root=${ROOT:-/work/runs/tau05}
for method in ${METHODS:-causal-eos gircse}; do
  out=$root/$method-tau0.05
  [ -f $out/dev.json ] && continue
  start=$(date +%s)
  python -m gircse train --method $method --k 5 --lr 1e-4 --temperature 0.05 --bf16 --max-length 128 \
    --checkpoint-every 0 --no-progress --out $out > $out.train.log 2>&1
  ks=$([ $method = gircse ] && echo 1,3,5,10,15,20 || echo 1)
  python -m gircse.data.debian eval --model $out --k $ks --output $out/dev.json > $out.eval.log 2>&1
  echo "$method tau=0.05 done in $(( $(date +%s) - start )) s" >> $root/progress.txt
done
echo ALL DONE >> $root/progress.txt
