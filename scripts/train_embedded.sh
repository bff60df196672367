#!/usr/bin/env bash
# Reproduce the shipped embedded model from scratch (docs/TRAINING.md, ~7 h on 2 cores): the
# embedded recipe runs the data, stage 1 (vision), stage 2 (conversations) and its nine warm
# restarts 2b to 2j, then prints the test table. Safe to re-run after a kill: every stage resumes.
# Usage: scripts/train_embedded.sh [OUT]  (default runs/embedded)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/embedded}
glm4v=.venv/bin/glm4v
[ -x "$glm4v" ] || glm4v=glm4v

"$glm4v" train --recipe embedded --out "$out" --resume
# the recipe's last stage wrote its model folder into the run summary; the stage count lives in the recipe only
python=.venv/bin/python
[ -x "$python" ] || python=python3
model=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["final"])' "$out/summary.json")
echo "the model: $model (copy it into glm4v/assets/embedded/ to ship it)"
