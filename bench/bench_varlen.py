"""GPU benchmark of variable-length (packed) attention (issue 16): bf16, hidden 2048 (head dim 64 / 128 -> 32 / 16
heads), causal and not, forward and backward (= (fwd + bwd) - fwd), medians of triton.testing.do_bench, as
bench/bench_variants.py measures.

The batch: sequence lengths drawn uniformly from 128..8192 (torch.Generator seeded 0) until they add up to 65536
tokens, the last one cut so that the total is exactly 65536. One packed q, k, v of (65536, nheads, head_dim) and
cu_seqlens from those lengths serve every row of a shape. Rows, each against flash_ext.attention_varlen on it:

padded      flash_ext.attention on the same sequences padded to one dense batch (batch = number of sequences,
            seqlen = the longest), no mask: what the varlen call saves. Padding costs the pairs the padded batch
            computes but nobody needs, so the bound is padded time x real pairs / padded pairs x 1.15, with
            real pairs = sum of L^2 (causal: L (L + 1) / 2) and padded pairs = batch x maxlen^2 (causal:
            batch x maxlen (maxlen + 1) / 2). Target: varlen time / bound <= 1.0, forward and backward.
dense mean  flash_ext.attention on a dense batch of the mean length (seqlen = the mean rounded to a multiple of
            128, batch = 65536 / that seqlen rounded, at least 1): the kernels' efficiency at this work size.
            TFLOP/s as bench/bench_attention.py counts them: 4 x nheads x head_dim x sum of L^2 forward (halved
            when causal: L^2 / 2, not L (L + 1) / 2), 2.5x that backward; the varlen call is credited with its
            real sequences only. Target: varlen TFLOP/s >= 0.90x the dense mean-length TFLOP/s.
nested      torch's scaled_dot_product_attention on nested jagged tensors (torch.nested.nested_tensor_from_jagged
            of the same packed q, k, v and int64 offsets, layout torch.jagged, transposed to (B, H, j, D), built once
            outside the timing) with is_causal, under sdpa_kernel(FLASH_ATTENTION); the backward takes the gradients
            of the packed q, k, v through the output's values(). Speed-up = nested time / varlen time. Target: at
            least 1.3, forward and backward. A refused or failing call is recorded as null with the first line of
            its exception (and of what torch logged or warned about why); the run goes on.

A row whose call raises is printed and recorded as null too. max diff = max |varlen - nested| of the forward outputs.

    python bench/bench_varlen.py [--quick] [--pytest-summary "..."] [--out bench/results]

Writes bench/results/varlen-<gpu>-<date>-<commit>.json / .md.
"""
import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOTAL, MIN_LEN, MAX_LEN, HIDDEN = 65536, 128, 8192, 2048
DENSE_MEAN_TARGET, BOUND_SLACK, NESTED_TARGET = 0.90, 1.15, 1.3
do_bench = flash_ext = None  # imported in main(), so that --help runs without a GPU stack


def draw_lengths(total=TOTAL, lo=MIN_LEN, hi=MAX_LEN, seed=0):
    """Lengths uniform in lo..hi (both included) from a generator seeded seed, until they sum to total; the last one
    cut so that the sum is exactly total (every length >= 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(lo, hi + 1, (1,), generator=g)), total - sum(lengths)))
    return lengths


def pairs(lengths, causal):
    """Visible (query, key) pairs of these sequences: L^2 each, causal L (L + 1) / 2."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def tflops(sum_sq, nheads, head_dim, causal, direction, ms):
    """bench_attention.py's count: 4 nheads head_dim L^2 per sequence, / 2 causal, x 2.5 backward."""
    if ms is None or ms <= 0:
        return None
    f = 4 * nheads * head_dim * sum_sq / (2 if causal else 1) * (2.5 if direction == "bwd" else 1.0)
    return f / (ms * 1e-3) / 1e12


