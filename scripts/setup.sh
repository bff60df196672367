#!/usr/bin/env bash
# Create .venv in the repo root and install glm4v into it (idempotent).
# torch is pinned to the CPU wheel this kind of machine carries; a looser requirement would pull a
# multi-GB CUDA build. GPU users: install your own torch into .venv first, set GLM4V_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${GLM4V_KEEP_TORCH:-0}" != "1" ] && ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${extras}]"
# Build the optional C++ decode kernels now rather than at the first chat (never fatal).
python -m glm4v.kernels || true
