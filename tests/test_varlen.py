"""Variable-length (packed) attention: flash_ext.attention_varlen, flash_ext.unpad_input / pad_input and the
attention_varlen ops.

- forward and backward (out, lse, dq, dk, dv, dsinks) against the float64 reference computed one sequence at a
  time (tests/reference.py's attention_ref on each sequence's slices as a batch of 1, concatenated), by
  assert_fa_close with "PyTorch in low precision" (the same reference in the inputs' dtype) as check_variant does;
  lengths 0, 1, 17, 1023, 1025, 4097, seqlen_q != seqlen_k both ways, causal, windows, softcap, ALiBi (nheads,)
  and (batch, nheads), chunks, sinks, GQA / MQA, seqused_k (the keys past it hold large values: they must not
  change out, and get dk = dv = 0), strided q / k / v (views of packed qkv / kv buffers, padded head strides),
  max_seqlen larger than needed, deterministic backward (bitwise equal across two calls);
- CPU: rows of q and k that belong to no sequence (out 0, lse -inf, dq = dk = dv = 0);
- empty totals (every sequence of length 0);
- unpad_input / pad_input: exact round trip, gradients, and unpad -> attention_varlen -> pad against a dense
  flash_ext.attention call with a key-padding bool attn_bias;
- bad input: a clear error naming the argument;
- torch.library.opcheck of the ops and torch.compile(fullgraph=True) of attention_varlen with its backward.

CPU cases run float32 and bfloat16 (small heads and head dims, moderate lengths); CUDA cases run float16 and
bfloat16 over every CPU case and a wider grid (head dims 64, 96, 128, longer sequences).
"""
import itertools

import pytest
import torch

import flash_ext
from conftest import poison_cuda_allocator, requires_cuda
from reference import assert_fa_close, attention_ref, attention_ref_grads

INF = float("inf")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=[requires_cuda], id="cuda")]

# (nheads, nheads_k)
H_MHA, H_GQA, H_MQA = (2, 2), (4, 2), (3, 1)
HC_MHA, HC_GQA, HC_MQA = (4, 4), (6, 2), (4, 1)


def low_precision(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def vcase(name, seqs, d, heads, **kw):
    """seqs: one (len_q, len_k) per sequence, or (len_q, len_k, seqused_k) (then seqused_k is passed; len_k rows
    are allocated for the sequence in k and v, the keys past seqused_k are ignored)."""
    return dict(name=name, seqs=seqs, d=d, heads=heads, **kw)


def _lengths(seqs):
    lq = [s[0] for s in seqs]
    lk = [s[1] for s in seqs]
    used = [s[2] if len(s) == 3 else s[1] for s in seqs]
    return lq, lk, used


def _cu(lengths, device):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)


def make_varlen_inputs(device, dtype, c):
    """q (total_q, nheads, d), k, v (total_k, nheads_k, d) in the case's layout, gradients tracked (views of a
    leaf buffer for the strided layouts). Keys past seqused_k get large values (k * 20, v + 50): were they read,
    they would dominate out."""
    nheads, nheads_k = c["heads"]
    d = c["d"]
    lq, lk, used = _lengths(c["seqs"])
    total_q, total_k = sum(lq), sum(lk)
    scale = c.get("scale_inputs", 1.0)
    qd = torch.randn(total_q, nheads, d, device=device) * scale
    kd = torch.randn(total_k, nheads_k, d, device=device) * scale
    vd = torch.randn(total_k, nheads_k, d, device=device)
    start = 0
    for b in range(len(lk)):
        kd[start + used[b]: start + lk[b]] *= 20
        vd[start + used[b]: start + lk[b]] += 50
        start += lk[b]
    qd, kd, vd = qd.to(dtype), kd.to(dtype), vd.to(dtype)
    layout = c.get("layout", "packed")
    if layout == "packed":
        return qd.requires_grad_(), kd.requires_grad_(), vd.requires_grad_()
    if layout == "qkv":  # (total, 3, nheads, d): k and v use the first nheads_k heads of their slots
        assert total_q == total_k
        buf = torch.randn(total_q, 3, nheads, d, device=device).to(dtype)
        buf[:, 0] = qd
        buf[:, 1, :nheads_k] = kd
        buf[:, 2, :nheads_k] = vd
        buf.requires_grad_()
        q, k, v = buf[:, 0], buf[:, 1, :nheads_k], buf[:, 2, :nheads_k]
    elif layout == "fused":  # (total, nheads + 2 nheads_k, d), as one projection gives them
        assert total_q == total_k
        buf = torch.cat([qd, kd, vd], dim=1).requires_grad_()
        q, k, v = buf[:, :nheads], buf[:, nheads:nheads + nheads_k], buf[:, nheads + nheads_k:]
    elif layout == "kv":  # q: one slot of (total_q, 2, nheads, d); k, v: the slots of (total_k, 2, nheads_k, d)
        qbuf = torch.randn(total_q, 2, nheads, d, device=device).to(dtype)
        qbuf[:, 1] = qd
        qbuf.requires_grad_()
        kvbuf = torch.stack([kd, vd], dim=1).requires_grad_()
        q, k, v = qbuf[:, 1], kvbuf[:, 0], kvbuf[:, 1]
    elif layout == "headpad":  # each head's row padded by 8 elements: head and row strides are not d-multiples
        def padded(t):
            buf = torch.randn(t.shape[0], t.shape[1], d + 8, device=device).to(dtype)
            buf[..., :d] = t
            return buf.requires_grad_()
        q, k, v = (padded(t)[..., :d] for t in (qd, kd, vd))
    else:
        raise AssertionError(layout)
    for t in (q, k, v):
        assert t.stride(-1) == 1 and (t.numel() == 0 or not t.is_contiguous())
    return q, k, v


