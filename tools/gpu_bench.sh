#!/usr/bin/env bash
# The committed GPU benchmark, with the previous commit measured on the same GPU in the same run:
#   bash tools/gpu_bench.sh BASE_TAR BASE_COMMIT [bench args...]
# BASE_TAR: `git archive` of the previous commit (BASE_COMMIT, its full hash). Builds it in a scratch folder,
# benchmarks its flash_ext alone, then benchmarks this tree (installed first: tools/gpu_check.sh build)
# against SDPA's FLASH and CUDNN backends with --previous pointing at the first run. $OUT (or ./gpu_logs)
# gets the log, this tree's result files (also in bench/results/) and the previous commit's .json.
# FLASH_EXT_COMMIT names this tree's commit (the device's copy has no git history).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
base_tar=$1; base_commit=$2; shift 2
scratch=$(mktemp -d)
tar -xf "$base_tar" -C "$scratch"
( cd "$scratch" && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$scratch/build.log" 2>&1 ) \
  || { tail -40 "$scratch/build.log"; exit 1; }
# This tree's bench script on the previous commit's build (the scratch folder first on the path).
PYTHONPATH="$scratch" FLASH_EXT_COMMIT="$base_commit" python3 bench/bench_attention.py --impls flash_ext \
  --out "$scratch/res" "$@" > "$scratch/bench.log" 2>&1 || { tail -40 "$scratch/bench.log"; exit 1; }
prev=$(ls "$scratch"/res/*.json | head -1)
cp "$prev" "$OUT/previous.json"
python3 bench/bench_attention.py --previous "$prev" "$@" > "$OUT/bench.log" 2>&1 || { tail -40 "$OUT/bench.log"; exit 1; }
cp bench/results/*"$(date +%F)"*.json bench/results/*"$(date +%F)"*.md "$OUT/" 2>/dev/null || true
grep -E "Lowest|Previous|Peak" "$OUT/bench.log"
