#!/usr/bin/env bash
# Nsight Compute pipe utilisation of the sm90 forward kernel, plain vs softcap vs ALiBi (bf16, batch 1, 16k,
# head dim 64 / 128, one launch each after a warm-up): what limits the score modifiers (docs/ARCHITECTURE.md,
# issue 15 step 3). Prints one line per (head dim, variant): duration, the MUFU (XU), FMA and ALU pipes' share of
# their peak. Needs ncu on the path and flash_ext built (tools/gpu_check.sh build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
metrics=gpu__time_duration.sum,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active
for d in 64 128; do
  for variant in plain softcap alibi; do
    ncu --metrics "$metrics" -k regex:sm90_kernel --launch-skip 1 --launch-count 1 --csv \
      python3 - "$d" "$variant" > "$OUT/ncu_${d}_${variant}.csv" 2> "$OUT/ncu_${d}_${variant}.err" <<'PY'
import sys, torch, flash_ext
d, variant = int(sys.argv[1]), sys.argv[2]
h = 2048 // d
q, k, v = (torch.randn(1, 16384, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
kw = dict(softcap=50.0) if variant == "softcap" else {}
if variant == "alibi":
    kw = dict(alibi_slopes=torch.rand(h, device="cuda") * 0.1)
for _ in range(2):
    flash_ext.attention(q, k, v, **kw)
torch.cuda.synchronize()
PY
    python3 - "$OUT/ncu_${d}_${variant}.csv" "$d" "$variant" <<'PY'
import csv, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, vals = rows[0], rows[1:]
i_name, i_val = head.index("Metric Name"), head.index("Metric Value")
m = {r[i_name]: r[i_val] for r in vals}
short = {"gpu__time_duration.sum": "time", "sm__inst_executed_pipe_xu": "XU(MUFU)%",
         "sm__pipe_fma": "FMA%", "sm__pipe_alu": "ALU%"}
out = []
for key, v in m.items():
    for pre, s in short.items():
        if key.startswith(pre):
            out.append(f"{s}={v}")
print(f"d{sys.argv[2]} {sys.argv[3]}: " + " ".join(out))
PY
  done
done
