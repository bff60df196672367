#!/usr/bin/env bash
# Reproduce the shipped embedded model from scratch (docs/TRAINING.md, ~2 h on 2 cores):
# the recipe (data, stage 1, stage 2), then two warm restarts of stage 2 (800 more steps each from
# a fresh peak learning rate and another data order), then the test table. Safe to re-run after a
# kill: every step resumes.  Usage: scripts/train_embedded.sh [OUT]  (default runs/embedded)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/embedded}
glm4v=.venv/bin/glm4v
[ -x "$glm4v" ] || glm4v=glm4v

# restart INIT OUT LR SEED: 800 steps of stage 2 again from INIT with the vision side frozen
restart() {
    "$glm4v" train --init "$1" --data "$out/data/train.jsonl" --val-data "$out/data/val.jsonl" \
        --out "$2" --freeze-vision --freeze-vision-adapter --steps 800 --batch-size 32 --lr "$3" \
        --warmup-steps 50 --eval-every 200 --save-every 200 --val-generate 270 --length-pieces 4 \
        --seed "$4" --max-length 2048 --threads 2 --resume
}

"$glm4v" train --recipe embedded --out "$out" --resume
restart "$out/model" "$out/restart" 3e-4 1
restart "$out/restart/model" "$out/restart2" 2e-4 2
"$glm4v" eval synth --model "$out/restart2/model"
echo "the model: $out/restart2/model (copy it into glm4v/assets/embedded/ to ship it)"
