#!/usr/bin/env bash
# The one command a GPU session runs (docs/gpu.md): the whole check, canaries and the pip install included,
# in one call that ends inside the budget with its report written.
#
#   bash bench/gpu_run.sh OUT_DIR [more bench.gpu_check arguments]
#
# OUT_DIR (default: $OUT, the device tool's output folder) receives gpu_check.json / .md (rewritten after
# every cell), gpu_check.log (everything printed), pip_install.log and gpu_check_traceback.txt (the stacks,
# if the watchdog had to kill the run). GPU_CHECK_BUDGET_S (default 420) is the check's budget from process
# start; `timeout` is only the last resort behind the check's own watchdog. PYTHON (default python3).
set -uo pipefail
out="${1:-${OUT:?give an output directory (or set OUT)}}"
shift $(( $# > 0 ? 1 : 0 ))
budget="${GPU_CHECK_BUDGET_S:-420}"
python="${PYTHON:-python3}"
mkdir -p "$out" && out="$(cd "$out" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GIRCSE_NO_JIT=1 PYTHONUNBUFFERED=1
timeout -k 10 "$(( ${budget%.*} + 30 ))" "$python" -u -X faulthandler -m bench.gpu_check --out "$out" \
    --budget-s "$budget" --canary --pip-install "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
