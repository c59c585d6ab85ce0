"""Why can the bench's time differ from the kernel's? Times one forward (or forward+backward) of flash_ext and of
SDPA CUDNN / FLASH under three methods, side by side, and reads the SM clock and board power while each runs:

    python tools/timing_modes.py [--dims 128] [--seqlens 1024,4096,16384] [--causal 0] [--bwd] [--smi]

  flushed  triton's do_bench as the benchmark runs it: calls queued back to back, a 256 MiB memset before each
           (evicts L2), events around the call only, median over ~100 ms
  queued   the same without the memset (back to back, L2 warm with whatever the last call left)
  synced   one call at a time, the GPU idle between calls (what a per-call sync'd loop measures)

--smi samples `nvidia-smi` (SM clock, power, throttle reasons) every 20 ms in the background and prints the mean
clock and power during each method. Shapes are the benchmark's: bf16, batch * seqlen = 16k tokens, 2048 hidden.
"""
import argparse
import os
import subprocess
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flash_ext


def make_fn(impl, q, k, v, causal, bwd, dout):
    if impl == "flash_ext":
        f = lambda: flash_ext.attention(q, k, v, causal=causal)
    else:
        backend = SDPBackend.CUDNN_ATTENTION if impl == "cudnn" else SDPBackend.FLASH_ATTENTION
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    if not bwd:
        return f
    return lambda: torch.autograd.grad(f(), (q, k, v), dout)


def time_events(fn, n, flush, cache):
    e0 = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    e1 = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if flush:
            cache.zero_()
        e0[i].record()
        fn()
        e1[i].record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in zip(e0, e1))
    return ts[len(ts) // 2]


def time_synced(fn, n):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


class Smi:
    """nvidia-smi in the background; window(t0, t1) gives mean SM clock (MHz), power (W), throttle reasons seen."""

    def __init__(self, path):
        self.path = path
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active",
             "--format=csv,noheader,nounits", "-lms", "20"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def window(self, t0, t1):
        clk, pw, reasons = [], [], set()
        for line in open(self.path):
            parts = [x.strip() for x in line.split(",")]
            if len(parts) < 4:
                continue
            try:
                ts = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float(
                    "0." + parts[0].split(".")[1])
                c, p = float(parts[1]), float(parts[2])
            except (ValueError, IndexError):
                continue
            if t0 <= ts <= t1:
                clk.append(c)
                pw.append(p)
                reasons.add(parts[3])
        if not clk:
            return float("nan"), float("nan"), ""
        return sum(clk) / len(clk), sum(pw) / len(pw), "/".join(sorted(reasons))

    def stop(self):
        self.proc.terminate()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--causal", default="0")
    ap.add_argument("--impls", default="flash_ext,cudnn")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--smi", action="store_true")
    args = ap.parse_args()
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    smi = Smi(os.path.join(os.environ.get("OUT", "/tmp"), "smi.csv")) if args.smi else None
    rows = []
    for d in map(int, args.dims.split(",")):
        for s in map(int, args.seqlens.split(",")):
            for causal in map(int, args.causal.split(",")):
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=args.bwd)
                           for _ in range(3))
                dout = torch.randn_like(q)
                fl = 4 * b * h * s * s * d / (2 if causal else 1) * (3.5 if args.bwd else 1.0)
                for impl in args.impls.split(","):
                    fn = make_fn(impl, q, k, v, bool(causal), args.bwd, dout)
                    ctx = torch.enable_grad() if args.bwd else torch.no_grad()
                    with ctx:
                        fn()
                        torch.cuda.synchronize()
                        est = do_bench(fn, warmup=5, rep=20)
                        n = max(10, min(1000, int(100 / est)))
                        res = {}
                        for mode in ("flushed", "queued", "synced", "do_bench"):
                            t0 = time.time()
                            if mode == "synced":
                                res[mode] = time_synced(fn, min(n, 200))
                            elif mode == "do_bench":
                                res[mode] = do_bench(fn, warmup=25, rep=100, return_mode="median")
                            else:
                                res[mode] = time_events(fn, n, mode == "flushed", cache)
                            t1 = time.time()
                            if smi:
                                time.sleep(0.1)
                                res[mode + "_smi"] = smi.window(t0, t1)
                    rows.append((d, s, causal, impl, fl, res))
                    line = f"d{d} s{s} c{causal} {impl:9s}"
                    for mode in ("do_bench", "flushed", "queued", "synced"):
                        ms = res[mode]
                        line += f" | {mode} {ms:8.3f} ms {fl / ms * 1e-9:6.1f}"
                        if smi:
                            c, p, r = res[mode + "_smi"]
                            line += f" {c:5.0f}MHz {p:4.0f}W {r}"
                    print(line, flush=True)
                del q, k, v, dout
                torch.cuda.empty_cache()
    if smi:
        smi.stop()


if __name__ == "__main__":
    main()