def make_varlen_features(device, dtype, c):
    nheads = c["heads"][0]
    batch = len(c["seqs"])
    alibi = None
    if c.get("alibi") == "h":
        alibi = torch.rand(nheads, device=device) * 0.2 + 0.01
    elif c.get("alibi") == "bh":
        alibi = torch.rand(batch, nheads, device=device) * 0.2 + 0.01
    sinks = None
    if c.get("sinks"):
        sinks = torch.randn(nheads, device=device, dtype=torch.float32).requires_grad_()
    return alibi, sinks


def mask_kwargs(c):
    return dict(causal=c.get("causal", False), window_size=c.get("window_size", (-1, -1)),
                softcap=c.get("softcap", 0.0), attention_chunk=c.get("attention_chunk", 0))


def varlen_ref_grads(dout, q, k, v, seqs, upcast, sinks=None, alibi_slopes=None, **kw):
    """The reference, one sequence at a time: attention_ref on (1, len_q, nheads, d) x (1, seqused_k, nheads_k, d)
    slices, outputs concatenated; the gradients by autograd through the slicing (keys past seqused_k and rows of
    no sequence get 0; dsinks is summed over the sequences). upcast as in attention_ref_grads. Returns
    (out (covered q rows, nheads, d), lse (nheads, covered q rows), grads {dq, dk, dv[, dsinks]})."""
    lq, lk, used = _lengths(seqs)
    cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
    q, k, v = (cast(t).requires_grad_() for t in (q, k, v))
    leaves = {"dq": q, "dk": k, "dv": v}
    if sinks is not None:
        sinks = cast(sinks).requires_grad_()
        leaves["dsinks"] = sinks
    alibi = cast(alibi_slopes) if alibi_slopes is not None else None
    outs, lses = [], []
    sq0 = sk0 = 0
    for b in range(len(seqs)):
        qs = q[sq0:sq0 + lq[b]][None]
        ks, vs = k[sk0:sk0 + used[b]][None], v[sk0:sk0 + used[b]][None]
        slopes = alibi if alibi is None or alibi.dim() == 1 else alibi[b:b + 1]
        o, lse = attention_ref(qs, ks, vs, upcast=upcast, alibi_slopes=slopes, sinks=sinks, **kw)
        outs.append(o[0])
        lses.append(lse[0])
        sq0 += lq[b]
        sk0 += lk[b]
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    dout = dout[:out.shape[0]]
    grads = torch.autograd.grad(out, list(leaves.values()), dout.double() if upcast else dout, allow_unused=True,
                                materialize_grads=True)
    return out.detach(), lse.detach(), dict(zip(leaves, grads))


def check_varlen(device, dtype, c):
    nheads, nheads_k = c["heads"]
    d = c["d"]
    seqs = c["seqs"]
    lq, lk, used = _lengths(seqs)
    total_q, total_k = sum(lq), sum(lk)
    q, k, v = make_varlen_inputs(device, dtype, c)
    alibi, sinks = make_varlen_features(device, dtype, c)
    kw = mask_kwargs(c)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=device) if any(len(s) == 3 for s in seqs) else None
    pad = c.get("max_pad", 0)
    max_q, max_k = max(lq) + pad, max(lk) + pad
    args = (q, k, v, cu_q, cu_k, max_q, max_k)
    feats = dict(seqused_k=seqused_k, alibi_slopes=alibi, sinks=sinks, **kw)
    dout = torch.randn(nheads, total_q, d, device=device, dtype=dtype).transpose(0, 1)  # not contiguous

    poison_cuda_allocator(((total_q, nheads, d), dtype), ((nheads, total_q), torch.float32))
    out, lse = flash_ext.attention_varlen(*args, return_lse=True, **feats)
    det = c.get("deterministic", False)
    poison_cuda_allocator(((total_q, nheads, d), dtype))
    out2 = flash_ext.attention_varlen(*args, deterministic=det, **feats)
    names = ["dq", "dk", "dv"] + (["dsinks"] if sinks is not None else [])
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    poison_cuda_allocator(((total_q, nheads, d), dtype), ((total_k, nheads_k, d), dtype),
                          ((total_k, nheads_k, d), dtype))
    ours = dict(zip(names, torch.autograd.grad(out2, leaves, dout, retain_graph=det)))
    if det:  # deterministic: a second backward is bitwise the first
        poison_cuda_allocator(((total_q, nheads, d), dtype), ((total_k, nheads_k, d), dtype),
                              ((total_k, nheads_k, d), dtype))
        again = torch.autograd.grad(out2, leaves, dout)
        for name, g in zip(names, again):
            assert torch.equal(g, ours[name]), f"{name} differs between two deterministic backward calls"

    out_ref, lse_ref, g_ref = varlen_ref_grads(dout, q, k, v, seqs, True, sinks, alibi, **kw)
    out_pt, lse_pt, g_pt = varlen_ref_grads(dout, q, k, v, seqs, False, sinks, alibi, **kw)
    assert out.shape == (total_q, nheads, d) and out.dtype == dtype, f"out: {tuple(out.shape)} {out.dtype}"
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32, f"lse: {tuple(lse.shape)} {lse.dtype}"
    assert torch.equal(out, out2), "out differs between two identical calls"
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)
    assert sorted(g_ref) == sorted(names)
    for name, leaf in zip(names, leaves):
        assert ours[name].dtype == leaf.dtype, f"{name}: dtype {ours[name].dtype}"
        assert_fa_close(name, ours[name], g_ref[name], g_pt[name], dtype)
    # keys past seqused_k: exactly zero gradients
    start = 0
    for b in range(len(seqs)):
        for name in ("dk", "dv"):
            ignored = ours[name][start + used[b]: start + lk[b]]
            assert torch.equal(ignored, torch.zeros_like(ignored)), \
                f"{name}: keys past seqused_k of sequence {b} have nonzero gradients"
        start += lk[b]


