#!/usr/bin/env bash
# The GPU session's one prepared command (device time is scarce: run this, then give the machine back).
# From the repository root on the GPU machine (its own torch, transformers, no registry):
#     bash tools/gpu_session.sh [OUT_DIR]
# 1. the device-tier tests on real CUDA (and the simulated device), the CUDA probe tests, blocks in
#    halves and the loss (on CUDA: bit-identical to cross_entropy?) (~1-2 min);
# 2. tools/gpu_check.py: exactness, the 1.5B speed runs, planned vs measured memory (<= 8 min).
# Writes OUT_DIR/tests.log, OUT_DIR/gpu_check.log and OUT_DIR/gpu_check.json.
set -uo pipefail
out="${1:-${OUT:-gpu-session}}"
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv > "$out/gpu.txt" 2>&1
timeout 240 python -m pytest -q -x tests/test_device_tier.py tests/test_plan_gpu.py tests/test_split_blocks.py > "$out/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$out/tests.log"
tail -3 "$out/tests.log"
timeout 480 python tools/gpu_check.py --work "${TMPDIR:-/tmp}/lomo-gpu-check" --json-out "$out/gpu_check.json" > "$out/gpu_check.log" 2>&1
echo "gpu_check rc=$?" | tee -a "$out/gpu_check.log"
tail -12 "$out/gpu_check.log"
