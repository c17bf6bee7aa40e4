#!/usr/bin/env bash
# Train one run with `gircse train`, then score it on the Debian dev sets (RUN/dev.json).
#
#   bench/probes/training/train_eval.sh RUN KS [gircse train options...]
#
# RUN: the run directory (`--out`: model, checkpoint, train_config.json, train_log.jsonl; dev.json is added).
# KS: the K values to score, comma-separated (1 for the one-embedding methods such as causal-eos).
# The logs go next to it (RUN.train.log, RUN.eval.log). A run whose dev.json exists is skipped, and one with a
# checkpoint is continued with --resume, so a sweep can be restarted. Runs this repository's code from its
# root, whatever the caller's directory.
# To publish a run: copy RUN/{train_config.json,train_log.jsonl,dev.json} to bench/results/training/GROUP/NAME/
# and add its row (with this command) to bench/results/README.md.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [ $# -lt 2 ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2
  exit 2
fi
run=$(realpath -m "$1")
ks=$2
shift 2
cd "$(dirname "$0")/../../.."
if [ -f "$run/dev.json" ]; then
  echo "$run: dev.json exists, skipped"
  exit 0
fi
mkdir -p "$(dirname "$run")"
start=$(date +%s)
resume=()
if [ -f "$run/checkpoint.safetensors" ]; then
  resume=(--resume)  # gircse train refuses to start over a checkpointed run
fi
python -m gircse train "$@" ${resume[@]+"${resume[@]}"} --out "$run" > "$run.train.log" 2>&1
python -m gircse.data.debian eval --model "$run" --k "$ks" --output "$run/dev.json" > "$run.eval.log" 2>&1
echo "$run: trained and scored in $(( $(date +%s) - start )) s"
