#!/usr/bin/env bash
# Score a training run at an earlier step: export a saved checkpoint as a model and evaluate it on the Debian dev sets.
#
#   bench/probes/training/export_step.sh CHECKPOINT OUT [KS]     (KS default 1,5,10; writes OUT/dev.json)
#
# CHECKPOINT: a copy of a run's checkpoint.safetensors taken at the step wanted (the trainer overwrites the
# file every --checkpoint-every steps). The base model is the embedded SmolLM2-135M. Used for the GIRCSE
# tau-0.05 run at step 200 (bench/results/training/comparison/gircse-tau0.05/step200-dev.json).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [ $# -lt 2 ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2
  exit 2
fi
checkpoint=$(realpath "$1")
out=$(realpath -m "$2")
ks=${3:-1,5,10}
cd "$(dirname "$0")/../../.."
python -c "import sys; from gircse.training import export_checkpoint; print('step', export_checkpoint('smollm2-135m', sys.argv[1], sys.argv[2]))" \
  "$checkpoint" "$out" > "$out.export.log" 2>&1
python -m gircse.data.debian eval --model "$out" --k "$ks" --output "$out/dev.json" > "$out.eval.log" 2>&1
echo "$out: step $(tail -1 "$out.export.log" | cut -d' ' -f2) scored"
