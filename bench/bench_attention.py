"""GPU benchmark, FlashAttention's setup (docs/ARCHITECTURE.md, "Benchmarks"): batch * seqlen = 16384,
hidden 2048 (head dim 64/128/256 -> 32/16/8 heads), seqlen 512...16384, causal and not, bf16 and fp16, forward and backward,
side by side in one process with torch's SDPA FLASH_ATTENTION and CUDNN_ATTENTION backends on the
same inputs. Medians from triton.testing.do_bench; backward = (fwd+bwd) - fwd, FLOPs 2.5x forward.

Writes bench/results/<gpu>-<date>.json / .md / .png with the commit, GPU, versions, build time and the
pytest summary of the GPU test run that preceded it (--pytest-summary, --build-seconds).

    python bench/bench_attention.py [--quick] [--pytest-summary "..."] [--build-seconds 123]
        [--impls flash_ext,sdpa_flash,sdpa_cudnn] [--previous earlier.json]

--previous adds a column flash_ext / flash_ext of an earlier result file (the previous record, or a build of
the previous commit measured in the same session on the same GPU: a figure from another GPU is not comparable,
and the table says so).
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flash_ext

try:
    from tqdm import tqdm
except ImportError:
    def tqdm(it, **_):
        return it

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ["flash_ext", "sdpa_flash", "sdpa_cudnn"]


def flops(batch, nheads, seqlen, head_dim, causal, direction):
    f = 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return f * (2.5 if direction == "bwd" else 1.0)


def make_fn(impl, q, k, v, causal):
    """q, k, v in (batch, seqlen, nheads, head_dim); SDPA gets the transposed views (no copy)."""
    if impl == "flash_ext":
        return lambda: flash_ext.attention(q, k, v, causal=causal)
    backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    return run


def bench_one(impl, q, k, v, dout, causal):
    fwd = make_fn(impl, q, k, v, causal)
    try:
        fwd()
    except RuntimeError as e:  # a backend that does not take this shape
        return None, None, str(e).splitlines()[0]
    with torch.no_grad():
        t_fwd = do_bench(fwd, warmup=25, rep=100, return_mode="median")

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, (q, k, v), dout)
    t_all = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    return t_fwd, max(t_all - t_fwd, 1e-6), None


def peak_memory(impl, seqlen=16384, nheads=16, head_dim=128, causal=True):
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    fn = make_fn(impl, q, k, v, causal)
    torch.autograd.grad(fn(), (q, k, v), dout)  # warm-up (workspaces, handles)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(), (q, k, v), dout)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="seqlen 1024/4096/16384, bf16 only")
    p.add_argument("--pytest-summary", default="")
    p.add_argument("--build-seconds", type=float, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. sm80 for FLASH_EXT_BACKEND=sm80)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--previous", default=None,
                   help="earlier result .json files of the previous commit, comma-separated: adds flash_ext / previous "
                        "flash_ext (per config the best of their medians)")
    p.add_argument("--self-runs", default=None,
                   help="earlier flash_ext-only .json files of this same tree, comma-separated, run alternately with "
                        "--previous's: flash_ext's figure per config is the best median of these and this run")
    args = p.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; expected a subset of {IMPLS}")
    def load(paths):
        out = []
        for path in (paths or "").split(","):
            if path:
                with open(path) as f:
                    out.append(json.load(f))
        return out
    previous_runs, self_runs = load(args.previous), load(args.self_runs)
    previous = previous_runs[0] if previous_runs else None

    # FLASH_EXT_COMMIT names the commit when the tree was copied without its history (the device tool).
    commit = os.environ.get("FLASH_EXT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    if not re.fullmatch(r"[0-9a-f]{40}", commit or ""):
        if os.environ.get("FLASH_EXT_COMMIT"):  # a short hash cannot be checked on a tree without history
            raise SystemExit(f"FLASH_EXT_COMMIT must be a full 40-hex commit hash, got {commit!r}")
        commit = "unknown"
    gpu = torch.cuda.get_device_name()
    seqlens = [1024, 4096, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
    configs = [(dt, hd, c, s) for dt in dtypes for hd in (64, 128, 256) for c in (False, True) for s in seqlens]
    rows, notes = [], []
    # Two seconds of matmuls first, so that the first configs do not run while the clocks ramp up from idle.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        a @ a
        torch.cuda.synchronize()
    del a
    for dtype, head_dim, causal, seqlen in tqdm(configs, desc="configs"):
        batch, nheads = 16384 // seqlen, 2048 // head_dim
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        for impl in impls:
            t_fwd, t_bwd, err = bench_one(impl, q, k, v, dout, causal)
            if err:
                notes.append(f"{impl} {dtype} d{head_dim} causal={causal} s{seqlen}: {err}")
                continue
            for direction, t in (("fwd", t_fwd), ("bwd", t_bwd)):
                rows.append(dict(impl=impl, dtype=str(dtype).replace("torch.", "").replace("bfloat16", "bf16")
                                 .replace("float16", "fp16"), head_dim=head_dim, causal=causal, seqlen=seqlen,
                                 batch=batch, nheads=nheads, direction=direction, ms=t,
                                 tflops=flops(batch, nheads, seqlen, head_dim, causal, direction) / (t * 1e-3) / 1e12))
        del q, k, v, dout
    # Best of several medians per config, for this tree (--self-runs) and the previous commit (--previous), with the
    # spread between runs of one version: a difference between versions inside that spread is noise.
    spread = {}
    if self_runs:
        rows, spread["this tree"] = best_of(rows, self_runs)
    prev_rows = None
    if previous_runs:
        prev_rows, spread["previous"] = best_of(
            [x for x in previous_runs[0]["rows"] if x["impl"] == "flash_ext"], previous_runs[1:])
    memory = {impl: peak_memory(impl) for impl in ("flash_ext", "sdpa_flash") if impl in impls}

    date = datetime.date.today().isoformat()
    result = dict(commit=commit, gpu=gpu, backend=os.environ.get("FLASH_EXT_BACKEND", "auto"),
                  torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version(), pytest=args.pytest_summary,
                  build_seconds=args.build_seconds, date=date, rows=rows, notes=notes,
                  peak_memory_fwd_bwd_b1_h16_d128_s16384_causal_bytes=memory,
                  previous=None if previous is None else dict(
                      commit=previous["commit"], gpu=previous["gpu"], date=previous["date"],
                      backend=previous.get("backend", "auto"),
                      file=", ".join(os.path.basename(x) for x in args.previous.split(",") if x),
                      runs=len(previous_runs), rows=prev_rows),
                  runs_of_this_tree=1 + len(self_runs), spread=spread)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + f"-{date}"
                        + (f"-{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(result, stem + ".png")
    print(md)


def best_of(rows, runs):
    """rows with each flash_ext figure replaced by the best over rows and the flash_ext rows of runs; and the largest
    relative spread (max / min - 1) between those runs over all configs, with its config."""
    key = lambda x: (x["dtype"], x["head_dim"], x["causal"], x["seqlen"], x["direction"])
    others = [{key(x): x for x in run["rows"] if x["impl"] == "flash_ext"} for run in runs]
    out, worst = [], (0.0, None)
    for row in rows:
        if row["impl"] != "flash_ext":
            out.append(row)
            continue
        cands = [row] + [o[key(row)] for o in others if key(row) in o]
        best = max(cands, key=lambda x: x["tflops"])
        lo = min(x["tflops"] for x in cands)
        if lo > 0 and best["tflops"] / lo - 1 > worst[0]:
            worst = (best["tflops"] / lo - 1, key(row))
        out.append(dict(best))
    return out, dict(max_relative=round(worst[0], 4), config=list(worst[1]) if worst[1] else None)


def markdown(r):
    lines = [f"# {r['gpu']} — {r['date']}", "",
             f"commit `{r['commit']}`; kernel family `{r.get('backend', 'auto')}` (FLASH_EXT_BACKEND); "
             f"torch {r['torch']} (CUDA {r['cuda']}, cuDNN {r['cudnn']}); build {r['build_seconds']} s", "",
             f"GPU tests on this commit: `{r['pytest']}`", "",
             "TFLOP/s (do_bench median); backward = (fwd+bwd) − fwd with 2.5× the forward FLOPs. "
             "Ratios are flash_ext / peer (> 1: flash_ext faster).", ""]
    by = {}
    for row in r["rows"]:
        by[(row["dtype"], row["head_dim"], row["causal"], row["seqlen"], row["direction"], row["impl"])] = row["tflops"]
    prev = r.get("previous")
    prev_by = {}
    if prev:
        for row in prev["rows"]:
            prev_by[(row["dtype"], row["head_dim"], row["causal"], row["seqlen"], row["direction"])] = row["tflops"]
        same_gpu = prev["gpu"] == r["gpu"]
        lines += [f"Previous: `{prev['file']}`, commit `{prev['commit']}`, {prev['gpu']}, {prev['date']}, kernel family "
                  f"`{prev['backend']}`" + ("." if same_gpu else
                                            f" — another GPU than this run's ({r['gpu']}): not comparable."), ""]
    keys = sorted({k[:5] for k in by}, key=lambda k: (k[0], k[4], k[1], k[2], k[3]))
    lines += ["| dtype | dir | head dim | causal | seqlen | flash_ext | SDPA FLASH | SDPA CUDNN | vs FLASH | vs CUDNN |"
              + (" previous | vs previous |" if prev else ""),
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if prev else "")]
    fmt = lambda x: f"{x:.0f}" if x else "—"
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "—"
    worst = None
    for k in keys:
        ours, fl, cu = (by.get(k + (i,)) for i in IMPLS)
        line = (f"| {k[0]} | {k[4]} | {k[1]} | {'yes' if k[2] else 'no'} | {k[3]} | {fmt(ours)} | {fmt(fl)} | "
                f"{fmt(cu)} | {ratio(ours, fl)} | {ratio(ours, cu)} |")
        if prev:
            pv = prev_by.get(k)
            line += f" {fmt(pv)} | {ratio(ours, pv)} |"
            if ours and pv and (worst is None or ours / pv < worst[0]):
                worst = (ours / pv, k)
        lines.append(line)
    if worst:
        k = worst[1]
        lines += ["", f"Lowest flash_ext / previous: {worst[0]:.3f} ({k[0]} {k[4]} d{k[1]} "
                  f"{'causal' if k[2] else 'non-causal'} s{k[3]})."]
    runs = r.get("runs_of_this_tree", 1), (prev or {}).get("runs", 1)
    if max(runs) > 1:
        lines += ["", f"flash_ext: best median of {runs[0]} run(s) of this tree" +
                  (f" and of {runs[1]} run(s) of the previous commit, run alternately" if prev else "") + "."]
        for who, sp in r.get("spread", {}).items():
            if sp.get("config"):
                k = sp["config"]
                lines += [f"Largest spread between runs of {who}: {100 * sp['max_relative']:.1f} % ({k[0]} {k[4]} "
                          f"d{k[1]} {'causal' if k[2] else 'non-causal'} s{k[3]}): differences inside it are noise."]
    mem = r["peak_memory_fwd_bwd_b1_h16_d128_s16384_causal_bytes"]
    if mem:
        lines += ["", "Peak memory of forward+backward, batch 1, 16 heads, head dim 128, seqlen 16384, causal, bf16: " +
                  ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()) +
                  (f" (ratio {mem['flash_ext'] / mem['sdpa_flash']:.3f})" if len(mem) == 2 else "")]
    lines += [""]
    if r["notes"]:
        lines += ["Not measured:", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot")
        return
    rows = [x for x in r["rows"] if x["dtype"] == "bf16"]
    fig, axes = plt.subplots(3, 4, figsize=(18, 11), sharex=True)
    for i, hd in enumerate((64, 128, 256)):
        for j, (causal, direction) in enumerate(((False, "fwd"), (True, "fwd"), (False, "bwd"), (True, "bwd"))):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((x["seqlen"], x["tflops"]) for x in rows if x["impl"] == impl and x["head_dim"] == hd
                             and x["causal"] == causal and x["direction"] == direction)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction}, head dim {hd}, {'causal' if causal else 'non-causal'}")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            if i == 2:
                ax.set_xlabel("seqlen")
    axes[0][0].legend()
    fig.suptitle(f"{r['gpu']} bf16, batch·seqlen = 16k, hidden 2048 — commit {r['commit'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
