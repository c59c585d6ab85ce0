"""GPU benchmark of attention dropout (issue 19): bf16, batch x seqlen = 16384 tokens, hidden 2048 (head dim 64 /
128 -> 32 / 16 heads), seqlen 1k / 4k / 16k, causal and not, dropout_p = 0.1 (GPT-2's attn_pdrop), forward and
backward (= (fwd + bwd) - fwd), medians of triton.testing.do_bench, as bench/bench_variants.py measures.

Rows per shape:
ours p=0       flash_ext.attention without dropout (the dense path).
ours p=0.1     flash_ext.attention(dropout_p=0.1) (the general path's dropout kernels: Philox per element).
               cost = ours p=0.1 / ours p=0, forward and backward. Target: at most 1.25.
SDPA           torch's scaled_dot_product_attention(dropout_p=0.1) on (B, H, S, D) copies of the inputs (made
               outside the timing) under sdpa_kernel(FLASH_ATTENTION) and (EFFICIENT_ATTENTION) (cuDNN's SDPA
               takes no dropout in torch's dispatch on every version; it is tried too); a backend that refuses
               is null with its first error line. Speed-up = fastest SDPA with dropout / ours with dropout.
               Target: at least 1.0, forward and backward.

    FLASH_EXT_CUDA_DROPOUT=1 python bench/bench_dropout.py [--quick] [--pytest-summary "..."] [--out bench/results]

(FLASH_EXT_CUDA_DROPOUT=1: the dropout kernels' opt-in, docs/ARCHITECTURE.md, "Dropout"; the script sets it.)

Writes bench/results/dropout-<gpu>-<date>-<commit>.json / .md.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
P = 0.1
TOKENS, HIDDEN = 16384, 2048
COST_TARGET, SDPA_TARGET = 1.25, 1.0
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def time_fns(fwd, fwd_bwd, reps, label):
    """(fwd ms, bwd ms, error): medians of do_bench over `reps` runs; bwd = (fwd + bwd) - fwd."""
    res, err = {}, None
    for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                res[what] = statistics.median(do_bench(fn, warmup=25, rep=100) for _ in range(reps))
        except Exception as e:  # noqa: BLE001 -- recorded and printed, the run goes on
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = "; ".join(str(x.message).strip().splitlines()[0] for x in w if str(x.message).strip())[:300]
            err = f"{what}: {type(e).__name__}: {msg}" + (f" ({why})" if why else "")
            print(f"{label}: {err}", flush=True)
            res[what] = None
    f, fb = res.get("fwd"), res.get("fwd+bwd")
    return f, (fb - f if f is not None and fb is not None else None), err


def grad_step(fn, leaves, dout):
    def fwd_bwd():
        out = fn()
        torch.autograd.grad(out, leaves, dout)
    return fwd_bwd


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def bench_shape(head_dim, seqlen, causal, reps, errors):
    nheads, batch = HIDDEN // head_dim, TOKENS // seqlen
    label = f"d{head_dim} s{seqlen} {'causal' if causal else 'full'}"
    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    row = dict(head_dim=head_dim, seqlen=seqlen, batch=batch, nheads=nheads, causal=causal)
    for name, p in (("ours_p0", 0.0), ("ours_drop", P)):
        fn = lambda p=p: flash_ext.attention(q, k, v, causal=causal, dropout_p=p)
        f, b, e = time_fns(fn, grad_step(fn, (q, k, v), dout), reps, f"{label} {name}")
        row[name] = dict(fwd=f, bwd=b)
        if e:
            errors.append(f"{label} {name}: {e}")
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()
    row["sdpa"] = {}
    for backend in SDPA_BACKENDS:
        be = getattr(torch.nn.attention.SDPBackend, backend)

        def fn():
            with torch.nn.attention.sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, dropout_p=P, is_causal=causal)
        f, b, e = time_fns(fn, grad_step(fn, (qt, kt, vt), dt), reps, f"{label} sdpa {backend}")
        row["sdpa"][backend] = dict(fwd=f, bwd=b, error=e)
    for side in ("fwd", "bwd"):
        times = [(t[side], n) for n, t in row["sdpa"].items() if t[side] is not None]
        best = min(times) if times else (None, None)
        row[f"sdpa_best_{side}"] = dict(ms=best[0], backend=best[1])
        row[f"cost_{side}"] = ratio(row["ours_drop"][side], row["ours_p0"][side])
        row[f"speedup_{side}"] = ratio(best[0], row["ours_drop"][side])
    print(f"{label}: ours p0 {row['ours_p0']}, drop {row['ours_drop']}, cost {row['cost_fwd']} / {row['cost_bwd']}, "
          f"sdpa best {row['sdpa_best_fwd']} / {row['sdpa_best_bwd']}", flush=True)
    return row


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def markdown(res):
    lines = [f"# Attention dropout (p = {P}) — {res['gpu']}, commit {res['commit']}, torch {res['torch']}, "
             f"{res['date']}", "",
             f"bf16, {TOKENS} tokens per call, hidden {HIDDEN}; ms, medians of {res['reps']} do_bench run(s); "
             "bwd = (fwd + bwd) - fwd. cost = ours with dropout / ours without (target <= "
             f"{COST_TARGET}); speed-up = fastest SDPA with dropout / ours with dropout (target >= {SDPA_TARGET}).",
             "", f"pytest on this commit and GPU: {res['pytest_summary'] or 'n/a'}", "",
             "| shape | ours p=0 fwd | ours p=0.1 fwd | cost fwd | SDPA best fwd | speed-up fwd | ours p=0 bwd | "
             "ours p=0.1 bwd | cost bwd | SDPA best bwd | speed-up bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        shape = f"d{r['head_dim']} s{r['seqlen']} b{r['batch']} {'causal' if r['causal'] else 'full'}"
        cells = [shape]
        for side in ("fwd", "bwd"):
            best = r[f"sdpa_best_{side}"]
            cells += [fmt(r["ours_p0"][side]), fmt(r["ours_drop"][side]), fmt(r[f"cost_{side}"], ".2f"),
                      f"{fmt(best['ms'])} ({best['backend'] or '-'})", fmt(r[f"speedup_{side}"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "SDPA backends (fwd / bwd ms, or why not):", ""]
    for r in res["rows"]:
        shape = f"d{r['head_dim']} s{r['seqlen']} {'causal' if r['causal'] else 'full'}"
        parts = [f"{n}: {fmt(t['fwd'])} / {fmt(t['bwd'])}" + (f" ({t['error']})" if t["error"] else "")
                 for n, t in r["sdpa"].items()]
        lines.append(f"- {shape}: " + "; ".join(parts))
    if res["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one do_bench run per figure instead of three")
    ap.add_argument("--pytest-summary", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.environ.setdefault("FLASH_EXT_CUDA_DROPOUT", "1")
    global do_bench, flash_ext
    from triton.testing import do_bench
    import flash_ext
    reps = 1 if args.quick else 3
    torch.manual_seed(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    do_bench(lambda: a @ a, warmup=200, rep=2000)  # clocks up first
    del a
    rows, errors = [], []
    for head_dim in (64, 128):
        for seqlen in (1024, 4096, 16384):
            for causal in (False, True):
                rows.append(bench_shape(head_dim, seqlen, causal, reps, errors))
                torch.cuda.empty_cache()
    commit = os.environ.get("FLASH_EXT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    commit = commit[:7]
    gpu = torch.cuda.get_device_name()
    res = dict(commit=commit, gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(),
               pytest_summary=args.pytest_summary, reps=reps, p=P,
               targets=dict(cost_max=COST_TARGET, sdpa_speedup_min=SDPA_TARGET), rows=rows, errors=errors)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"dropout-{gpu.lower().replace(' ', '-')}-{res['date']}-{commit}")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    md = markdown(res)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