# ---- the cases ----

CPU_CASES = [
    vcase("plain-mixed", [(17, 17), (1, 1), (0, 5), (5, 0), (113, 203), (203, 113), (0, 0)], 32, H_GQA),
    vcase("plain-1023x1025-d40", [(1023, 1025), (1025, 1023), (1, 17)], 40, H_MHA),
    vcase("plain-d64", [(113, 203), (17, 1), (1, 17)], 64, H_MQA),
    vcase("causal", [(1023, 1025), (1025, 1023), (1, 17), (17, 1), (0, 3), (3, 0)], 32, H_MHA, causal=True),
    vcase("causal-4097", [(4097, 300), (17, 4097), (1, 1)], 32, H_MQA, causal=True),
    vcase("causal-d64-gqa", [(203, 113), (113, 203), (128, 128)], 64, H_GQA, causal=True),
    vcase("window-left", [(203, 203), (113, 300), (300, 113)], 40, H_GQA, window_size=(32, -1)),
    vcase("window-two-sided", [(203, 300), (17, 17), (1, 1023)], 32, H_MHA, window_size=(17, 5)),
    vcase("window-right-only", [(113, 203), (203, 113)], 32, H_MQA, window_size=(-1, 20)),
    vcase("window-0", [(17, 17), (50, 20), (1, 5)], 32, H_GQA, window_size=(0, 0)),  # rows that see no key
    vcase("causal-window", [(1023, 1023), (17, 113), (113, 17)], 32, H_GQA, causal=True, window_size=(50, -1)),
    vcase("softcap", [(113, 203), (203, 113), (1, 1)], 32, H_GQA, softcap=3.0, scale_inputs=2.0),
    vcase("softcap-causal-window", [(300, 300), (17, 113)], 40, H_MHA, causal=True, window_size=(40, -1),
          softcap=5.0, scale_inputs=2.0),
    vcase("alibi-h-causal", [(203, 203), (113, 300), (1, 17)], 32, H_MHA, causal=True, alibi="h"),
    vcase("alibi-bh", [(113, 203), (203, 113), (17, 1), (0, 4)], 32, H_GQA, alibi="bh"),
    vcase("chunk-causal", [(300, 300), (113, 203), (203, 113)], 32, H_GQA, causal=True, attention_chunk=64),
    vcase("chunk-causal-1025", [(1025, 1025), (1, 1)], 32, H_MQA, causal=True, attention_chunk=300),
    vcase("sinks", [(113, 203), (5, 0), (0, 5), (17, 17)], 32, H_GQA, sinks=True),
    vcase("sinks-causal-sq>sk", [(203, 113), (17, 1), (1, 1)], 32, H_MHA, causal=True, sinks=True),
    vcase("seqused_k", [(113, 300, 203), (17, 50, 0), (203, 113, 113), (1, 40, 1)], 32, H_GQA),
    vcase("seqused_k-causal-window", [(203, 300, 250), (113, 113, 17), (0, 20, 10)], 40, H_MHA, causal=True,
          window_size=(64, -1)),
    vcase("seqused_k-sinks-alibi-bh", [(113, 250, 203), (17, 20, 1)], 32, H_MQA, sinks=True, alibi="bh"),
    vcase("strided-qkv", [(113, 113), (203, 203), (1, 1), (0, 0)], 32, H_MHA, layout="qkv", causal=True),
    vcase("strided-qkv-gqa-seqused_k", [(113, 113, 100), (203, 203, 5)], 32, H_GQA, layout="qkv"),
    vcase("strided-fused-gqa", [(113, 113), (17, 17)], 40, H_GQA, layout="fused", causal=True),
    vcase("strided-kv", [(113, 203), (203, 113)], 32, H_MQA, layout="kv", window_size=(30, 30)),
    vcase("strided-headpad", [(113, 203), (203, 113), (0, 7)], 40, H_GQA, layout="headpad", causal=True),
    vcase("max_seqlen-larger", [(113, 203), (17, 1)], 32, H_GQA, causal=True, max_pad=100),
    vcase("deterministic", [(1023, 1025), (113, 203)], 32, H_GQA, causal=True, deterministic=True),
    vcase("all", [(300, 350, 203), (113, 113), (1, 17, 17), (0, 5, 3)], 32, H_GQA, layout="kv",
          window_size=(50, 10), attention_chunk=70, softcap=2.0, alibi="bh", sinks=True, deterministic=True,
          scale_inputs=2.0),
]

