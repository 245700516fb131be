#!/usr/bin/env bash
# A quick side-by-side benchmark run (tiny geometry; the default geometry is `medium`).
# Full sweep as recorded in benchmarks/RESULTS.md: .venv/bin/python benchmarks/bench.py
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/bench.py --geometry tiny --concurrency 1,2 --steps 2 \
    --output-len 32 --prompt-len 8 --modes offline --out benchmarks/out/example "$@"
