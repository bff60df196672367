#!/usr/bin/env bash
# Set up (package, test tools, headless Chromium for the browser test), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve,test
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: chromium missing and not installable here; the browser test will be skipped" >&2
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
