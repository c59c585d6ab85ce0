#!/usr/bin/env bash
# GPU checks on the device, in stages (default: all), logs in $OUT (or ./gpu_logs):
#   build     pip install -e . (timed; skipped when flash_ext is already built in this tree)
#   default   the whole test suite with the default kernel family (sm90 on an H200 where it applies)
#   sm80      the CUDA tests again with FLASH_EXT_BACKEND=sm80
#   varlen90  tests/test_varlen.py's CUDA cases with the sm90 varlen backward switched on (FLASH_EXT_SM90_VARLEN_BWD=1;
#             not in the default stages until it has passed: docs/ARCHITECTURE.md, "Variable-length batches")
#   sanitize  compute-sanitizer memcheck and racecheck on small cases (tools/sanitize_cases.py)
#   sass      HGMMA count in the built library and the ptxas resource summary
# Usage: bash tools/gpu_check.sh [stage ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-build default sm80 sanitize sass}
has() { [[ " $stages " == *" $1 "* ]]; }
summary=()

if has build; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
  if python3 -c "import flash_ext; assert flash_ext.cuda_built()" 2>/dev/null; then
    summary+=("build: already built")
  else
    t0=$(date +%s.%N)
    FLASH_EXT_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -v --no-build-isolation -e . \
      > "$OUT/build.log" 2>&1 \
      || { tail -60 "$OUT/build.log"; exit 1; }
    build_s=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
    echo "$build_s" > "$OUT/build_seconds.txt"
    summary+=("build: ${build_s}s; $(grep -m1 -o 'flash_ext: building[^;]*' "$OUT/build.log")")
    grep -E "registers|spill" "$OUT/build.log" | grep -E "[1-9][0-9]* bytes spill" | head > "$OUT/spills.txt"
    summary+=("ptxas lines with spills: $(wc -l < "$OUT/spills.txt") (of $(grep -c "bytes spill" "$OUT/build.log") reports)")
  fi
fi
if has default; then
  timeout ${DEFAULT_TIMEOUT:-500} python3 -m pytest tests -q -rs -p no:cacheprovider > "$OUT/pytest_default.log" 2>&1
  summary+=("default family: $(tail -1 "$OUT/pytest_default.log") (rc $?)")
fi
if has sm80; then
  FLASH_EXT_BACKEND=sm80 timeout ${SM80_TIMEOUT:-400} python3 -m pytest tests -q -rs -k cuda -p no:cacheprovider \
    > "$OUT/pytest_sm80.log" 2>&1
  summary+=("sm80 family: $(tail -1 "$OUT/pytest_sm80.log") (rc $?)")
fi
if has varlen90; then
  FLASH_EXT_SM90_VARLEN_BWD=1 timeout ${VARLEN90_TIMEOUT:-200} python3 -m pytest tests/test_varlen.py -q -rs -k cuda \
    -p no:cacheprovider > "$OUT/pytest_varlen90.log" 2>&1
  summary+=("sm90 varlen backward: $(tail -1 "$OUT/pytest_varlen90.log") (rc $?)")
fi
if has sanitize; then
  # Each tool run is capped (SANITIZE_TIMEOUT seconds, normally ~30-60 s) and dumps the Python stacks shortly
  # before the cap, so a hung run reports where it was instead of eating the rest of the device time.
  san_t=${SANITIZE_TIMEOUT:-150}
  for tool in memcheck racecheck; do
    # In a process group of its own, so that what the sanitizer leaves behind is ended by its id alone.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 FLASH_EXT_SANITIZE_DUMP_AFTER=$((san_t - 30)) \
      setsid timeout -k 10 "$san_t" compute-sanitizer --tool $tool python3 tools/sanitize_cases.py \
      > "$OUT/$tool.log" 2>&1 &
    san_pid=$!
    wait "$san_pid"
    rc=$?
    kill -- "-$san_pid" 2>/dev/null
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      summary+=("$tool: TIMED OUT after ${san_t}s; last case line: $(grep -E ': (forward|backward) done' "$OUT/$tool.log" | tail -1)")
    else
      summary+=("$tool: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/$tool.log" | tr '\n' ' ')")
    fi
  done
fi
if has sass; then
  so=$(python3 -c "import flash_ext._C as c; print(c.__file__)")
  summary+=("HGMMA instructions in the library: $(cuobjdump --dump-sass "$so" 2>/dev/null | grep -c HGMMA)")
fi
echo "== summary =="
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