# CUDA only: the same features at lengths around the kernels' block sizes and past 1024, every pattern at head
# dims 64, 96 and 128; dtypes alternate, head layouts rotate, every third case deterministic.
CUDA_PATTERNS = [
    dict(name="plain", seqs=[(1023, 1025), (1025, 1023), (0, 17), (17, 0), (1, 1), (0, 0), (127, 129),
                             (257, 255)]),
    dict(name="causal", seqs=[(1023, 1025), (1025, 1023), (1, 17), (17, 1), (0, 5), (128, 128), (255, 257)],
         causal=True),
    dict(name="causal-window", seqs=[(1025, 1025), (300, 1023), (1023, 300)], causal=True, window_size=(100, -1)),
    dict(name="window-two-sided", seqs=[(1023, 1025), (17, 1025), (1025, 17)], window_size=(200, 64)),
    dict(name="window-right-only", seqs=[(700, 1025), (1023, 129)], window_size=(-1, 50)),
    dict(name="window-narrow-sq>sk", seqs=[(1300, 600), (129, 1)], window_size=(10, 0)),  # rows see no key
    dict(name="softcap", seqs=[(1023, 1025), (129, 700), (0, 3)], softcap=20.0, scale_inputs=2.0),
    dict(name="alibi-h-causal", seqs=[(1025, 1025), (300, 1023), (1, 1)], causal=True, alibi="h"),
    dict(name="alibi-bh", seqs=[(1023, 700), (700, 1023), (1, 1)], alibi="bh"),
    dict(name="chunk-causal", seqs=[(1025, 1025), (500, 1023), (1023, 500)], causal=True, attention_chunk=256),
    dict(name="sinks", seqs=[(1023, 1025), (0, 5), (5, 0), (17, 17)], sinks=True),
    dict(name="sinks-causal-sq>sk", seqs=[(1025, 300), (1, 1), (129, 17)], causal=True, sinks=True),
    dict(name="seqused_k", seqs=[(1023, 1100, 1025), (17, 300, 0), (500, 600, 1), (129, 129, 129)]),
    dict(name="seqused_k-causal-window", seqs=[(700, 1200, 1025), (1025, 1100, 1023)], causal=True,
         window_size=(64, -1)),
    dict(name="strided-qkv", seqs=[(1025, 1025), (1, 1), (300, 300, 17)], layout="qkv", causal=True),
    dict(name="strided-fused", seqs=[(1023, 1023), (129, 129)], layout="fused"),
    dict(name="strided-kv", seqs=[(1023, 700), (700, 1023)], layout="kv", window_size=(128, 128)),
    dict(name="strided-headpad", seqs=[(1023, 1025), (0, 7), (129, 1)], layout="headpad", causal=True),
    dict(name="max_seqlen-larger", seqs=[(500, 1023), (17, 1)], causal=True, max_pad=300),
    dict(name="all", seqs=[(1025, 1100, 1023), (300, 300), (1, 17, 17), (0, 5, 3)], layout="kv",
         window_size=(300, 20), attention_chunk=500, softcap=5.0, alibi="bh", sinks=True, scale_inputs=2.0),
]
CUDA_CASES = []
for _i, (_d, _p) in enumerate((d, p) for d in (64, 96, 128) for p in CUDA_PATTERNS):
    _kw = {k: v for k, v in _p.items() if k not in ("name", "seqs")}
    _kw.setdefault("deterministic", _i % 3 == 0)
    CUDA_CASES.append((torch.bfloat16 if _i % 2 else torch.float16,
                       vcase(f"{_p['name']}-d{_d}", _p["seqs"], _d, (HC_GQA, HC_MHA, HC_MQA)[_i % 3], **_kw)))
for _dtype in (torch.float16, torch.bfloat16):
    CUDA_CASES.append((_dtype, vcase("causal-4097-d128", [(4097, 4097), (1, 4097), (4097, 1)], 128, (2, 1),
                                     causal=True, deterministic=_dtype == torch.float16)))


def _params():
    params = []
    for c in CPU_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            params.append(pytest.param("cpu", dtype, c, id=f"cpu-{str(dtype)[6:]}-{c['name']}"))
    for c in CPU_CASES:
        for dtype in (torch.float16, torch.bfloat16):
            params.append(pytest.param("cuda", dtype, c, marks=[requires_cuda],
                                       id=f"cuda-{str(dtype)[6:]}-{c['name']}"))
    for dtype, c in CUDA_CASES:
        det = "-det" if c.get("deterministic") else ""
        params.append(pytest.param("cuda", dtype, c, marks=[requires_cuda],
                                   id=f"cuda-{str(dtype)[6:]}-grid-{c['name']}{det}"))
    return params


@pytest.mark.parametrize("device,dtype,c", _params())
def test_varlen(device, dtype, c):
    check_varlen(device, dtype, c)


# ---- rows of no sequence, empty totals ----

@pytest.mark.parametrize("where", ["trailing", "leading"])
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.float16, marks=[requires_cuda]),
                                          pytest.param("cuda", torch.bfloat16, marks=[requires_cuda])])
def test_rows_of_no_sequence(where, device, dtype):
    """total_q and total_k larger than the sequences cover (rows after cu_seqlens[-1], or before cu_seqlens[0]):
    those q rows get out 0, lse -inf and dq 0, those k rows dk = dv = 0, and the covered rows the reference's
    answer (on CUDA into outputs the poisoned allocator filled). The uncovered rows hold large values (q, k x 10,
    v + 50): were they read, they would dominate the covered rows' results."""
    seqs = [(17, 20), (5, 0), (30, 7), (0, 3)]
    lq, lk, _ = _lengths(seqs)
    extra_q, extra_k = 9, 6
    nheads, nheads_k, d = 4, 2, 32
    tq, tk = sum(lq) + extra_q, sum(lk) + extra_k
    if where == "leading":
        q_cov, k_cov = slice(extra_q, None), slice(extra_k, None)
        q_out, k_out = slice(0, extra_q), slice(0, extra_k)
    else:
        q_cov, k_cov = slice(0, sum(lq)), slice(0, sum(lk))
        q_out, k_out = slice(sum(lq), None), slice(sum(lk), None)
    q, k, v = torch.randn(tq, nheads, d), torch.randn(tk, nheads_k, d), torch.randn(tk, nheads_k, d)
    q[q_out] *= 10
    k[k_out] *= 10
    v[k_out] += 50
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    poison_cuda_allocator(((tq, nheads, d), dtype), ((nheads, tq), torch.float32), ((tk, nheads_k, d), dtype))
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    if where == "leading":
        cu_q, cu_k = cu_q + extra_q, cu_k + extra_k
    kw = dict(window_size=(10, 3))
    out, lse = flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), return_lse=True, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw),
                                     (q, k, v), dout)
    assert torch.equal(out[q_out], torch.zeros_like(out[q_out]))
    assert bool((lse[:, q_out] == -INF).all())
    assert torch.equal(dq[q_out], torch.zeros_like(dq[q_out]))
    assert torch.equal(dk[k_out], torch.zeros_like(dk[k_out]))
    assert torch.equal(dv[k_out], torch.zeros_like(dv[k_out]))
    qc, kc, vc = q[q_cov], k[k_cov], v[k_cov]
    out_ref, lse_ref, g_ref = varlen_ref_grads(dout[q_cov], qc, kc, vc, seqs, True, **kw)
    out_pt, lse_pt, g_pt = varlen_ref_grads(dout[q_cov], qc, kc, vc, seqs, False, **kw)
    assert_fa_close("out", out[q_cov], out_ref, out_pt, dtype)
    assert_fa_close("lse", lse[:, q_cov], lse_ref, lse_pt, torch.float32)
    for name, g in (("dq", dq[q_cov]), ("dk", dk[k_cov]), ("dv", dv[k_cov])):
        assert_fa_close(name, g, g_ref[name], g_pt[name], dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device,d", [("cpu", 32), pytest.param("cuda", 64, marks=[requires_cuda]),
                                      pytest.param("cuda", 128, marks=[requires_cuda]),
                                      pytest.param("cuda", 256, marks=[requires_cuda])])
