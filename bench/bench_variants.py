"""GPU benchmark of the masks and score modifiers (issue 15): bf16, batch 1, hidden 2048 (head dim 64 / 128 ->
32 / 16 heads), seqlen 16k and 32k, forward and backward (= (fwd + bwd) - fwd), medians of
triton.testing.do_bench, as bench/bench_attention.py measures. Four groups of rows, the first three timed at every
shape, bias at shapes of its own:

masks      causal, and the local masks against it: a sliding window (4096, 0) (Mistral's pattern) and chunks of
           8192 with causal (Llama 4's). Ratio = variant / causal. These rows skip keys, so they should be
           cheaper: a window of 4096 sees 0.44 of the causal area at 16k and 0.23 at 32k (row i sees
           min(i + 1, 4097) keys instead of i + 1), chunks of 8192 0.50 and 0.25; the time ratio cannot fall
           below the area ratio (the table prints it).
modifiers  the score modifiers against the same call without them: "plain" (no mask), "softcap 50" and
           "alibi" (standard geometric slopes 2^(-8 (h + 1) / nheads)) against plain; "causal", "softcap 50
           + causal" and "alibi + causal" against causal. Ratio (vs_plain) = with modifier / without. Target
           of issue 15: at most 1.10, forward and backward.
flex       Gemma 2's pattern, window (4096, 0) + softcap 50, ours against torch's FlexAttention
           (torch.compile'd flex_attention, score_mod 50 tanh(s / 50), a block mask for kv <= q and
           q - kv <= 4096, built once per shape outside the timing; inputs copied to its (B, H, S, D) layout
           outside the timing). Speed-up = flex time / our time. Target: at least 1.3, forward and backward.
           A flex failure (e.g. a compile error) is printed and recorded as null; the run goes on.
bias       attn_bias against torch's scaled_dot_product_attention (SDPA), at its own shapes: head dim 64 / 128,
           seqlen 4096 and 8192 only (a float (1, 1, S, S) bias at 32k alone is 4 GiB in float32). Rows:
           "key padding", batch 4, a bool (4, 1, 1, S) mask (True = keep) keeping a random prefix of 50% to
           100% of the keys per batch row; "full bias", batch 1, a bf16 (1, 1, S, S) bias without grad (the
           backward computes dq, dk, dv); "full bias + dbias", such a bias requiring grad (both sides also
           compute dbias). SDPA gets the same mask / bias and (B, H, S, D) copies of q, k, v (made outside the
           timing), once under each of sdpa_kernel(EFFICIENT_ATTENTION), (CUDNN_ATTENTION) and
           (FLASH_ATTENTION); a backend that refuses the call (forward or backward) is recorded as null with
           the first line of its exception (and of torch's warnings saying why). Fastest SDPA = the least
           time over the backends that ran, forward and backward separately (they may be different
           backends; the table names them). Speed-up = fastest SDPA / ours. Target: at least 1.5, forward
           and backward.

A row whose call raises (e.g. a feature the CUDA kernels do not run yet) is printed and recorded as null too.

    python bench/bench_variants.py [--quick] [--only masks,modifiers,flex,bias] [--pytest-summary "..."]

Writes bench/results/variants-<gpu>-<date>-<commit>.json / .md.
"""
import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import traceback
import warnings

import torch
from triton.testing import do_bench

import flash_ext

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = ("masks", "modifiers", "flex", "bias")
WINDOW, SOFTCAP, CHUNK = 4096, 50.0, 8192
MODIFIER_TARGET, FLEX_TARGET, BIAS_TARGET = 1.10, 1.3, 1.5
BIAS_SEQLENS, PAD_BATCH = (4096, 8192), 4
BIAS_ROWS = ("key padding", "full bias", "full bias + dbias")
SDPA_BACKENDS = ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION")

