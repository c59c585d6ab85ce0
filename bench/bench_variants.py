"""GPU benchmark of the masks and score modifiers (issue 15), beside our own plain and causal times on the same
inputs: hidden 2048 (head dim 64 / 128 -> 32 / 16 heads), batch 1, bf16, seqlen 16k and 32k, forward and
backward (= (fwd + bwd) - fwd), medians of triton.testing.do_bench, as bench/bench_attention.py measures.

Rows: causal, and each variant the CUDA kernels run (today the local mask: a sliding window (4096, 0), i.e.
Mistral's pattern, and chunks of 8192 with causal, Llama 4's). The ratio column is variant / causal: a window of
4096 sees 0.44 of the causal area at 16k and 0.23 at 32k (rows see min(i + 1, 4097) keys instead of i + 1), so
the time ratio cannot fall below those.

    python bench/bench_variants.py [--quick] [--pytest-summary "..."]

Writes bench/results/variants-<gpu>-<date>-<commit>.json / .md.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess

import torch
from triton.testing import do_bench

import flash_ext

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "causal": dict(causal=True),
    "window(4096,0)": dict(window_size=(4096, 0)),
    "chunk 8192 + causal": dict(causal=True, attention_chunk=8192),
}


def time_pair(q, k, v, dout, kwargs, reps):
    fwd = lambda: flash_ext.attention(q, k, v, **kwargs)

    def fwd_bwd():
        out = flash_ext.attention(q, k, v, **kwargs)
        torch.autograd.grad(out, (q, k, v), dout)
    # Several do_bench runs, median of their medians (clock and scheduling noise between runs).
    f = statistics.median(do_bench(fwd, warmup=25, rep=100) for _ in range(reps))
    fb = statistics.median(do_bench(fwd_bwd, warmup=25, rep=100) for _ in range(reps))
    return f, fb - f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one do_bench run per figure instead of three")
    ap.add_argument("--pytest-summary", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    reps = 1 if args.quick else 3
    torch.manual_seed(0)
    # Clocks up first (the first config would otherwise run at idle clocks).
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    do_bench(lambda: a @ a, warmup=200, rep=2000)
    rows = []
    for head_dim in (64, 128):
        nheads = 2048 // head_dim
        for seqlen in (16384, 32768):
            q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            dout = torch.randn_like(q)
            base = None
            for name, kw in VARIANTS.items():
                f, b = time_pair(q, k, v, dout, kw, reps)
                if base is None:
                    base = (f, b)
                rows.append(dict(head_dim=head_dim, seqlen=seqlen, variant=name, fwd_ms=f, bwd_ms=b,
                                 fwd_vs_causal=f / base[0], bwd_vs_causal=b / base[1]))
                print(f"d{head_dim} {seqlen} {name}: fwd {f:.3f} ms ({f / base[0]:.3f}x causal), "
                      f"bwd {b:.3f} ms ({b / base[1]:.3f}x causal)", flush=True)
            del q, k, v, dout
    commit = os.environ.get("FLASH_EXT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    commit = commit[:7]
    gpu = torch.cuda.get_device_name()
    res = dict(commit=commit, gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(),
               pytest_summary=args.pytest_summary, reps=reps, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"variants-{gpu.lower().replace(' ', '-')}-{res['date']}-{commit}")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [f"# Masks and score modifiers vs causal: {gpu}, commit {commit}, torch {res['torch']}, {res['date']}",
             "", f"GPU tests on this commit: {args.pytest_summary or '(not given)'}", "",
             "bf16, batch 1, hidden 2048; medians (ms) of do_bench; ratio = variant / causal at the same shape.", "",
             "| head dim | seqlen | variant | fwd ms | fwd / causal | bwd ms | bwd / causal |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['head_dim']} | {r['seqlen']} | {r['variant']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_vs_causal']:.3f} | {r['bwd_ms']:.3f} | {r['bwd_vs_causal']:.3f} |")
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