def first_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def time_fns(fwd, fwd_bwd, reps, label):
    """(fwd ms, bwd ms, error) as bench_variants.py: median of reps do_bench medians, bwd = (fwd + bwd) - fwd; a call
    that raises gives None for what it spoils and its message; fwd_bwd=None skips the backward."""
    times, err = {}, []
    for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if fn is None:
            continue
        try:
            times[what] = statistics.median(do_bench(fn, warmup=25, rep=100) for _ in range(reps))
        except Exception as e:  # noqa: BLE001 -- recorded and printed, the run goes on
            print(f"{label}: {what} FAILED: {first_line(e)}", flush=True)
            err.append(f"{what}: {first_line(e)}")
    f, fb = times.get("fwd"), times.get("fwd+bwd")
    return f, (fb - f if f is not None and fb is not None else None), "; ".join(err) or None


def grad_fns(call, leaves, dout):
    def fwd_bwd():
        torch.autograd.grad(call(), leaves, dout)
    return call, fwd_bwd


def probe(fn):
    """Runs fn once: None if it ran, else the first line of its exception with the first lines of the warnings and
    log records it raised (the jagged SDPA path logs why a backend refused; the exception only says none was left)."""
    records, log = [], logging.getLogger("torch.nested._internal.sdpa")
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
                torch.cuda.synchronize()
                return None
            except Exception as e:  # noqa: BLE001 -- recorded as null, the run goes on
                why = []
                for line in [str(w.message) for w in caught] + records:
                    line = line.split("(Triggered internally")[0].strip().splitlines()
                    if line and line[0] not in why and not line[0].endswith("not used because:"):
                        why.append(line[0])
                return first_line(e) + (f" [{'; '.join(why)[:300]}]" if why else "")
    finally:
        log.removeHandler(handler)


def dense_times(batch, seqlen, nheads, head_dim, causal, reps, label):
    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    fwd, fwd_bwd = grad_fns(lambda: flash_ext.attention(q, k, v, causal=causal), (q, k, v), torch.randn_like(q))
    res = time_fns(fwd, fwd_bwd, reps, label)
    del q, k, v, fwd, fwd_bwd
    torch.cuda.empty_cache()
    return res


