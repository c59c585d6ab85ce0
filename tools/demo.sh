#!/usr/bin/env bash
# The README's main job: install what is missing, then run the demo on the best device present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec ${PYTHON:-python3} -m flash_ext.demo "$@"
