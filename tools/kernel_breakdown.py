"""Per-kernel GPU time of one attention call, ours next to torch's SDPA backends (torch.profiler).

    python tools/kernel_breakdown.py [--dims 64,128] [--seqlens 1024,4096] [--causal 0,1] [--ncu]

For each config (bf16, batch * seqlen = 16k tokens, 2048 hidden: the benchmark's shapes) it times
forward and forward+backward of flash_ext and of SDPA CUDNN / FLASH under torch.profiler and prints
every kernel's name (shortened), calls per iteration and mean microseconds, so the share of
preprocess / main / conversion kernels, and the peers' kernel names (cuDNN's carry their tile shapes),
can be read off. --ncu: run each config a few times without the profiler (for `ncu --launch-skip`).
"""
import argparse
import collections
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import flash_ext


def make(seqlen, d, grad):
    b, h = 16384 // seqlen, 2048 // d
    mk = lambda: torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    return mk(), mk(), mk()


def ours(q, k, v, causal, bwd, do):
    out = flash_ext.attention(q, k, v, causal=causal)
    if bwd:
        torch.autograd.grad(out, (q, k, v), do)


def sdpa(backend):
    def run(q, k, v, causal, bwd, do):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal)
        if bwd:
            torch.autograd.grad(out, (q, k, v), do.transpose(1, 2))
    return run


def short(name):
    for cut in ("(", "<"):
        if cut in name and not name.startswith("void"):
            name = name.split(cut)[0]
    return name[:110]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--impls", default="flash_ext,cudnn,flash")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--no-grad", action="store_true", help="forward only, under torch.no_grad() (inference)")
    a = ap.parse_args()
    impls = {"flash_ext": ours, "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    impls = {n: impls[n] for n in a.impls.split(",")}
    for d in map(int, a.dims.split(",")):
        for s in map(int, a.seqlens.split(",")):
            for causal in map(int, a.causal.split(",")):
                q, k, v = make(s, d, True)
                do = torch.randn_like(q)
                grad_ctx = torch.no_grad if a.no_grad else contextlib.nullcontext
                for bwd in (False,) if a.fwd_only or a.no_grad else (False, True):
                    for name, fn in impls.items():
                        with grad_ctx():
                            for _ in range(3):
                                fn(q, k, v, bool(causal), bwd, do)
                        torch.cuda.synchronize()
                        if a.ncu:
                            continue
                        with profile(activities=[ProfilerActivity.CUDA]) as prof, grad_ctx():
                            for _ in range(a.iters):
                                fn(q, k, v, bool(causal), bwd, do)
                            torch.cuda.synchronize()
                        tot = collections.OrderedDict()
                        for ev in prof.events():
                            if ev.device_type == torch.autograd.DeviceType.CUDA:
                                t = tot.setdefault(short(ev.name), [0, 0.0])
                                t[0] += 1
                                t[1] += ev.device_time
                        total = sum(t[1] for t in tot.values()) / a.iters
                        what = "fwd+bwd" if bwd else "fwd (no_grad)" if a.no_grad else "fwd"
                        print(f"d{d} s{s} causal{causal} {what} {name}: {total:.1f} us")
                        for kname, (n, us) in tot.items():
                            print(f"    {n / a.iters:4.1f} x {us / a.iters:9.1f} us  {kname}")


if __name__ == "__main__":
    main()