def nested_times(q, k, v, dout, lengths, causal, reps, label):
    """(fwd ms, bwd ms, error, forward output (total, H, D)) of SDPA FLASH_ATTENTION on jagged views of q, k, v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    offsets = torch.tensor([0] + lengths, device="cuda", dtype=torch.int64).cumsum(0)
    qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min(lengths), max_seqlen=max(lengths))
                  .transpose(1, 2) for t in (q, k, v))  # (B, H, j, D) views; autograd reaches q, k, v through them
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd, fwd_bwd = grad_fns(lambda: sdpa(qn, kn, vn, is_causal=causal).transpose(1, 2).values(), (q, k, v), dout)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        err = probe(fwd)
        if err:
            print(f"{label}: refused: {err}", flush=True)
            return None, None, f"fwd: {err}", None
        out = fwd().detach()
        bwd_err = probe(fwd_bwd)
        if bwd_err:
            print(f"{label}: backward refused: {bwd_err}", flush=True)
        f, b, terr = time_fns(fwd, None if bwd_err else fwd_bwd, reps, label)
    errs = ([terr] if terr else []) + ([f"bwd: {bwd_err}"] if bwd_err else [])
    return f, b, "; ".join(errs) or None, out


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def bench_shape(head_dim, causal, batch_info, reps, errors):
    nheads = HIDDEN // head_dim
    lengths, maxlen = batch_info["lengths"], batch_info["max_seqlen"]
    nseq, mean_s, mean_b = len(lengths), batch_info["dense_mean_seqlen"], batch_info["dense_mean_batch"]
    name = f"d{head_dim} {'causal' if causal else 'non-causal'}"
    row = dict(head_dim=head_dim, nheads=nheads, causal=causal)

    q, k, v = (torch.randn(TOTAL, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    cu = torch.tensor([0] + lengths, device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
    call = lambda: flash_ext.attention_varlen(q, k, v, cu, cu, maxlen, maxlen, causal=causal)
    f, b, row["error"] = time_fns(*grad_fns(call, (q, k, v), dout), reps, f"{name} varlen")
    ours = None
    try:
        with torch.no_grad():
            ours = call()
    except Exception:  # noqa: BLE001 -- already recorded above
        pass
    try:
        nf, nb, row["nested_error"], nested_out = nested_times(q, k, v, dout, lengths, causal, reps,
                                                               f"{name} nested SDPA")
    except Exception as e:  # noqa: BLE001 -- e.g. the nested tensors themselves: recorded as null, the run goes on
        print(f"{name} nested SDPA FAILED: {first_line(e)}", flush=True)
        nf = nb = nested_out = None
        row["nested_error"] = first_line(e)
    row["max_abs_diff"] = (None if ours is None or nested_out is None else
                           (ours.float() - nested_out.float()).abs().max().item())
    del q, k, v, dout, ours, nested_out, call
    torch.cuda.empty_cache()
    pf, pb, row["padded_error"] = dense_times(nseq, maxlen, nheads, head_dim, causal, reps, f"{name} padded dense")
    mf, mb, row["dense_mean_error"] = dense_times(mean_b, mean_s, nheads, head_dim, causal, reps,
                                                  f"{name} dense at mean length")

    real, padded = pairs(lengths, causal), nseq * pairs([maxlen], causal)
    row.update(real_pairs=real, padded_pairs=padded)
    for d, ms, p_ms, m_ms, n_ms in (("fwd", f, pf, mf, nf), ("bwd", b, pb, mb, nb)):
        bound = p_ms * real / padded * BOUND_SLACK if p_ms is not None else None
        ours_t = tflops(sum(n * n for n in lengths), nheads, head_dim, causal, d, ms)
        mean_t = tflops(mean_b * mean_s * mean_s, nheads, head_dim, causal, d, m_ms)
        row.update({f"{d}_ms": ms, f"{d}_tflops": ours_t, f"dense_mean_{d}_ms": m_ms, f"dense_mean_{d}_tflops": mean_t,
                    f"{d}_vs_dense_mean": ratio(ours_t, mean_t), f"padded_{d}_ms": p_ms, f"padded_bound_{d}_ms": bound,
                    f"{d}_vs_bound": ratio(ms, bound), f"nested_{d}_ms": n_ms, f"{d}_nested_speedup": ratio(n_ms, ms)})
        print(f"{name} {d}: varlen {fmt(ms)} ms {fmt(ours_t, '.0f')} TFLOP/s (dense at mean {fmt(mean_t, '.0f')}, "
              f"{fmt(row[f'{d}_vs_dense_mean'])}x); padded {fmt(p_ms)} ms, bound {fmt(bound)} ms, varlen / bound "
              f"{fmt(row[f'{d}_vs_bound'])}; nested SDPA {fmt(n_ms)} ms, speed-up "
              f"{fmt(row[f'{d}_nested_speedup'], '.2f')}", flush=True)
    for key, who in (("error", "varlen"), ("nested_error", "nested SDPA"), ("padded_error", "padded dense"),
                     ("dense_mean_error", "dense at mean length")):
        if row[key]:
            errors.append(f"{name} {who}: {row[key]}")
    return row


def met(x, target, at_least):
    return "—" if x is None else ("yes" if (x >= target if at_least else x <= target) else "no")


def markdown(res):
    bi = res["batch"]
    lines = [f"# Variable-length attention: {res['gpu']}, commit {res['commit']}, torch {res['torch']}, {res['date']}",
             "", f"GPU tests on this commit: {res['pytest_summary'] or '(not given)'}", "",
             f"bf16, hidden {HIDDEN}; one packed batch of {bi['total']} tokens in {len(bi['lengths'])} sequences "
             f"(lengths uniform in {MIN_LEN}..{MAX_LEN}, seed 0, the last cut to fit; max {bi['max_seqlen']}, mean "
             f"{bi['mean_seqlen']:.0f}): {', '.join(map(str, bi['lengths']))}. Medians (ms) of do_bench (median of "
             f"{res['reps']} run{'s' if res['reps'] > 1 else ''}); bwd = (fwd + bwd) - fwd; — = not measured (see "
             "Errors).", "",
             "- TFLOP/s: 4 nheads head_dim L^2 per sequence (causal / 2), backward 2.5x; varlen counts its real "
             f"sequences. dense mean: flash_ext.attention at batch {bi['dense_mean_batch']} x seqlen "
             f"{bi['dense_mean_seqlen']}; target: varlen / dense mean >= {DENSE_MEAN_TARGET:.2f}.",
             f"- padded: flash_ext.attention at batch {len(bi['lengths'])} x seqlen {bi['max_seqlen']}, no mask; "
             f"bound = padded ms x real pairs / padded pairs x {BOUND_SLACK:.2f} (pairs L^2, causal L (L + 1) / 2; "
             f"real / padded {bi['real_vs_padded_pairs']:.3f}, causal {bi['real_vs_padded_pairs_causal']:.3f}); "
             "target: varlen / bound <= 1.0.",
             "- nested: torch SDPA on jagged nested tensors under sdpa_kernel(FLASH_ATTENTION); speed-up = nested / "
             f"varlen; target: >= {NESTED_TARGET:.1f}. max diff = max |varlen - nested| of the forward outputs.", "",
             "| head dim | causal | dir | varlen ms | TFLOP/s | dense mean TFLOP/s | ratio | "
             f">= {DENSE_MEAN_TARGET:.2f} | padded ms | bound ms | varlen / bound | <= 1.0 | nested ms | speed-up | "
             f">= {NESTED_TARGET:.1f} | max diff |",
             "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in res["rows"]:
        for d in ("fwd", "bwd"):
            vm, vb, sp = r[f"{d}_vs_dense_mean"], r[f"{d}_vs_bound"], r[f"{d}_nested_speedup"]
            lines.append(
                f"| {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {d} | {fmt(r[f'{d}_ms'])} | "
                f"{fmt(r[f'{d}_tflops'], '.0f')} | {fmt(r[f'dense_mean_{d}_tflops'], '.0f')} | {fmt(vm)} | "
                f"{met(vm, DENSE_MEAN_TARGET, True)} | {fmt(r[f'padded_{d}_ms'])} | {fmt(r[f'padded_bound_{d}_ms'])} | "
                f"{fmt(vb)} | {met(vb, 1.0, False)} | {fmt(r[f'nested_{d}_ms'])} | {fmt(sp, '.2f')} | "
                f"{met(sp, NESTED_TARGET, True)} | {fmt(r['max_abs_diff'], '.2e') if d == 'fwd' else ''} |")
    lines.append("")
    if res["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(lines)


def batch_info(lengths):
    mean = sum(lengths) / len(lengths)
    seqlen = max(128, round(mean / 128) * 128)
    n, m = len(lengths), max(lengths)
    return dict(lengths=lengths, total=sum(lengths), max_seqlen=m, mean_seqlen=mean,
                dense_mean_seqlen=seqlen, dense_mean_batch=max(1, round(sum(lengths) / seqlen)),
                real_vs_padded_pairs=pairs(lengths, False) / (n * m * m),
                real_vs_padded_pairs_causal=pairs(lengths, True) / (n * pairs([m], True)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one do_bench run per figure instead of three")
    ap.add_argument("--pytest-summary", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    global do_bench, flash_ext
    from triton.testing import do_bench
    import flash_ext
    reps = 1 if args.quick else 3
    torch.manual_seed(0)
    bi = batch_info(draw_lengths())
    print(f"{len(bi['lengths'])} sequences, total {bi['total']}, max {bi['max_seqlen']}, mean {bi['mean_seqlen']:.1f}: "
          f"{bi['lengths']}", flush=True)
    # Clocks up first (the first config would otherwise run at idle clocks).
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    do_bench(lambda: a @ a, warmup=200, rep=2000)
    del a
    rows, errors = [], []
    for head_dim in (64, 128):
        for causal in (False, True):
            rows.append(bench_shape(head_dim, causal, bi, reps, errors))
            torch.cuda.empty_cache()
    commit = os.environ.get("FLASH_EXT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    commit = commit[:7]
    gpu = torch.cuda.get_device_name()
    res = dict(commit=commit, gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(),
               pytest_summary=args.pytest_summary, reps=reps, batch=bi,
               targets=dict(vs_dense_mean_min=DENSE_MEAN_TARGET, vs_padded_bound_max=1.0, bound_slack=BOUND_SLACK,
                            nested_speedup_min=NESTED_TARGET),
               rows=rows, errors=errors)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"varlen-{gpu.lower().replace(' ', '-')}-{res['date']}-{commit}")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    md = markdown(res)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
