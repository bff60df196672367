#!/usr/bin/env bash
# Carry a `glm4v train --recipe` run to another machine: the records of its finished stages
# (stage.json) and the latest finished stage's model folder, no checkpoints (docs/TRAINING.md,
# "Moving a run to another machine"). On the other machine: copy DEST to where the run should live
# and run the recipe with --resume (scripts/train_embedded.sh does) on that folder.
# Usage: scripts/carry_run.sh RUN DEST
set -euo pipefail
run=${1:?usage: scripts/carry_run.sh RUN DEST}
dest=${2:?usage: scripts/carry_run.sh RUN DEST}
if [ ! -f "$run/stage.json" ]; then
  echo "$run: stage 2 has not finished (no $run/stage.json): nothing to carry" >&2
  exit 1
fi
latest=.
for record in $(cd "$run" && ls -d restart*/stage.json 2>/dev/null | sort -V); do
  latest=$(dirname "$record")
done
rm -rf "$dest"
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
(cd "$run" && cp --parents stage.json $(ls -d restart*/stage.json 2>/dev/null) "$dest/")
mkdir -p "$dest/$latest"
cp -r "$run/$latest/model" "$dest/$latest/model"
[ "$latest" = . ] && model=model || model=$latest/model
echo "carried $run -> $dest: $(cd "$dest" && find . -name stage.json | wc -l) finished stage(s), the latest one's $model"