def test_non_finite_rows_outside_sequences(device, d, causal):
    """Rows of no sequence (after cu_seqlens[-1]) and keys past seqused_k hold NaN and inf (q, k: NaN; v: inf and
    NaN; dout: NaN): nothing of them may reach a sequence's out or gradients. On CUDA a key or query block that runs
    past a sequence's end holds such rows (the sm90 forward zeroes the V rows, 0 * NaN being NaN). out and the
    gradients match the reference on the sequences' rows, and are exactly 0 on the rest."""
    seqs = [(70, 90, 77), (130, 150, 129), (33, 40, 5), (64, 128, 100)]
    lq, lk, used = _lengths(seqs)
    dtype = low_precision(device)
    nheads, nheads_k, extra = 4, 2, 24
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq + extra, nheads, d)
    k = torch.randn(tk + extra, nheads_k, d)
    v = torch.randn(tk + extra, nheads_k, d)
    q[tq:] = float("nan")
    k[tk:] = float("nan")
    v[tk:] = float("inf")
    start = 0
    for b in range(len(seqs)):
        k[start + used[b]:start + lk[b]] = float("nan")
        v[start + used[b]:start + lk[b]] = float("nan") if b % 2 else float("inf")
        start += lk[b]
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    poison_cuda_allocator(((tq + extra, nheads, d), dtype), ((tk + extra, nheads_k, d), dtype))
    out = flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), seqused_k=seqused, causal=causal)
    dout = torch.randn_like(out)
    dout[tq:] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(out[tq:], torch.zeros_like(out[tq:]))
    assert torch.equal(dq[tq:], torch.zeros_like(dq[tq:]))
    assert torch.equal(dk[tk:], torch.zeros_like(dk[tk:])) and torch.equal(dv[tk:], torch.zeros_like(dv[tk:]))
    out_ref, _, g_ref = varlen_ref_grads(dout[:tq], q[:tq], k[:tk], v[:tk], seqs, True, causal=causal)
    out_pt, _, g_pt = varlen_ref_grads(dout[:tq], q[:tq], k[:tk], v[:tk], seqs, False, causal=causal)
    assert_fa_close("out", out[:tq], out_ref, out_pt, dtype)
    for name, g in (("dq", dq[:tq]), ("dk", dk[:tk]), ("dv", dv[:tk])):
        assert_fa_close(name, g, g_ref[name], g_pt[name], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_no_sequence_over_rows(device):
    """batch 0 (cu_seqlens of one element) over q and k rows: every q row is a row of no sequence, so out is 0
    (into outputs the poisoned allocator filled), lse -inf and every gradient 0."""
    dtype = low_precision(device)
    q = torch.randn(5, 4, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(3, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(3, 2, 32, device=device, dtype=dtype, requires_grad=True)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    poison_cuda_allocator(((5, 4, 32), dtype))
    out, lse = flash_ext.attention_varlen(q, k, v, cu, cu, 1, 1, causal=True, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -INF).all())
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lq,lk", [((0, 0), (0, 0)), ((0, 0), (5, 3)), ((4, 1), (0, 0))])
def test_empty_totals(device, lq, lk):
    """Every sequence empty on one side or both: out 0 (no NaN), lse -inf (the sink with sinks), zero gradients;
    max_seqlen 0 where that side's total is 0."""
    dtype = low_precision(device)
    q = torch.randn(sum(lq), 4, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lk), 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lk), 2, 32, device=device, dtype=dtype, requires_grad=True)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    sinks = torch.randn(4, device=device, requires_grad=True)
    for causal, with_sinks in ((False, False), (True, False), (False, True)):
        extra = dict(sinks=sinks) if with_sinks else {}
        out, lse = flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                              return_lse=True, **extra)
        assert out.shape == (sum(lq), 4, 32) and lse.shape == (4, sum(lq))
        assert torch.equal(out, torch.zeros_like(out))
        if sum(lk) == 0:
            want = sinks.detach().view(4, 1).expand(4, sum(lq)) if with_sinks else torch.full_like(lse, -INF)
            assert torch.equal(lse, want)
        out = flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, **extra)
        leaves = (q, k, v) + ((sinks,) if with_sinks else ())
        grads = torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True, materialize_grads=True)
        for g, t in zip(grads, leaves):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


# ---- unpad_input / pad_input ----

