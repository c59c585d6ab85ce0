"""A handful of small forward+backward calls for compute-sanitizer (memcheck / racecheck): seqlen tails,
causal with seqlen_q != seqlen_k both ways, GQA, padded head dims (also ones not a multiple of 8),
deterministic mode, inputs whose base pointers are not 16-byte aligned, the local mask (sliding windows, chunks,
key blocks no query sees); each family.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/sanitize_cases.py

Each forward and backward is synchronized and reported on its own line, so a run that stops shows where.
FLASH_EXT_SANITIZE_ONLY=dense|local|varlen|blocksparse|dropout runs one group of cases.
FLASH_EXT_SANITIZE_DUMP_AFTER=<seconds> prints every thread's Python stack after that long (and again each period),
for a run that hangs (a racecheck run did, on one machine; csrc/kernels/sm90/NOTES.md, seventh session).
"""
import faulthandler
import itertools
import os

import torch

import flash_ext

CASES = [  # batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, deterministic[, input offset]
    (1, 17, 203, 2, 1, 64, False, False),
    (2, 113, 77, 4, 2, 128, True, False),
    (1, 77, 113, 2, 2, 80, True, True),
    (1, 130, 130, 2, 1, 256, True, False),
    (1, 1, 33, 1, 1, 32, False, True),
    (2, 129, 1100, 16, 8, 64, False, False),  # 144 key-block tiles: the sm90 persistent backward's later tiles
    (1, 65, 4100, 1, 1, 128, False, False),  # seqlen_k >= 4096: the sm90 d128 forward's 144-key blocks
    # 144 causal key-block tiles (the sm90 backward's dynamic schedule); the sm90 forward's persistent paired
    # schedule with 9 query blocks (160 pairs, more than the SMs)
    (2, 1100, 1100, 16, 8, 128, True, False),
    # the sm90 d64 causal forward with 3 warpgroups (seqlen_q > 1024) skipping key blocks per warpgroup; the last
    # tile's third warpgroup has no row below seqlen_q
    (1, 1050, 1300, 4, 2, 64, True, False),
    # head dims that are not multiples of 8 (zero-padded inside the op)
    (2, 77, 130, 4, 2, 59, True, False),
    (1, 130, 77, 2, 1, 111, False, True),
    # q, k, v, dout views 1 / 2 elements into their buffers (base pointers not 16-byte aligned: copied)
    (2, 77, 130, 4, 2, 64, False, False, 1),
    (1, 130, 77, 2, 2, 128, True, True, 2),
]
# The local mask policy: (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, deterministic, attention kwargs).
LOCAL_CASES = [
    (1, 300, 700, 2, 1, 64, False, dict(window_size=(100, 0))),  # keys 0..299 seen by no query: dK / dV = 0
    (2, 513, 257, 4, 2, 128, True, dict(window_size=(64, 32))),   # rows that see no key (i' < -32)
    (1, 260, 260, 2, 2, 256, False, dict(window_size=(-1, 5), attention_chunk=96)),
    (1, 200, 333, 2, 1, 96, True, dict(causal=True, attention_chunk=64)),
    # score modifiers, bias (bool key padding; float with odd lengths, its gradient) and sinks
    (2, 301, 203, 4, 2, 64, False, dict(softcap=5.0, alibi="bh", bias=("kpm", torch.bool), sinks=True)),
    (1, 203, 301, 2, 1, 128, True, dict(causal=True, bias=("full", torch.float32), softcap=3.0)),
    (1, 129, 77, 2, 2, 256, False, dict(window_size=(20, 20), bias=("full", torch.bfloat16), alibi="h", sinks=True)),
]

# Attention dropout (the general path's dropout instantiations): as LOCAL_CASES; tails, GQA, d256, both modes.
DROPOUT_CASES = [
    (2, 113, 203, 4, 2, 64, False, dict(dropout_p=0.2)),
    (1, 300, 257, 2, 1, 128, True, dict(dropout_p=0.5, causal=True)),
    (1, 130, 77, 2, 2, 256, False, dict(dropout_p=0.1, window_size=(30, 0), softcap=4.0)),
    (1, 77, 130, 2, 2, 96, True, dict(dropout_p=0.3, bias=("kpm", torch.bool), sinks=True)),
]

