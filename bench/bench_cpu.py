"""CPU benchmark: flash_ext against torch's own CPU scaled_dot_product_attention and the naive
implementation (score matrix materialized), forward time (median) and peak memory of forward+backward
as seqlen grows. Writes bench/results/cpu-<date>.json and .md.

    python bench/bench_cpu.py [--seqlens 1024 2048 4096 8192] [--nheads 8] [--head-dim 64]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F

import flash_ext
from flash_ext.demo import naive_attention, peak_memory

try:
    from tqdm import tqdm
except ImportError:
    def tqdm(it, **_):
        return it

HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    rows = []
    for seqlen in tqdm(args.seqlens, desc="seqlen"):
        q, k, v = (torch.randn(1, seqlen, args.nheads, args.head_dim) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with torch.no_grad():
            t_ours = median_time(lambda: flash_ext.attention(q, k, v), args.reps)
            t_sdpa = median_time(lambda: F.scaled_dot_product_attention(qt, kt, vt), args.reps)
            t_naive = median_time(lambda: naive_attention(q, k, v, False), args.reps)
        m_ours = peak_memory("flash_ext", seqlen, args.nheads, args.head_dim, False, "cpu", torch.float32)
        m_naive = peak_memory("naive", seqlen, args.nheads, args.head_dim, False, "cpu", torch.float32)
        rows.append(dict(seqlen=seqlen, nheads=args.nheads, head_dim=args.head_dim, dtype="fp32", causal=False,
                         flash_ext_ms=t_ours * 1e3, sdpa_ms=t_sdpa * 1e3, naive_ms=t_naive * 1e3,
                         ours_over_sdpa=t_ours / t_sdpa, flash_ext_peak_mib=m_ours / 2**20,
                         naive_peak_mib=m_naive / 2**20))
    date = datetime.date.today().isoformat()
    meta = dict(commit=commit, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, date=date, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cpu-{date}")
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    lines = [f"# CPU benchmark {date}", "",
             f"commit `{commit}`, torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
             f"batch 1, {args.nheads} heads, head_dim {args.head_dim}, non-causal; forward time is the median of "
             f"{args.reps}; peak memory is of one forward+backward (fresh process, peak RSS).", "",
             "| seqlen | flash_ext ms | SDPA (CPU) ms | naive ms | flash_ext / SDPA | flash_ext peak MiB | naive peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seqlen']} | {r['flash_ext_ms']:.1f} | {r['sdpa_ms']:.1f} | {r['naive_ms']:.1f} | "
                     f"{r['ours_over_sdpa']:.2f} | {r['flash_ext_peak_mib']:.0f} | {r['naive_peak_mib']:.0f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
