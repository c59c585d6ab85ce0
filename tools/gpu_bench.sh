#!/usr/bin/env bash
# The committed GPU benchmark, with the previous commit measured on the same GPU in the same run:
#   bash tools/gpu_bench.sh BASE_TAR BASE_COMMIT [bench args...]
# BASE_TAR: `git archive` of the previous commit (BASE_COMMIT, its full hash). Builds it in a scratch folder and
# benchmarks its flash_ext and this tree's (installed first: tools/gpu_check.sh build) alternately, twice each, the
# last run of this tree against SDPA's FLASH and CUDNN backends with --previous / --self-runs naming the others. $OUT (or ./gpu_logs)
# gets the log, this tree's result files (also in bench/results/) and each run's .json.
# FLASH_EXT_COMMIT names this tree's commit (the device's copy has no git history).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
base_tar=$1; base_commit=$2; shift 2
scratch=$(mktemp -d)
tar -xf "$base_tar" -C "$scratch"
( cd "$scratch" && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$scratch/build.log" 2>&1 ) \
  || { tail -40 "$scratch/build.log"; exit 1; }
# Alternately: the previous commit (this tree's bench script on its build, the scratch folder first on the path), this
# tree, the previous commit again, then this tree with the peers. Each version's figure per config is the best of its
# two medians, and the table names the spread between runs of one version (differences inside it are noise).
bench_prev() {
  local n=$1; shift
  PYTHONPATH="$scratch" FLASH_EXT_COMMIT="$base_commit" python3 bench/bench_attention.py --impls flash_ext \
    --out "$scratch/prev$n" "$@" > "$scratch/bench_prev$n.log" 2>&1 || { tail -40 "$scratch/bench_prev$n.log"; exit 1; }
  cp "$(ls "$scratch"/prev$n/*.json | head -1)" "$OUT/previous$n.json"
}
bench_prev 1 "$@"
python3 bench/bench_attention.py --impls flash_ext --out "$scratch/self1" "$@" > "$scratch/bench_self1.log" 2>&1 \
  || { tail -40 "$scratch/bench_self1.log"; exit 1; }
cp "$(ls "$scratch"/self1/*.json | head -1)" "$OUT/self1.json"
bench_prev 2 "$@"
python3 bench/bench_attention.py --previous "$OUT/previous1.json,$OUT/previous2.json" --self-runs "$OUT/self1.json" "$@" \
  > "$OUT/bench.log" 2>&1 || { tail -40 "$OUT/bench.log"; exit 1; }
cp bench/results/*"$(date +%F)"*.json bench/results/*"$(date +%F)"*.md "$OUT/" 2>/dev/null || true
grep -E "Lowest|Previous|Peak|spread" "$OUT/bench.log"