def _mask(batch, seqlen, device, kind):
    mask = torch.rand(batch, seqlen, device=device) < 0.6
    mask[0] = True  # a full row
    mask[1] = False  # an empty row
    mask[2] = False
    mask[2, seqlen // 2] = True  # a single token
    if kind == "int":
        return mask.to(torch.int32) * torch.randint(1, 4, (batch, seqlen), device=device, dtype=torch.int32)
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bool", "int"])
@pytest.mark.parametrize("trailing", [(4, 8), (16,)])
def test_unpad_pad_round_trip(device, kind, trailing):
    b, s = 5, 23
    x = torch.randn(b, s, *trailing, device=device)
    mask = _mask(b, s, device, kind)
    real = mask != 0
    x_unpad, indices, cu_seqlens, max_seqlen = flash_ext.unpad_input(x, mask)
    assert indices.dtype == torch.int64 and cu_seqlens.dtype == torch.int32 and type(max_seqlen) is int
    assert torch.equal(indices, real.flatten().nonzero().flatten())
    assert torch.equal(x_unpad, x.flatten(0, 1)[real.flatten()])
    lengths = real.sum(1)
    assert torch.equal(cu_seqlens.long().cpu(), torch.tensor([0] + lengths.cumsum(0).tolist()))
    assert max_seqlen == int(lengths.max())
    padded = flash_ext.pad_input(x_unpad, indices, b, s)
    assert padded.shape == x.shape
    want = x * real.view(b, s, *([1] * len(trailing)))
    assert torch.equal(padded, want)
    assert torch.equal(padded[~real], torch.zeros_like(padded[~real]))


@pytest.mark.parametrize("device", DEVICES)
def test_unpad_pad_gradients(device):
    b, s, h, d = 5, 23, 3, 8
    mask = _mask(b, s, device, "bool")
    x = torch.randn(b, s, h, d, device=device, requires_grad=True)
    w = torch.randn(b, s, h, d, device=device)
    x_unpad, indices, _, _ = flash_ext.unpad_input(x, mask)
    y = flash_ext.pad_input(x_unpad, indices, b, s)
    (gx,) = torch.autograd.grad((y * w).sum(), (x,))
    assert torch.equal(gx, w * mask.view(b, s, 1, 1))
    # each alone
    w_unpad = torch.randn_like(x_unpad)
    (gx,) = torch.autograd.grad((flash_ext.unpad_input(x, mask)[0] * w_unpad).sum(), (x,))
    want = torch.zeros_like(x).flatten(0, 1)
    want[indices] = w_unpad
    assert torch.equal(gx, want.view_as(x))
    leaf = x_unpad.detach().requires_grad_()
    (gu,) = torch.autograd.grad((flash_ext.pad_input(leaf, indices, b, s) * w).sum(), (leaf,))
    assert torch.equal(gu, w.flatten(0, 1)[indices])
    # gradcheck in float64
    x64 = torch.randn(3, 7, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    m = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0] * 7, [1] * 7], device=device).bool()
    idx = flash_ext.unpad_input(x64, m)[1]
    assert torch.autograd.gradcheck(lambda t: flash_ext.pad_input(flash_ext.unpad_input(t, m)[0], idx, 3, 7),
                                    (x64,))


@pytest.mark.parametrize("mask_kind", ["random", "left-aligned"])
def test_unpad_varlen_pad_matches_dense_key_padding(mask_kind):
    """unpad -> attention_varlen -> pad equals a dense flash_ext.attention with the key-padding bool attn_bias
    (batch, 1, 1, seqlen) on the real rows (float32, CPU), forward and backward (dout 0 at padding); both against
    the float64 reference by assert_fa_close too."""
    b, s, h, hk, d = 4, 37, 4, 2, 32
    if mask_kind == "random":
        mask = _mask(b, s, "cpu", "bool")
    else:
        mask = torch.arange(s)[None, :] < torch.tensor([37, 0, 1, 20])[:, None]
    q = torch.randn(b, s, h, d, requires_grad=True)
    k = torch.randn(b, s, hk, d, requires_grad=True)
    v = torch.randn(b, s, hk, d, requires_grad=True)
    dout = torch.randn(b, s, h, d) * mask.view(b, s, 1, 1)
    qu, idx, cu, max_s = flash_ext.unpad_input(q, mask)
    ku, idx_k, cu_k, max_k = flash_ext.unpad_input(k, mask)
    vu = flash_ext.unpad_input(v, mask)[0]
    assert torch.equal(idx, idx_k) and torch.equal(cu, cu_k) and max_s == max_k
    out_u = flash_ext.attention_varlen(qu, ku, vu, cu, cu, max_s, max_s)
    out = flash_ext.pad_input(out_u, idx, b, s)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    bias = mask.view(b, 1, 1, s)
    dense = flash_ext.attention(q, k, v, attn_bias=bias)
    dense_grads = torch.autograd.grad(dense, (q, k, v), dout)
    real = mask
    torch.testing.assert_close(out[real], dense[real])
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    for name, g, gd in zip(("dq", "dk", "dv"), grads, dense_grads):
        torch.testing.assert_close(g, gd, msg=lambda m: f"{name}: {m}")
    out_ref, _, g_ref = attention_ref_grads(dout, q, k, v, True, bias)
    out_pt, _, g_pt = attention_ref_grads(dout, q, k, v, False, bias)
    assert_fa_close("out", out[real], out_ref[real], out_pt[real], torch.float32)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_fa_close(name, g, g_ref[name], g_pt[name], torch.float32)


# ---- bad input: a clear error naming the argument ----

def _valid(device):
    q = torch.randn(10, 4, 16, device=device)
    k = torch.randn(12, 2, 16, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor([0, 4, 10], **i32),
                cu_seqlens_k=torch.tensor([0, 5, 12], **i32), max_seqlen_q=6, max_seqlen_k=7)


def _call(a, **kw):
    return flash_ext.attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                      a["max_seqlen_q"], a["max_seqlen_k"], **kw)


