#!/usr/bin/env bash
# One device call: build (timed), the whole test suite with the default family, the CUDA tests again
# with FLASH_EXT_BACKEND=sm80, compute-sanitizer memcheck and racecheck on small cases, the SASS check
# (HGMMA in the sm90 kernels) and the ptxas resource report. Logs in $OUT (or ./gpu_logs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1

t0=$(date +%s.%N)
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -v --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
t1=$(date +%s.%N)
build_s=$(python3 -c "print(round($t1 - $t0, 1))")
echo "$build_s" > "$OUT/build_seconds.txt"
grep -E "flash_ext: building" "$OUT/build.log"
echo "build: ${build_s}s"

timeout 480 python3 -m pytest tests -q -rs -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/pytest_default.log" 2>&1
rc1=$?
FLASH_EXT_BACKEND=sm80 timeout 300 python3 -m pytest tests -q -rs -k "cuda" -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/pytest_sm80.log" 2>&1
rc2=$?

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
compute-sanitizer --tool memcheck --error-exitcode 3 python3 tools/sanitize_cases.py > "$OUT/memcheck.log" 2>&1
rc3=$?
compute-sanitizer --tool racecheck --error-exitcode 3 python3 tools/sanitize_cases.py > "$OUT/racecheck.log" 2>&1
rc4=$?
unset PYTORCH_NO_CUDA_MEMORY_CACHING

so=$(python3 -c "import flash_ext._C as c; print(c.__file__)")
cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>/dev/null
hgmma=$(grep -c HGMMA "$OUT/sass.txt" || true)
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -40 > "$OUT/ptxas_summary.txt"

echo "== summary =="
echo "default family: $(tail -1 "$OUT/pytest_default.log") (rc $rc1)"
echo "sm80 family:    $(tail -1 "$OUT/pytest_sm80.log") (rc $rc2)"
echo "memcheck:       $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tr '\n' ' ') (rc $rc3)"
echo "racecheck:      $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.log" | tr '\n' ' ') (rc $rc4)"
echo "HGMMA instructions in the built library: $hgmma"
echo "build seconds: $build_s"