# name -> (flash_ext kwargs, baseline row). "alibi_slopes": True stands for the standard slopes of the shape.
VARIANTS = {
    "plain": (dict(), "plain"),
    "causal": (dict(causal=True), "causal"),
    "window(4096,0)": (dict(window_size=(WINDOW, 0)), "causal"),
    "chunk 8192 + causal": (dict(causal=True, attention_chunk=CHUNK), "causal"),
    "softcap 50": (dict(softcap=SOFTCAP), "plain"),
    "alibi": (dict(alibi_slopes=True), "plain"),
    "softcap 50 + causal": (dict(softcap=SOFTCAP, causal=True), "causal"),
    "alibi + causal": (dict(alibi_slopes=True, causal=True), "causal"),
}
MASK_ROWS = ("causal", "window(4096,0)", "chunk 8192 + causal")
MODIFIER_ROWS = ("plain", "softcap 50", "alibi", "causal", "softcap 50 + causal", "alibi + causal")
GEMMA_NAME = "window(4096,0) + softcap 50"
GEMMA_KWARGS = dict(window_size=(WINDOW, 0), softcap=SOFTCAP)


def alibi_slopes(nheads):
    return torch.tensor([2 ** (-8 * (h + 1) / nheads) for h in range(nheads)], device="cuda", dtype=torch.float32)