# (name, match, changes(args, device) -> (args, kwargs))
BAD_ANY_DEVICE = [
    ("cu_seqlens_q-int64", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long())),
    ("cu_seqlens_q-float", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].float())),
    ("cu_seqlens_k-int64", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"].long())),
    ("cu_seqlens_q-2d", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].view(1, 3))),
    ("cu_seqlens_k-2d", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"].view(3, 1))),
    ("cu_seqlens-lengths-differ", "cu_seqlens",
     lambda a: dict(cu_seqlens_k=torch.cat([a["cu_seqlens_k"], a["cu_seqlens_k"][-1:]]))),
    ("q-4d", r"\bq\b", lambda a: dict(q=a["q"][None])),
    ("q-2d", r"\bq\b", lambda a: dict(q=a["q"].flatten(1))),
    ("k-4d", r"\bk\b", lambda a: dict(k=a["k"][None], v=a["v"][None])),
    ("v-4d", r"\bv\b", lambda a: dict(v=a["v"][None])),
    ("max_seqlen_q-negative", "max_seqlen_q", lambda a: dict(max_seqlen_q=-1)),
    ("max_seqlen_q-0", "max_seqlen_q", lambda a: dict(max_seqlen_q=0)),
    ("max_seqlen_k-negative", "max_seqlen_k", lambda a: dict(max_seqlen_k=-3)),
    ("seqused_k-batch+1", "seqused_k", lambda a: dict(kw=dict(seqused_k=torch.tensor(
        [5, 7, 0], dtype=torch.int32, device=a["q"].device)))),
    ("seqused_k-2d", "seqused_k", lambda a: dict(kw=dict(seqused_k=torch.tensor(
        [[5], [7]], dtype=torch.int32, device=a["q"].device)))),
    ("seqused_k-int64", "seqused_k", lambda a: dict(kw=dict(seqused_k=torch.tensor(
        [5, 7], dtype=torch.int64, device=a["q"].device)))),
]
BAD_CPU = [
    ("cu_seqlens_q-decreasing", "cu_seqlens_q",
     lambda a: dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32))),
    ("cu_seqlens_k-decreasing", "cu_seqlens_k",
     lambda a: dict(cu_seqlens_k=torch.tensor([0, 7, 5], dtype=torch.int32))),
    ("cu_seqlens_q-past-total_q", "cu_seqlens_q",
     lambda a: dict(cu_seqlens_q=torch.tensor([0, 5, 11], dtype=torch.int32))),
    ("cu_seqlens_k-past-total_k", "cu_seqlens_k",
     lambda a: dict(cu_seqlens_k=torch.tensor([0, 6, 13], dtype=torch.int32))),
    ("longer-than-max_seqlen_q", "max_seqlen_q", lambda a: dict(max_seqlen_q=5)),
    ("longer-than-max_seqlen_k", "max_seqlen_k", lambda a: dict(max_seqlen_k=6)),
]


def _bad_params():
    params = []
    for name, match, change in BAD_ANY_DEVICE:
        params.append(pytest.param("cpu", match, change, id=f"cpu-{name}"))
        params.append(pytest.param("cuda", match, change, marks=[requires_cuda], id=f"cuda-{name}"))
    for name, match, change in BAD_CPU:
        params.append(pytest.param("cpu", match, change, id=f"cpu-{name}"))
    return params


def test_valid_base_case_of_the_bad_inputs():
    """The base every bad-input case changes one thing of runs (so each raise comes from that one change)."""
    a = _valid("cpu")
    out = _call(a)
    assert out.shape == (10, 4, 16) and torch.isfinite(out).all()
    out = _call(a, seqused_k=torch.tensor([5, 7], dtype=torch.int32))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device,match,change", _bad_params())
def test_bad_input(device, match, change):
    a = _valid(device)
    changes = change(a)
    kw = changes.pop("kw", {})
    a.update({name: (t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in changes.items()})
    with pytest.raises(Exception, match=match):
        _call(a, **kw)


# ---- op registration: opcheck, torch.compile ----

def _small_varlen(requires_grad=True, dtype=torch.float32, seqs=((7, 9, 6), (0, 3, 3), (5, 5, 0), (4, 6, 6)),
                  heads=(4, 2), d=16):
    lq, lk, used = _lengths(seqs)
    mk = lambda n, h: torch.randn(n, h, d, dtype=dtype, requires_grad=requires_grad)
    q, k, v = mk(sum(lq), heads[0]), mk(sum(lk), heads[1]), mk(sum(lk), heads[1])
    return (q, k, v, _cu(lq, "cpu"), _cu(lk, "cpu"), max(lq), max(lk),
            torch.tensor(used, dtype=torch.int32))


def _op_args(variant, requires_grad=True):
    q, k, v, cu_q, cu_k, max_q, max_k, used = _small_varlen(requires_grad)
    sinks = torch.randn(4, requires_grad=requires_grad)
    if variant == "plain":
        return (q, k, v, cu_q, cu_k, max_q, max_k, None, None, False, False, -1, -1, 0.0, None, 0, None)
    if variant == "causal-chunk-sinks":
        return (q, k, v, cu_q, cu_k, max_q, max_k, None, 0.3, True, True, -1, -1, 0.0, None, 4, sinks)
    # all: seqused_k, window, softcap, (batch, nheads) slopes, chunk, sinks
    return (q, k, v, cu_q, cu_k, max_q, max_k, used, None, False, False, 3, 1, 1.5, torch.rand(4, 4) * 0.1, 4,
            sinks)


@pytest.mark.parametrize("variant", ["plain", "causal-chunk-sinks", "all"])
def test_opcheck_varlen_forward(variant):
    args = _op_args(variant)
    torch.library.opcheck(torch.ops.flash_ext.attention_varlen_forward.default, args)
    torch.library.opcheck(torch.ops.flash_ext.attention_varlen.default, args)


@pytest.mark.parametrize("variant", ["plain", "causal-chunk-sinks", "all"])
def test_opcheck_varlen_backward(variant):
    (q, k, v, cu_q, cu_k, max_q, max_k, used, scale, causal, det, wl, wr, softcap, alibi, chunk,
     sinks) = _op_args(variant, requires_grad=False)
    out, lse = torch.ops.flash_ext.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, used, scale, causal,
                                                            det, wl, wr, softcap, alibi, chunk, sinks)
    dout = torch.randn_like(out)
    scale = scale if scale is not None else 16 ** -0.5
    torch.library.opcheck(torch.ops.flash_ext.attention_varlen_backward.default,
                          (dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, used, scale, causal, det, wl, wr,
                           softcap, alibi, chunk, sinks))
    dq, dk, dv, dsinks = torch.ops.flash_ext.attention_varlen_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, used, scale, causal, det, wl, wr, softcap, alibi, chunk,
        sinks)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dsinks.shape == ((4,) if sinks is not None else (0,))


