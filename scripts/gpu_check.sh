#!/usr/bin/env bash
# The checks for a lent GPU machine, in one call (its time is short): the CUDA tests, a chat with
# the embedded model on the GPU, the decode GEMVs at official widths (scripts/gpu_gemv_sweep.py)
# and `glm4v bench --device cuda`. Uses the machine's own python3 (torch with CUDA, Triton) with
# this checkout on PYTHONPATH; every log goes under $OUT (the device tool brings it back).
#   run: scripts/gpu_check.sh          (BENCH_ARGS="--lm-layers 8" scripts/gpu_check.sh for more)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/glm4v-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# The CPU decode kernels would compile for a minute here and a GPU run never uses them.
export GLM4V_NO_KERNELS=1
step() { echo; echo "== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/machine.txt"

step "CUDA tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_gemv.py tests/test_quant.py tests/test_engine.py \
  2>&1 | tee "$OUT/tests.log" | tail -15

step "chat on the GPU (embedded model)"
timeout 90 python3 -m glm4v.cli chat --device cuda --image examples/shapes.png "What colour is the circle?" 2>&1 | tail -5 | tee "$OUT/chat.log"

step "decode GEMVs at official widths"
timeout 180 python3 scripts/gpu_gemv_sweep.py "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" | tail -40

step "glm4v bench --device cuda"
timeout 330 python3 -m glm4v.cli bench --device cuda --repeats 5 --decode-tokens 32 ${BENCH_ARGS:-} --json \
  > "$OUT/bench.json" 2> "$OUT/bench.err"
echo "exit $?"; tail -3 "$OUT/bench.err"
python3 -c "import json, sys; from glm4v.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" \
  "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
step "done"
