#!/usr/bin/env bash
# Compiles every kernel instantiation (csrc/kernels/instantiations/*.cu) with nvcc alone, for sm_80 and
# sm_90a, printing ptxas' register/spill report to build/kernels/ptxas.log. No GPU and no torch needed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/kernels
mkdir -p "$out"
: > "$out/ptxas.log"
files=(csrc/kernels/instantiations/*.cu)
if [ ! -e "${files[0]}" ]; then
  echo "no kernel instantiations to compile"
  exit 0
fi
jobs=${MAX_JOBS:-$(nproc)}
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} sh -c '
  f={}; o='"$out"'/$(basename "$f" .cu).o
  nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Xptxas -v \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
    -c "$f" -o "$o" > "$o.log" 2>&1 || { cat "$o.log"; exit 1; }
' || exit 1
cat "$out"/*.o.log >> "$out/ptxas.log"
spills=$(grep -E "[1-9][0-9]* bytes spill" "$out/ptxas.log" | wc -l || true)
echo "compiled ${#files[@]} kernel files for sm_80 and sm_90a; ptxas lines reporting spills: $spills"
