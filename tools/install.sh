#!/usr/bin/env bash
# Installs what is missing: torch (only if absent: a CUDA torch already there is kept), the build and
# test dependencies, and flash_ext itself (editable, built against that torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q ninja pybind11 pytest numpy tqdm "setuptools>=64" wheel build
# transformers (optional: tests/test_transformers.py and the examples' --model hf need it); its tests skip when it
# cannot be installed (no network and no local wheel).
"$PY" -c "import transformers" 2>/dev/null || "$PY" -m pip install -q "transformers>=4.56" \
  || echo "tools/install.sh: transformers could not be installed; tests/test_transformers.py will skip" >&2
# Build unless flash_ext already imports from this checkout (another checkout's install does not count).
here=$(pwd -P)
installed=$(cd / && "$PY" -c "import os, flash_ext; print(os.path.dirname(os.path.dirname(os.path.realpath(flash_ext.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ] || [ "${FLASH_EXT_REBUILD:-0}" = 1 ]; then
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation -e .
fi
"$PY" -c "import torch, flash_ext; print(f'flash_ext {flash_ext.__version__} on torch {torch.__version__}: ' + ('CUDA kernels built' if flash_ext.cuda_built() else 'CPU-only build'))"
