"""The main job: run flash_ext attention on the best device present (CUDA when built and present, else
the CPU), check it against a float64 reference, and show its speed and peak memory against the naive
implementation (which materializes the seqlen x seqlen matrix) as the sequence grows.

    python -m flash_ext.demo [--seqlens 512 1024 ...] [--device cpu|cuda]
"""
import argparse
import subprocess
import sys
import time

import torch

import flash_ext

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety
    def tqdm(it, **_):
        return it


def naive_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v with the whole score matrix in memory, in the inputs' dtype."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def reference_rows(q, k, v, rows, causal):
    """Float64 reference for a subset of query rows (all keys): cheap at any seqlen."""
    qd, kd, vd = q[:, rows].double(), k.double(), v.double()
    s = torch.einsum("bqhd,bkhd->bhqk", qd * q.shape[-1] ** -0.5, kd)
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        cols = torch.arange(sk, device=q.device)
        s = s.masked_fill(cols[None, :] > (rows[:, None] + sk - sq), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vd)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _forward_backward(impl, seqlen, nheads, head_dim, causal, device, dtype):
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    return lambda: (flash_ext.attention(q, k, v, causal=causal) if impl == "flash_ext"
                    else naive_attention(q, k, v, causal)).backward(dout)


def peak_memory(impl, seqlen, nheads, head_dim, causal, device, dtype):
    """Peak memory of one forward+backward above the inputs: CUDA allocator statistics, or on the
    CPU the peak resident set of a fresh child process (reset through /proc/self/clear_refs)."""
    if device == "cuda":
        run = _forward_backward(impl, seqlen, nheads, head_dim, causal, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, "-m", "flash_ext.demo", "--child", impl, str(seqlen), str(nheads), str(head_dim),
           str(int(causal))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "child failed")
    return int(res.stdout.strip().splitlines()[-1])


def _child(impl, seqlen, nheads, head_dim, causal):
    run = _forward_backward(impl, int(seqlen), int(nheads), int(head_dim), bool(int(causal)), "cpu",
                            torch.float32)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = _rss_kib("VmHWM")
    run()
    print((_rss_kib("VmHWM") - base) * 1024)


def timed(fn, device, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    has_cuda = torch.cuda.is_available() and flash_ext.cuda_built()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if has_cuda else "cpu")
    p.add_argument("--seqlens", type=int, nargs="+")
    p.add_argument("--nheads", type=int)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # internal: CPU memory measurement
    args = p.parse_args(argv)
    if args.child:
        return _child(*args.child)
    device = args.device
    if device == "cuda" and not has_cuda:
        raise SystemExit("--device cuda needs a CUDA device and a CUDA build of flash_ext")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seqlens = args.seqlens or ([1024, 2048, 4096, 8192, 16384] if device == "cuda" else [512, 1024, 2048, 4096])
    nheads = args.nheads or (16 if device == "cuda" else 4)
    reps = 10 if device == "cuda" else 3
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"flash_ext demo on {where}: batch 1, {nheads} heads, head_dim {args.head_dim}, {dtype}, "
          f"causal={args.causal}; forward time (median) and peak memory of forward+backward")

    rows = []
    for seqlen in tqdm(seqlens, desc="seqlen", unit="len"):
        q, k, v = (torch.randn(1, seqlen, nheads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        out = flash_ext.attention(q, k, v, causal=args.causal)
        check = torch.cat([torch.arange(min(64, seqlen)), torch.arange(max(0, seqlen - 64), seqlen)]).to(device)
        err = (out[:, check].double() - reference_rows(q.detach(), k.detach(), v.detach(), check, args.causal))
        err = err.abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"seqlen {seqlen}: error {err:.2e} vs reference"
        with torch.no_grad():
            t_ours = timed(lambda: flash_ext.attention(q, k, v, causal=args.causal), device, reps)
        del dout, out
        m_ours = peak_memory("flash_ext", seqlen, nheads, args.head_dim, args.causal, device, dtype)
        try:
            with torch.no_grad():
                t_naive = timed(lambda: naive_attention(q, k, v, args.causal), device, reps)
            naive = (t_naive, peak_memory("naive", seqlen, nheads, args.head_dim, args.causal, device, dtype))
        except (torch.OutOfMemoryError, RuntimeError) as e:  # the naive matrix may not fit
            naive = (float("nan"), float("nan"))
            print(f"naive attention failed at seqlen {seqlen}: {str(e).splitlines()[0]}")
        rows.append((seqlen, t_ours, naive[0], m_ours, naive[1], err))
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'seqlen':>7} {'flash_ext ms':>13} {'naive ms':>10} {'speed-up':>9} "
          f"{'flash_ext MiB':>14} {'naive MiB':>10} {'max err':>9}")
    for seqlen, t, tn, m, mn, err in rows:
        print(f"{seqlen:>7} {t * 1e3:>13.2f} {tn * 1e3:>10.2f} {tn / t:>8.2f}x {m / 2**20:>14.1f} "
              f"{mn / 2**20:>10.1f} {err:>9.1e}")


if __name__ == "__main__":
    main()
