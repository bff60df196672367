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
# the finished stages' records and the latest of them, by number: restart (2b) is 1, restart2 (2c)
# 2, ..., as glm4v.train.cli.restart_folder names them (a text sort puts restart2 before restart,
# and restart10 before restart2)
latest=. newest=0 records=stage.json
for record in "$run"/restart*/stage.json; do
  [ -f "$record" ] || continue
  name=$(basename "$(dirname "$record")")
  number=${name#restart}
  number=${number:-1}
  case $number in *[!0-9]*) continue ;; esac
  records="$records $name/stage.json"
  if [ "$number" -gt "$newest" ]; then latest=$name newest=$number; fi
done
rm -rf "$dest"
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
(cd "$run" && cp --parents $records "$dest/")
mkdir -p "$dest/$latest"
cp -r "$run/$latest/model" "$dest/$latest/model"
[ "$latest" = . ] && model=model || model=$latest/model
set -- $records
echo "carried $run -> $dest: $# finished stage(s), the latest one's $model"
