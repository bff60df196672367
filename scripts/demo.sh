#!/usr/bin/env bash
# Set up, then chat about an example image with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
exec .venv/bin/glm4v chat --image examples/shapes.png "What colour is the circle?"
