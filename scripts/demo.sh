#!/usr/bin/env bash
# Set up, then chat about an example image with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
exec .venv/bin/glm4v chat --image examples/counting.png "How many stars are there in the image?"