def area_vs_causal(name, seqlen):
    """Visible (query, key) pairs of a mask row / those of causal, at seqlen_q == seqlen_k."""
    causal = seqlen * (seqlen + 1) // 2
    if name == "window(4096,0)":
        return sum(min(i + 1, WINDOW + 1) for i in range(seqlen)) / causal
    if name == "chunk 8192 + causal":
        full, rest = divmod(seqlen, CHUNK)
        return (full * CHUNK * (CHUNK + 1) // 2 + rest * (rest + 1) // 2) / causal
    return 1.0


def time_fns(fwd, fwd_bwd, reps, label):
    """(fwd ms, bwd ms, error): several do_bench runs, median of their medians (clock and scheduling noise
    between runs); bwd = (fwd + bwd) - fwd. A call that raises gives None for what it spoils, and its message.
    fwd_bwd=None skips the backward (None, no message)."""
    f = fb = None
    err = []
    for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if fn is None:
            continue
        try:
            ms = statistics.median(do_bench(fn, warmup=25, rep=100) for _ in range(reps))
        except Exception as e:  # noqa: BLE001 -- recorded and printed, the run goes on
            print(f"{label}: {what} FAILED: {type(e).__name__}: {e}", flush=True)
            err.append(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            ms = None
        if what == "fwd":
            f = ms
        else:
            fb = ms
    b = fb - f if f is not None and fb is not None else None
    return f, b, "; ".join(err) or None


def time_pair(q, k, v, dout, kwargs, reps, label=""):
    fwd = lambda: flash_ext.attention(q, k, v, **kwargs)

    def fwd_bwd():
        out = flash_ext.attention(q, k, v, **kwargs)
        torch.autograd.grad(out, (q, k, v), dout)
    return time_fns(fwd, fwd_bwd, reps, label)


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def ratio_text(x, base):
    return f"{x:.3f}x {base}" if x is not None else f"— x {base}"


_flex = {}


def softcap_mod(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def gemma_mask(b, h, q_idx, kv_idx):
    # Ours is bottom-right aligned; at seqlen_q == seqlen_k window (4096, 0) is exactly this.
    return (kv_idx <= q_idx) & (q_idx - kv_idx <= WINDOW)


def flex_fns(q, k, v, dout, seqlen):
    """FlexAttention's fwd and fwd+bwd on (B, H, S, D) copies of q, k, v for window (4096, 0) + softcap 50, and
    its forward output in our layout (for a correctness check). Built outside the timing: the copies, the
    block mask, the compile (first call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _flex["fn"]

    block_mask = create_block_mask(gemma_mask, B=None, H=None, Q_LEN=seqlen, KV_LEN=seqlen, device=q.device)
    qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    doutf = dout.transpose(1, 2).contiguous()
    fwd = lambda: flex(qf, kf, vf, score_mod=softcap_mod, block_mask=block_mask)

    def fwd_bwd():
        out = flex(qf, kf, vf, score_mod=softcap_mod, block_mask=block_mask)
        torch.autograd.grad(out, (qf, kf, vf), doutf)
    fwd_bwd()  # compiles forward and backward; a failure here is the flex failure
    out = fwd().detach().transpose(1, 2)  # in grad mode, as timed (no_grad would compile once more)
    torch.cuda.synchronize()
    return fwd, fwd_bwd, out


def bench_shape(head_dim, seqlen, groups, reps, rows, flex_rows, errors):
    nheads = 2048 // head_dim
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    slopes = alibi_slopes(nheads)
    names = []
    if "masks" in groups:
        names += MASK_ROWS
    if "modifiers" in groups:
        names += [n for n in MODIFIER_ROWS if n not in names]
    # Baselines first, so every ratio is known when its row prints.
    names = [n for n in VARIANTS if n in names and VARIANTS[n][1] == n] + \
            [n for n in VARIANTS if n in names and VARIANTS[n][1] != n]
    times = {}
    for name in names:
        kw, base = VARIANTS[name]
        kw = {key: (slopes if key == "alibi_slopes" else val) for key, val in kw.items()}
        label = f"d{head_dim} {seqlen} {name}"
        f, b, err = time_pair(q, k, v, dout, kw, reps, label)
        times[name] = (f, b)
        bf, bb = times[base]
        fr, br = ratio(f, bf), ratio(b, bb)
        row = dict(head_dim=head_dim, seqlen=seqlen, variant=name, base=base, fwd_ms=f, bwd_ms=b, error=err,
                   in_masks=name in MASK_ROWS and "masks" in groups,
                   in_modifiers=name in MODIFIER_ROWS and "modifiers" in groups)
        if name in MASK_ROWS:
            row.update(fwd_vs_causal=fr, bwd_vs_causal=br, area_vs_causal=area_vs_causal(name, seqlen))
        if name in MODIFIER_ROWS:
            # vs_plain: with the modifier / the same call without it (None on the two baseline rows).
            row.update(fwd_vs_plain=fr if base != name else None, bwd_vs_plain=br if base != name else None)
        rows.append(row)
        if err:
            errors.append(f"{label}: {err}")
        print(f"{label}: fwd {fmt(f)} ms ({ratio_text(fr, base)}), bwd {fmt(b)} ms ({ratio_text(br, base)})",
              flush=True)
    if "flex" in groups:
        label = f"d{head_dim} {seqlen} {GEMMA_NAME}"
        f, b, err = time_pair(q, k, v, dout, GEMMA_KWARGS, reps, label + " (flash_ext)")
        if err:
            errors.append(f"{label} (flash_ext): {err}")
        ff = fb = max_diff = flex_err = None
        try:
            fwd, fwd_bwd, flex_out = flex_fns(q, k, v, dout, seqlen)
            with torch.no_grad():
                try:
                    ours = flash_ext.attention(q, k, v, **GEMMA_KWARGS)
                    max_diff = (ours.float() - flex_out.float()).abs().max().item()
                except Exception:  # noqa: BLE001 -- ours failing is already recorded above
                    pass
            del flex_out
            ff, fb, flex_err = time_fns(fwd, fwd_bwd, reps, label + " (flex)")
            del fwd, fwd_bwd
        except Exception as e:  # noqa: BLE001 -- a flex failure is recorded as null, the run goes on
            print(f"{label}: FlexAttention FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            msg = str(e).strip().splitlines()
            flex_err = f"{type(e).__name__}: {msg[0] if msg else ''}"
        if flex_err:
            errors.append(f"{label} (flex): {flex_err}")
        fs, bs = ratio(ff, f), ratio(fb, b)
        flex_rows.append(dict(head_dim=head_dim, seqlen=seqlen, variant=GEMMA_NAME, fwd_ms=f, bwd_ms=b,
                              flex_fwd_ms=ff, flex_bwd_ms=fb, fwd_speedup=fs, bwd_speedup=bs,
                              max_abs_diff=max_diff, error=err, flex_error=flex_err))
        print(f"{label}: fwd {fmt(f)} ms (flex {fmt(ff)} ms, {fmt(fs)}x), bwd {fmt(b)} ms (flex {fmt(fb)} ms, "
              f"{fmt(bs)}x), max |ours - flex| {fmt(max_diff, '.2e')}", flush=True)
    del q, k, v, dout


def first_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def grad_fns(call, leaves, dout):
    """fwd and fwd+bwd closures of call(): the backward takes the gradient of every leaf."""
    def fwd_bwd():
        torch.autograd.grad(call(), leaves, dout)
    return call, fwd_bwd


def probe(fn):
    """Runs fn once; None if it ran, else the first line of its exception, with the first lines of the warnings
    it raised (SDPA tells in warnings why a backend refused, the exception only says that none was left)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            torch.cuda.synchronize()
            return None
        except Exception as e:  # noqa: BLE001 -- recorded as null, the run goes on
            why = []
            for w in caught:
                line = str(w.message).split("(Triggered internally")[0].strip().splitlines()
                if line and line[0] not in why:
                    why.append(line[0])
            reason = first_line(e)
            return reason + (f" [{'; '.join(why)[:300]}]" if why else "")


def sdpa_backend_times(backend_name, fwd, fwd_bwd, ours_out, reps, label):
    """One SDPA backend, forced with sdpa_kernel: dict(fwd_ms, bwd_ms, error, max_abs_diff) (max |ours - SDPA|
    of the forward outputs, in our layout). A refused forward gives nulls throughout, a refused backward a null
    bwd_ms."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    res = dict(fwd_ms=None, bwd_ms=None, error=None, max_abs_diff=None)
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        res["error"] = f"SDPBackend.{backend_name} is not in torch {torch.__version__}"
        print(f"{label}: {res['error']}", flush=True)
        return res
    with sdpa_kernel(backend):
        err = probe(fwd)
        if err:
            res["error"] = f"fwd: {err}"
            print(f"{label}: refused: {res['error']}", flush=True)
            return res
        if ours_out is not None:
            out = fwd().detach().transpose(1, 2)
            res["max_abs_diff"] = (ours_out.float() - out.float()).abs().max().item()
            del out
        bwd_err = probe(fwd_bwd)
        if bwd_err:
            print(f"{label}: backward refused: {bwd_err}", flush=True)
        f, b, terr = time_fns(fwd, None if bwd_err else fwd_bwd, reps, label)
    res.update(fwd_ms=f, bwd_ms=b)
    errs = ([terr] if terr else []) + ([f"bwd: {bwd_err}"] if bwd_err else [])
    res["error"] = "; ".join(errs) or None
    return res


def fastest(per_backend, key):
    """(least time, backend name) over the backends that gave a time for key; (None, None) if none did."""
    timed = [(r[key], name) for name, r in per_backend.items() if r[key] is not None]
    return min(timed) if timed else (None, None)


def bench_bias(head_dim, seqlen, reps, bias_rows, errors):
    nheads = 2048 // head_dim
    for case in BIAS_ROWS:
        batch = PAD_BATCH if case == "key padding" else 1
        label = f"d{head_dim} {seqlen} {case}"
        q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        lengths = None
        if case == "key padding":
            # Each batch row keeps keys [0, length), length uniform in [seqlen / 2, seqlen].
            lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,))
            bias = (torch.arange(seqlen, device="cuda")[None, :] < lengths.to("cuda")[:, None]).view(
                batch, 1, 1, seqlen)
            lengths = lengths.tolist()
        else:
            bias = torch.randn(1, 1, seqlen, seqlen, device="cuda", dtype=torch.bfloat16,
                               requires_grad=case == "full bias + dbias")
        with_dbias = bias.requires_grad

        # Ours.
        fwd, fwd_bwd = grad_fns(functools.partial(flash_ext.attention, q, k, v, attn_bias=bias),
                                (q, k, v, bias) if with_dbias else (q, k, v), dout)
        f, b, err = time_fns(fwd, fwd_bwd, reps, label + " (flash_ext)")
        if err:
            errors.append(f"{label} (flash_ext): {err}")
        ours_out = None
        try:
            with torch.no_grad():
                ours_out = flash_ext.attention(q, k, v, attn_bias=bias)
        except Exception:  # noqa: BLE001 -- ours failing is already recorded above
            pass
        del fwd, fwd_bwd

        # SDPA, each backend forced in turn, on (B, H, S, D) copies.
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
        doutt = dout.transpose(1, 2).contiguous()
        fwd, fwd_bwd = grad_fns(
            functools.partial(torch.nn.functional.scaled_dot_product_attention, qt, kt, vt, attn_mask=bias),
            (qt, kt, vt, bias) if with_dbias else (qt, kt, vt), doutt)
        per_backend = {}
        for name in SDPA_BACKENDS:
            per_backend[name] = r = sdpa_backend_times(name, fwd, fwd_bwd, ours_out, reps, f"{label} (SDPA {name})")
            if r["error"]:
                errors.append(f"{label} (SDPA {name}): {r['error']}")
        del fwd, fwd_bwd
        sf, sf_name = fastest(per_backend, "fwd_ms")
        sb, sb_name = fastest(per_backend, "bwd_ms")
        fs, bs = ratio(sf, f), ratio(sb, b)
        bias_rows.append(dict(head_dim=head_dim, seqlen=seqlen, batch=batch, variant=case,
                              bias_shape=list(bias.shape), bias_dtype=str(bias.dtype).replace("torch.", ""),
                              bias_requires_grad=with_dbias, key_lengths=lengths, fwd_ms=f, bwd_ms=b, error=err,
                              sdpa=per_backend, sdpa_fwd_ms=sf, sdpa_fwd_backend=sf_name, sdpa_bwd_ms=sb,
                              sdpa_bwd_backend=sb_name, fwd_speedup=fs, bwd_speedup=bs))
        print(f"{label}: fwd {fmt(f)} ms (SDPA {fmt(sf)} ms {sf_name or ''}, {fmt(fs, '.2f')}x), bwd {fmt(b)} ms "
              f"(SDPA {fmt(sb)} ms {sb_name or ''}, {fmt(bs, '.2f')}x)", flush=True)
        del q, k, v, dout, bias, ours_out, qt, kt, vt, doutt
        torch.cuda.empty_cache()


def markdown(res):
    gpu, commit = res["gpu"], res["commit"]
    groups, rows, flex_rows, bias_rows = res["groups"], res["rows"], res["flex"], res.get("bias", [])
    lines = [f"# Masks and score modifiers: {gpu}, commit {commit}, torch {res['torch']}, {res['date']}",
             "", f"GPU tests on this commit: {res['pytest_summary'] or '(not given)'}", "",
             f"bf16, batch 1 (4 on the key-padding rows), hidden 2048; medians (ms) of do_bench (median of {res['reps']} run"
             f"{'s' if res['reps'] > 1 else ''}); bwd = (fwd + bwd) - fwd; — = not measured (see Errors).", ""]
    if "masks" in groups:
        lines += ["## Masks vs causal", "",
                  "ratio = variant / causal at the same shape; area = the variant's visible (query, key) pairs / "
                  "causal's, the floor of the time ratio.", "",
                  "| head dim | seqlen | variant | area / causal | fwd ms | fwd / causal | bwd ms | bwd / causal |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r.get("in_masks"):
                lines.append(f"| {r['head_dim']} | {r['seqlen']} | {r['variant']} | {fmt(r['area_vs_causal'])} | "
                             f"{fmt(r['fwd_ms'])} | {fmt(r['fwd_vs_causal'])} | {fmt(r['bwd_ms'])} | "
                             f"{fmt(r['bwd_vs_causal'])} |")
        lines.append("")
    if "modifiers" in groups:
        lines += ["## Score modifiers vs the same call without them", "",
                  f"vs_plain = variant / its baseline (plain for the non-causal rows, causal for the causal ones) "
                  f"at the same shape; target of issue 15: <= {MODIFIER_TARGET:.2f}, forward and backward.", "",
                  "| head dim | seqlen | variant | baseline | fwd ms | fwd vs_plain | bwd ms | bwd vs_plain | "
                  f"<= {MODIFIER_TARGET:.2f} |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---|"]
        order = {name: i for i, name in enumerate(MODIFIER_ROWS)}
        for r in sorted((r for r in rows if r.get("in_modifiers")),
                        key=lambda r: (r["head_dim"], r["seqlen"], order[r["variant"]])):
            fr, br = r["fwd_vs_plain"], r["bwd_vs_plain"]
            if r["base"] == r["variant"]:
                met = "(baseline)"
            elif fr is None or br is None:
                met = "—"
            else:
                met = "yes" if max(fr, br) <= MODIFIER_TARGET else "no"
            lines.append(f"| {r['head_dim']} | {r['seqlen']} | {r['variant']} | {r['base']} | "
                         f"{fmt(r['fwd_ms'])} | {fmt(fr)} | {fmt(r['bwd_ms'])} | {fmt(br)} | {met} |")
        lines.append("")
    if "flex" in groups:
        lines += [f"## {GEMMA_NAME} (Gemma 2's pattern): flash_ext vs FlexAttention", "",
                  "FlexAttention: torch.compile(flex_attention), score_mod 50 tanh(s / 50), block mask kv <= q and "
                  "q - kv <= 4096 (built once per shape, outside the timing), inputs in (B, H, S, D). "
                  f"speed-up = flex / flash_ext; target: >= {FLEX_TARGET:.1f}, forward and backward. "
                  "max diff = max |ours - flex| of the forward outputs.", "",
                  "| head dim | seqlen | fwd ms | flex fwd ms | fwd speed-up | bwd ms | flex bwd ms | bwd speed-up | "
                  f">= {FLEX_TARGET:.1f} | max diff |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in flex_rows:
            fs, bs = r["fwd_speedup"], r["bwd_speedup"]
            met = "—" if fs is None or bs is None else ("yes" if min(fs, bs) >= FLEX_TARGET else "no")
            lines.append(f"| {r['head_dim']} | {r['seqlen']} | {fmt(r['fwd_ms'])} | {fmt(r['flex_fwd_ms'])} | "
                         f"{fmt(fs, '.2f')} | {fmt(r['bwd_ms'])} | {fmt(r['flex_bwd_ms'])} | {fmt(bs, '.2f')} | "
                         f"{met} | {fmt(r['max_abs_diff'], '.2e')} |")
        lines.append("")
    if "bias" in groups:
        lines += ["## attn_bias: flash_ext vs SDPA", "",
                  f"key padding: batch {PAD_BATCH}, bool (B, 1, 1, S) mask, each batch row keeping a random 50% to "
                  "100% of the keys; full bias: batch 1, bf16 (1, 1, S, S), no grad (dq, dk, dv only); + dbias: "
                  "the bias requires grad (both compute dbias). SDPA: "
                  "torch.nn.functional.scaled_dot_product_attention with attn_mask = the same tensor, inputs in "
                  f"(B, H, S, D), under sdpa_kernel({', '.join(SDPA_BACKENDS)}) in turn; fastest = least time "
                  "of the backends that ran (named after the time: E = EFFICIENT_ATTENTION, C = CUDNN_ATTENTION, "
                  "F = FLASH_ATTENTION), forward and backward separately; a refused backend is in Errors. "
                  f"speed-up = fastest SDPA / flash_ext; target: >= {BIAS_TARGET:.1f}, forward and backward. "
                  "max diff = max |ours - SDPA| of the forward outputs, over the backends that ran.", "",
                  "| head dim | seqlen | batch | variant | fwd ms | SDPA fwd ms | fwd speed-up | bwd ms | "
                  f"SDPA bwd ms | bwd speed-up | >= {BIAS_TARGET:.1f} | SDPA backends run | max diff |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        short = lambda name: name[0] if name else ""
        for r in bias_rows:
            fs, bs = r["fwd_speedup"], r["bwd_speedup"]
            met = "—" if fs is None or bs is None else ("yes" if min(fs, bs) >= BIAS_TARGET else "no")
            ran = [f"{short(n)}{'' if x['bwd_ms'] is not None else ' (fwd only)'}"
                   for n, x in r["sdpa"].items() if x["fwd_ms"] is not None]
            diffs = [x["max_abs_diff"] for x in r["sdpa"].values() if x["max_abs_diff"] is not None]
            sf = fmt(r["sdpa_fwd_ms"]) + (f" ({short(r['sdpa_fwd_backend'])})" if r["sdpa_fwd_backend"] else "")
            sb = fmt(r["sdpa_bwd_ms"]) + (f" ({short(r['sdpa_bwd_backend'])})" if r["sdpa_bwd_backend"] else "")
            lines.append(f"| {r['head_dim']} | {r['seqlen']} | {r['batch']} | {r['variant']} | {fmt(r['fwd_ms'])} | "
                         f"{sf} | {fmt(fs, '.2f')} | {fmt(r['bwd_ms'])} | {sb} | {fmt(bs, '.2f')} | {met} | "
                         f"{', '.join(ran) or 'none'} | {fmt(max(diffs) if diffs else None, '.2e')} |")
        lines.append("")
    if res["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one do_bench run per figure instead of three")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma list of row groups to run, of {', '.join(GROUPS)} (default: all)")
    ap.add_argument("--pytest-summary", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        ap.error(f"--only: unknown group(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(GROUPS)}")
    groups = [g for g in GROUPS if g in groups]
    reps = 1 if args.quick else 3
    torch.manual_seed(0)
    # Clocks up first (the first config would otherwise run at idle clocks).
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    do_bench(lambda: a @ a, warmup=200, rep=2000)
    rows, flex_rows, bias_rows, errors = [], [], [], []
    if any(g in groups for g in ("masks", "modifiers", "flex")):
        for head_dim in (64, 128):
            for seqlen in (16384, 32768):
                bench_shape(head_dim, seqlen, groups, reps, rows, flex_rows, errors)
                torch.cuda.empty_cache()
    if "bias" in groups:
        for head_dim in (64, 128):
            for seqlen in BIAS_SEQLENS:
                bench_bias(head_dim, seqlen, reps, bias_rows, errors)
                torch.cuda.empty_cache()
    commit = os.environ.get("FLASH_EXT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    commit = commit[:7]
    gpu = torch.cuda.get_device_name()
    res = dict(commit=commit, gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(),
               pytest_summary=args.pytest_summary, reps=reps, groups=groups,
               targets=dict(modifier_vs_plain_max=MODIFIER_TARGET, flex_speedup_min=FLEX_TARGET,
                            bias_speedup_min=BIAS_TARGET),
               rows=rows, flex=flex_rows, bias=bias_rows, errors=errors)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"variants-{gpu.lower().replace(' ', '-')}-{res['date']}-{commit}")
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    md = markdown(res)
    with open(stem + ".md", "w") as fh:
        fh.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