def test_gradcheck_float64_varlen():
    """torch.autograd.gradcheck of attention_varlen (float64 on the CPU) with every feature and seqused_k."""
    q, k, v, cu_q, cu_k, max_q, max_k, used = _small_varlen(
        dtype=torch.float64, seqs=((6, 7, 5), (0, 3, 3), (3, 3, 0), (4, 5, 5)), heads=(2, 1), d=8)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(4, 2, dtype=torch.float64) * 0.5

    def f(q, k, v, sinks):
        return flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k=used, window_size=(3, 1),
                                          attention_chunk=4, softcap=1.5, alibi_slopes=slopes, sinks=sinks)
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))

    def g(q, k, v):
        return flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    assert torch.autograd.gradcheck(g, (q, k, v))


class VarlenBlock(torch.nn.Module):
    """Packed tokens (total, dim) -> one qkv projection viewed (total, 3, nheads, head_dim) (strided q, k, v) ->
    attention_varlen with causal + window + softcap + chunks + learned sinks + per-sequence ALiBi + seqused_k."""

    def __init__(self, dim=64, nheads=4, batch=3):
        super().__init__()
        self.nheads = nheads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.sinks = torch.nn.Parameter(torch.randn(nheads))
        self.register_buffer("slopes", torch.rand(batch, nheads) * 0.1)

    def forward(self, x, cu_seqlens, max_seqlen, seqused_k):
        total, dim = x.shape
        q, k, v = self.qkv(x).view(total, 3, self.nheads, dim // self.nheads).unbind(1)
        o = flash_ext.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       seqused_k=seqused_k, causal=True, window_size=(8, 0), softcap=5.0,
                                       sinks=self.sinks.float(), alibi_slopes=self.slopes.float(),
                                       attention_chunk=16)
        return self.proj(o.reshape(total, dim))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_varlen(device):
    torch._dynamo.reset()
    dtype = low_precision(device)
    model = VarlenBlock().to(device=device, dtype=dtype)
    lengths = [37, 1, 20]
    cu = _cu(lengths, device)
    used = torch.tensor([30, 1, 20], dtype=torch.int32, device=device)
    x = torch.randn(sum(lengths), 64, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x, cu, max(lengths), used)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x] + list(model.parameters()))
    y = compiled(x, cu, max(lengths), used)
    g = torch.autograd.grad(y.square().sum(), [x] + list(model.parameters()))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_eager, **tol)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, **tol)


# ---- no host synchronization (CUDA): sync debug mode, CUDA-graph capture ----

@requires_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_no_sync_and_graph_replay(d):
    """The CUDA forward and backward read cu_seqlens / seqused_k on the device only: attention_varlen with its
    backward runs under torch.cuda.set_sync_debug_mode("error") (a synchronizing call raises), and a CUDA graph of
    the forward and backward ops, captured once, replays on new values of every input, cu_seqlens and seqused_k
    included (same totals, lengths within max_seqlen), bit for bit as the ops called eagerly on those values
    (deterministic mode). (The graph holds the ops themselves: autograd's engine inside a capture would make the
    capture stream wait on the stream dout was made on.)"""
    dtype, nheads, nheads_k = torch.bfloat16, 4, 2
    max_q, max_k, tq, tk = 300, 260, 420, 400
    scale = d ** -0.5

    def draw():
        lq, lk, used = [150, 3, 267], [120, 20, 260], [100, 20, 255]
        if torch.rand(()) < 0.5:
            lq, lk, used = [0, 300, 120], [260, 40, 100], [260, 33, 99]
        cu_q, cu_k = _cu(lq + [tq - sum(lq)], "cuda")[:-1], _cu(lk + [tk - sum(lk)], "cuda")[:-1]
        return cu_q, cu_k, torch.tensor(used, dtype=torch.int32, device="cuda")

    q = torch.randn(tq, nheads, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(tk, nheads_k, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(tk, nheads_k, d, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(tq, nheads, d, device="cuda", dtype=dtype)
    cu_q, cu_k, used = draw()

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = flash_ext.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k=used, causal=True,
                                         window_size=(100, 0), deterministic=True)
        torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    q, k, v = q.detach(), k.detach(), v.detach()
    ops = torch.ops.flash_ext

    def step():  # causal, deterministic, window (100, 0)
        out, lse = ops.attention_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, used, scale, True, True, 100, 0)
        dq, dk, dv, _ = ops.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, used, scale,
                                                      True, True, 100, 0)
        return out, dq, dk, dv

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        for t in (q, k, v, dout):
            t.copy_(torch.randn_like(t))
        new_q, new_k, new_used = draw()
        cu_q.copy_(new_q), cu_k.copy_(new_k), used.copy_(new_used)
        graph.replay()
        eager = step()
        for name, a, b in zip(("out", "dq", "dk", "dv"), captured, eager):
            assert not torch.isnan(a).any(), f"{name}: NaN after replay"
            assert torch.equal(a, b), f"{name}: the replayed graph differs from the eager call"