# Variable-length batches: (per-sequence (len_q, len_k[, seqused_k]), nheads, nheads_k, head_dim, deterministic,
# kwargs). Empty sequences, lengths off the block sizes, trailing rows of no sequence, keys past seqused_k.
VARLEN_CASES = [
    ([(130, 70), (0, 40), (1, 1), (257, 300), (64, 0)], 4, 2, 64, False, dict(causal=True)),
    ([(77, 200, 150), (300, 129, 100), (5, 5, 0)], 2, 1, 128, True, dict(window_size=(50, 10))),
    ([(200, 200), (33, 513)], 2, 2, 256, False, dict(softcap=4.0, sinks=True)),
    ([(65, 130), (129, 63)], 3, 1, 96, True, dict(causal=True, alibi="bh")),
    # several key-block tiles per sequence, blocks crossing both ends, deterministic
    ([(700, 900), (130, 129), (1000, 1000, 777)], 4, 2, 64, True, dict()),
]


# Block-sparse (flash_ext.BlockMask): batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, block_size, density,
# deterministic, causal; partial last blocks, a float bias with its gradient on the second.
BLOCKSPARSE_CASES = [
    (2, 300, 513, 4, 2, 64, 128, 0.5, False, True),
    (1, 130, 200, 2, 1, 128, 64, 0.3, True, False),
]


def varlen_inputs(seqs, h, hk, d):
    """Packed q / k / v for the sequences (3 rows of no sequence after the last), cu_seqlens, seqused_k."""
    lq = [s[0] for s in seqs]
    lk = [s[1] for s in seqs]
    cu = lambda ls: torch.tensor([0] + list(itertools.accumulate(ls)), device="cuda", dtype=torch.int32)
    used = None
    if any(len(s) == 3 for s in seqs):
        used = torch.tensor([s[2] if len(s) == 3 else s[1] for s in seqs], device="cuda", dtype=torch.int32)
    q = make((sum(lq) + 3, h, d), 0)
    k, v = make((sum(lk) + 3, hk, d), 0), make((sum(lk) + 3, hk, d), 0)
    return q, k, v, cu(lq), cu(lk), max(lq), max(lk), used


def feature_tensors(b, sq, sk, h, kw):
    """kw with its tensor arguments made: alibi "h" / "bh", bias (shape name, dtype) (a float bias requires grad),
    sinks (learned, per head)."""
    kw = dict(kw)
    leaves = []
    if "alibi" in kw:
        kw["alibi_slopes"] = torch.rand((h,) if kw.pop("alibi") == "h" else (b, h), device="cuda") * 0.1
    if "bias" in kw:
        shape_name, dtype = kw.pop("bias")
        shape = (b, 1, 1, sk) if shape_name == "kpm" else (b, h, sq, sk)
        if dtype == torch.bool:
            kw["attn_bias"] = torch.rand(shape, device="cuda") < 0.8
        else:
            kw["attn_bias"] = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
            leaves.append(kw["attn_bias"])
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(h, device="cuda", requires_grad=True)
        leaves.append(kw["sinks"])
    return kw, leaves


def make(shape, offset):
    """A bf16 leaf of `shape`; with an offset, a view that many elements into a larger buffer."""
    if not offset:
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    n = 1
    for s in shape:
        n *= s
    buf = torch.randn(n + offset, device="cuda", dtype=torch.bfloat16)
    return buf[offset:].view(shape).requires_grad_()


def main():
    dump_after = float(os.environ.get("FLASH_EXT_SANITIZE_DUMP_AFTER", "0"))
    if dump_after > 0:
        faulthandler.dump_traceback_later(dump_after, repeat=True)
    only = os.environ.get("FLASH_EXT_SANITIZE_ONLY", "")
    names = ("dense", "local", "varlen", "blocksparse", "dropout")
    assert only in ("",) + names, f"FLASH_EXT_SANITIZE_ONLY={only!r}: expected one of {names}"
    groups = {g: not only or only == g for g in names}
    families = [os.environ.get("FLASH_EXT_BACKEND", "")] if os.environ.get("FLASH_EXT_BACKEND") else ["sm80", "sm90"]
    if torch.cuda.get_device_capability() != (9, 0):
        families = ["sm80"]
    for family in families:
        os.environ["FLASH_EXT_BACKEND"] = family
        for b, sq, sk, h, hk, d, causal, det, *offset in CASES if groups["dense"] else []:
            off = offset[0] if offset else 0
            q, k, v = make((b, sq, h, d), off), make((b, sk, hk, d), off), make((b, sk, hk, d), off)
            case = f"{family} b{b} sq{sq} sk{sk} h{h}/{hk} d{d} causal={causal} det={det} offset={off}"
            out = flash_ext.attention(q, k, v, causal=causal, deterministic=det)
            torch.cuda.synchronize()
            print(f"{case}: forward done", flush=True)
            dout = make(tuple(out.shape), off).detach()
            torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
            print(f"{case}: backward done", flush=True)
        for b, sq, sk, h, hk, d, det, kw in ((LOCAL_CASES if groups["local"] else []) +
                                             (DROPOUT_CASES if groups["dropout"] else [])):
            q, k, v = make((b, sq, h, d), 0), make((b, sk, hk, d), 0), make((b, sk, hk, d), 0)
            case = f"{family} b{b} sq{sq} sk{sk} h{h}/{hk} d{d} det={det} {kw}"
            args, leaves = feature_tensors(b, sq, sk, h, kw)
            out = flash_ext.attention(q, k, v, deterministic=det, **args)
            torch.cuda.synchronize()
            print(f"{case}: forward done", flush=True)
            torch.autograd.grad(out, [q, k, v] + leaves, torch.randn_like(out))
            torch.cuda.synchronize()
            print(f"{case}: backward done", flush=True)
        for seqs, h, hk, d, det, kw in VARLEN_CASES if groups["varlen"] else []:
            q, k, v, cu_q, cu_k, max_q, max_k, used = varlen_inputs(seqs, h, hk, d)
            case = f"{family} varlen {seqs} h{h}/{hk} d{d} det={det} {kw}"
            args, leaves = feature_tensors(len(seqs), max_q, max_k, h, kw)
            out = flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k=used, deterministic=det,
                                             **args)
            torch.cuda.synchronize()
            print(f"{case}: forward done", flush=True)
            torch.autograd.grad(out, [q, k, v] + leaves, torch.randn_like(out))
            torch.cuda.synchronize()
            print(f"{case}: backward done", flush=True)
        for i, (b, sq, sk, h, hk, d, bs, density, det, causal) in enumerate(
                BLOCKSPARSE_CASES if groups["blocksparse"] else []):
            q, k, v = make((b, sq, h, d), 0), make((b, sk, hk, d), 0), make((b, sk, hk, d), 0)
            mask = torch.rand(b, 1, -(-sq // bs), -(-sk // bs), device="cuda") < density
            bm = flash_ext.BlockMask.from_dense(mask, sq, sk, bs)
            bias = torch.randn(b, 1, 1, sk, device="cuda", requires_grad=True) if i % 2 else None
            case = f"{family} blocksparse b{b} sq{sq} sk{sk} h{h}/{hk} d{d} bs{bs} det={det} causal={causal}"
            out = flash_ext.attention(q, k, v, block_mask=bm, attn_bias=bias, causal=causal, deterministic=det)
            torch.cuda.synchronize()
            print(f"{case}: forward done", flush=True)
            torch.autograd.grad(out, [q, k, v] + ([bias] if bias is not None else []), torch.randn_like(out))
            torch.cuda.synchronize()
            print(f"{case}: backward done", flush=True)
        ran = sum(len(c) for c, g in ((CASES, "dense"), (LOCAL_CASES, "local"), (VARLEN_CASES, "varlen"),
                                      (BLOCKSPARSE_CASES, "blocksparse"), (DROPOUT_CASES, "dropout")) if groups[g])
        print(f"{family}: {ran} cases ran", flush=True)


if __name__ == "__main__":
    main()
