"""Block-sparse attention (issue 17): flash_ext.BlockMask and attention(..., block_mask=...), forward and backward,
against the float64 reference (tests/reference.py) with the block mask expanded to an element mask.

Patterns: random at densities ~0.1 / ~0.5, none computed (0) and all computed (1), local + global (BigBird-like),
butterfly (FlashAttention's block-sparse pattern), document blocks with causal; masks broadcast over batch and heads
or per (batch, head); with causal, a window, GQA, a bias (bool and float with its gradient), softcap and sinks; odd
lengths (partial last blocks) both ways; block sizes 64 and 128. The same cases run on the CPU (float32, bfloat16)
and on CUDA (float16, bfloat16; on CUDA the block mask is folded into the bias for now: csrc/block_mask_as_bias.h).
"""
import pytest
import torch

import flash_ext
from conftest import poison_cuda_allocator, requires_cuda
from reference import assert_fa_close, attention_ref_grads
from test_attention import make_inputs

INF = float("inf")


def pattern(name, b, h, nq, nk, device):
    """A (Bm, Hm, nq, nk) bool block mask of the named pattern."""
    i = torch.arange(nq, device=device).view(-1, 1)
    j = torch.arange(nk, device=device).view(1, -1)
    if name.startswith("random"):
        density = float(name.split("-")[1])
        return torch.rand(b, h, nq, nk, device=device) < density
    if name == "none":
        return torch.zeros(b, h, nq, nk, dtype=torch.bool, device=device)
    if name == "all":
        return torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if name == "local-global":  # a band of 3 blocks, the first block row and column global
        return ((i - j).abs() <= 1) | (i == 0) | (j == 0)
    if name == "butterfly":  # j = i, or i and j differing in one bit
        x = i ^ j
        return (x & (x - 1)) == 0
    if name == "documents":  # documents of 2 / 3 / 1 / ... blocks: a block sees its own document's blocks
        doc_q = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 5] * 8, device=device)
        return doc_q[:nq].view(-1, 1) == doc_q[:nk].view(1, -1)
    raise ValueError(name)


def case(name, sq, sk, d, b, h, hk, pat, mask_dims="shared", bs=128, **kw):
    return dict(name=name, sq=sq, sk=sk, d=d, b=b, h=h, hk=hk, pat=pat, mask_dims=mask_dims, bs=bs, **kw)


CASES = [
    case("random-0.5", 300, 513, 64, 2, 4, 2, "random-0.5", "bh"),
    case("random-0.1", 700, 700, 32, 1, 2, 2, "random-0.1", "bh", bs=64),
    case("none", 200, 300, 32, 2, 2, 1, "none"),
    case("all", 257, 300, 64, 1, 3, 3, "all"),
    case("local-global", 1000, 1000, 32, 1, 2, 1, "local-global", bs=64),
    case("butterfly", 513, 513, 64, 2, 2, 2, "butterfly"),
    case("documents-causal", 700, 700, 32, 1, 4, 2, "documents", bs=64, causal=True),
    case("random-batch", 300, 200, 32, 3, 2, 2, "random-0.5", "b", bs=64),
    case("random-heads-causal", 200, 400, 64, 2, 4, 1, "random-0.5", "h", causal=True),
    case("window", 600, 600, 32, 1, 2, 2, "random-0.5", "bh", bs=64, window_size=(100, 20)),
    case("sq>sk-causal", 500, 130, 32, 2, 2, 1, "random-0.5", "bh", bs=64, causal=True),
    case("len-1x1", 1, 1, 32, 1, 2, 2, "all", bs=64),
    case("len-1x300", 1, 300, 32, 2, 2, 2, "random-0.5", "bh", bs=64),
    case("bias-bool", 300, 300, 32, 2, 2, 2, "random-0.5", "h", bias="bool"),
    case("bias-float-grad", 200, 300, 32, 2, 2, 1, "random-0.5", "bh", bs=64, bias="float"),
    case("softcap-sinks", 300, 257, 64, 1, 4, 2, "local-global", bs=64, softcap=5.0, sinks=True),
]


def make_mask(c, device):
    b, h = c["b"], c["h"]
    bm_b = b if "b" in c["mask_dims"] else 1
    bm_h = h if "h" in c["mask_dims"] else 1
    nq, nk = -(-c["sq"] // c["bs"]), -(-c["sk"] // c["bs"])
    m = pattern(c["pat"], bm_b, bm_h, nq, nk, device)
    m = m.view((1,) * (4 - m.dim()) + tuple(m.shape)).expand(bm_b, bm_h, nq, nk)
    return flash_ext.BlockMask.from_dense(m, c["sq"], c["sk"], c["bs"]), m


def check_case(device, dtype, c, deterministic=False):
    b, h, hk, sq, sk, d = c["b"], c["h"], c["hk"], c["sq"], c["sk"], c["d"]
    q, k, v = make_inputs(device, dtype, b, h, hk, sq, sk, d, False)
    bm, dense = make_mask(c, device)
    assert torch.equal(bm.to_dense(), dense)
    kw = dict(causal=c.get("causal", False), window_size=c.get("window_size", (-1, -1)), softcap=c.get("softcap", 0.0))
    bias, bias_grad, sinks = None, False, None
    if c.get("bias") == "bool":
        bias = torch.rand(b, 1, sq, sk, device=device) < 0.8
    elif c.get("bias") == "float":
        bias = torch.randn(b, 1, 1, sk, device=device).requires_grad_()
        bias_grad = True
    if c.get("sinks"):
        sinks = torch.randn(h, device=device).requires_grad_()
    dout = torch.randn(b, sq, h, d, device=device, dtype=dtype)

    poison_cuda_allocator(((b, sq, h, d), dtype), ((b, h, sq), torch.float32))
    out, lse = flash_ext.attention(q, k, v, block_mask=bm, attn_bias=bias, sinks=sinks, return_lse=True, **kw)
    out2 = flash_ext.attention(q, k, v, block_mask=bm, attn_bias=bias, sinks=sinks, deterministic=deterministic, **kw)
    leaves = [q, k, v] + ([bias] if bias_grad else []) + ([sinks] if sinks is not None else [])
    names = ["dq", "dk", "dv"] + (["dbias"] if bias_grad else []) + (["dsinks"] if sinks is not None else [])
    grads = torch.autograd.grad(out2, leaves, dout, retain_graph=deterministic)
    if deterministic:
        again = torch.autograd.grad(out2, leaves, dout)
        for name, g1, g2 in zip(names, grads, again):
            assert torch.equal(g1, g2), f"{name} differs between two deterministic backward calls"
    assert torch.equal(out, out2)

    # The reference: the block mask as an element mask, folded into the bias (float: -inf where hidden).
    elems = bm.to_elements()
    if bias is None:
        ref_bias = elems
    elif bias.dtype == torch.bool:
        ref_bias = bias & elems
    else:
        ref_bias = None  # built from the cast leaf below, so that dbias reaches the caller's shape
    results = []
    for upcast in (True, False):
        cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
        rb, leaf = ref_bias, None
        if ref_bias is None:
            leaf = cast(bias).requires_grad_()
            rb = torch.where(elems, leaf, -INF)
        out_r, lse_r, g = attention_ref_grads(dout, q, k, v, upcast, rb, sinks, False, **kw)
        if leaf is not None:  # dbias through the where, by autograd of the reference's own graph
            qq, kk, vv = (cast(t).requires_grad_() for t in (q, k, v))
            from reference import attention_ref
            o = attention_ref(qq, kk, vv, upcast=upcast, attn_bias=torch.where(elems, leaf, -INF),
                              sinks=None if sinks is None else cast(sinks), **kw)[0]
            g["dbias"] = torch.autograd.grad(o, (leaf,), dout.double() if upcast else dout)[0]
        results.append((out_r, lse_r, g))
    (out_ref, lse_ref, g_ref), (out_pt, lse_pt, g_pt) = results
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)
    for name, g in zip(names, grads):
        assert g.dtype == leaves[names.index(name)].dtype
        assert_fa_close(name, g, g_ref[name], g_pt[name], dtype)
    return out, lse, grads, dense


def _params():
    params = []
    for c in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            params.append(pytest.param("cpu", dtype, c, id=f"cpu-{str(dtype)[6:]}-{c['name']}"))
        for dtype in (torch.float16, torch.bfloat16):
            params.append(pytest.param("cuda", dtype, c, marks=[requires_cuda],
                                       id=f"cuda-{str(dtype)[6:]}-{c['name']}"))
    return params


@pytest.mark.parametrize("device,dtype,c", _params())
def test_block_sparse(device, dtype, c):
    check_case(device, dtype, c)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=[requires_cuda], id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    check_case(device, dtype, case("det", 600, 700, 64, 2, 4, 2, "random-0.5", "bh", bs=64, causal=True),
               deterministic=True)


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_rows_get_nothing(device):
    """Query blocks whose blocks are all skipped: out 0, lse -inf (the sink with sinks), zero dq; key blocks no
    query block computes: zero dk, dv; nothing NaN."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, h, sq, sk, bs = 2, 2, 300, 260, 64
    q, k, v = make_inputs(device, dtype, b, h, h, sq, sk, 32, False)
    m = torch.rand(b, h, 5, 5, device=device) < 0.6
    m[:, :, 1] = False  # query rows 64..127 compute nothing
    m[:, :, :, 3] = False  # keys 192..255 are computed by no query block
    bm = flash_ext.BlockMask.from_dense(m, sq, sk, bs)
    sinks = torch.randn(h, device=device, requires_grad=True)
    for with_sinks in (False, True):
        extra = dict(sinks=sinks) if with_sinks else {}
        out, lse = flash_ext.attention(q, k, v, block_mask=bm, return_lse=True, **extra)
        assert torch.equal(out[:, 64:128], torch.zeros_like(out[:, 64:128]))
        want = sinks.detach().view(1, h, 1).expand(b, h, 64) if with_sinks else torch.full((b, h, 64), -INF, device=device)
        assert torch.equal(lse[:, :, 64:128], want)
        out = flash_ext.attention(q, k, v, block_mask=bm, **extra)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert torch.equal(dq[:, 64:128], torch.zeros_like(dq[:, 64:128]))
        assert torch.equal(dk[:, 192:256], torch.zeros_like(dk[:, 192:256]))
        assert torch.equal(dv[:, 192:256], torch.zeros_like(dv[:, 192:256]))
        for t in (out, dq, dk, dv):
            assert not torch.isnan(t).any()


def test_density_zero_and_one():
    """density() counts computed blocks; no block computed gives out 0 and lse -inf everywhere."""
    q, k, v = make_inputs("cpu", torch.float32, 1, 2, 2, 130, 200, 32, False)
    none = flash_ext.BlockMask.from_dense(torch.zeros(3, 4, dtype=torch.bool), 130, 200, 64)
    assert none.density() == 0.0 and none.shape == (1, 1, 3, 4)
    out, lse = flash_ext.attention(q, k, v, block_mask=none, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -INF).all())
    full = flash_ext.BlockMask.from_dense(torch.ones(1, dtype=torch.bool), 130, 200, 64)
    assert full.density() == 1.0
    half = flash_ext.BlockMask.from_dense(torch.tensor([[True, False, True, False]]), 130, 200, 64)
    assert half.density() == 0.5


def test_from_fn_matches_from_dense():
    b, h, sq, sk, bs = 2, 3, 700, 900, 128
    fn = lambda bb, hh, i, j: ((i - j).abs() <= hh) | (j == bb)
    bm = flash_ext.BlockMask.from_fn(fn, b, h, sq, sk, bs)
    i = torch.arange(6).view(1, 1, -1, 1)
    j = torch.arange(8).view(1, 1, 1, -1)
    want = ((i - j).abs() <= torch.arange(h).view(1, -1, 1, 1)) | (j == torch.arange(b).view(-1, 1, 1, 1))
    assert bm.shape == (b, h, 6, 8)
    assert torch.equal(bm.to_dense(), want)
    # A predicate that ignores batch and heads gives a mask shared by all of them.
    shared = flash_ext.BlockMask.from_fn(lambda bb, hh, i, j: i >= j, b, h, sq, sk, bs)
    assert shared.shape == (1, 1, 6, 8)
    # The lists: counts, then ascending block indices; q_lists the transpose.
    kv, ql = bm.kv_lists, bm.q_lists
    for r in range(6):
        cnt = int(kv[1, 2, r, 0])
        assert kv[1, 2, r, 1:1 + cnt].tolist() == torch.nonzero(want[1, 2, r]).flatten().tolist()
    for col in range(8):
        cnt = int(ql[0, 1, col, 0])
        assert ql[0, 1, col, 1:1 + cnt].tolist() == torch.nonzero(want[0, 1, :, col]).flatten().tolist()


def test_bad_block_masks():
    q, k = torch.randn(2, 130, 4, 16), torch.randn(2, 200, 2, 16)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        flash_ext.BlockMask.from_dense(torch.ones(3, 4), 130, 200, 64)
    with pytest.raises(ValueError, match="does not broadcast to"):
        flash_ext.BlockMask.from_dense(torch.ones(3, 5, dtype=torch.bool), 130, 200, 64)
    with pytest.raises(ValueError, match="block_size must be one of"):
        flash_ext.BlockMask.from_dense(torch.ones(1, dtype=torch.bool), 130, 200, 32)
    with pytest.raises(ValueError, match="seqlen_q must be an int"):
        flash_ext.BlockMask.from_dense(torch.ones(1, dtype=torch.bool), -1, 200, 64)
    with pytest.raises(TypeError, match="fn must return a bool tensor"):
        flash_ext.BlockMask.from_fn(lambda b, h, i, j: True, 1, 1, 130, 200, 64)
    bm = flash_ext.BlockMask.from_dense(torch.ones(1, dtype=torch.bool), 130, 201, 64)
    with pytest.raises(ValueError, match="block_mask was built for seqlen_q = 130, seqlen_k = 201"):
        flash_ext.attention(q, k, k, block_mask=bm)
    with pytest.raises(TypeError, match="block_mask must be a flash_ext.BlockMask"):
        flash_ext.attention(q, k, k, block_mask=torch.ones(3, 4, dtype=torch.bool))
    # Batch / heads of the mask must be 1 or the call's.
    bm3 = flash_ext.BlockMask.from_dense(torch.ones(3, 1, 3, 4, dtype=torch.bool), 130, 200, 64)
    with pytest.raises(RuntimeError, match="block_kv must have shape"):
        flash_ext.attention(q, k, k, block_mask=bm3)


def test_bad_block_lists_on_the_op():
    """The op's own checks of the lists (what a BlockMask always gets right): both or neither, dtype, shape, block
    size, and on the CPU their values."""
    q, k = torch.randn(1, 130, 2, 16), torch.randn(1, 200, 2, 16)
    bm = flash_ext.BlockMask.from_dense(torch.rand(1, 1, 3, 4) < 0.5, 130, 200, 64)
    fwd = torch.ops.flash_ext.attention_forward
    base = (q, k, k, None, False, False, -1, -1, 0.0, None, None, 0, None)
    with pytest.raises(RuntimeError, match="block_kv and block_q must be given together"):
        fwd(*base, bm.kv_lists, None, 64)
    with pytest.raises(RuntimeError, match="block_kv must be int32"):
        fwd(*base, bm.kv_lists.long(), bm.q_lists, 64)
    with pytest.raises(RuntimeError, match="block_size must be 64 or 128"):
        fwd(*base, bm.kv_lists, bm.q_lists, 32)
    with pytest.raises(RuntimeError, match="block_kv must have shape"):  # lists of 64-blocks called with 128
        fwd(*base, bm.kv_lists, bm.q_lists, 128)
    with pytest.raises(RuntimeError, match="block_q must have shape"):
        fwd(*base, bm.kv_lists, bm.q_lists[:, :, :3], 64)
    bad = bm.kv_lists.clone()
    bad[0, 0, 0, 0] = 5
    with pytest.raises(RuntimeError, match="has count 5"):
        fwd(*base, bad, bm.q_lists, 64)
    bad = bm.kv_lists.clone()
    bad[0, 0, 0, :3] = torch.tensor([2, 3, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="ascending order"):
        fwd(*base, bad, bm.q_lists, 64)
    other = flash_ext.BlockMask.from_dense(~bm.to_dense(), 130, 200, 64)
    with pytest.raises(RuntimeError, match="the transpose of block_kv"):
        fwd(*base, bm.kv_lists, other.q_lists, 64)


def test_opcheck_and_compile():
    q, k, v = (torch.randn(2, s, n, 16, requires_grad=True) for s, n in ((130, 4), (200, 2), (200, 2)))
    bm = flash_ext.BlockMask.from_dense(torch.rand(2, 1, 3, 4) < 0.6, 130, 200, 64)
    bias = torch.randn(2, 1, 1, 200, requires_grad=True)
    args = (q, k, v, None, True, False, 50, -1, 0.0, None, bias, 0, None, bm.kv_lists, bm.q_lists, 64)
    torch.library.opcheck(torch.ops.flash_ext.attention_forward.default, args)
    torch.library.opcheck(torch.ops.flash_ext.attention.default, args)
    qd, kd, vd, bd = (t.detach() for t in (q, k, v, bias))  # the backward op itself is not differentiable
    out, lse = torch.ops.flash_ext.attention_forward(qd, kd, vd, *args[3:10], bd, *args[11:])
    dout = torch.randn_like(out)
    for bias_grad in (True, False):
        torch.library.opcheck(torch.ops.flash_ext.attention_backward.default,
                              (dout, qd, kd, vd, out, lse, 0.25, True, False, 50, -1, 0.0, None, bd, 0, None,
                               bias_grad, bm.kv_lists, bm.q_lists, 64))

    def f(q, k, v, bias):
        return flash_ext.attention(q, k, v, causal=True, attn_bias=bias, block_mask=bm)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(q, k, v, bias)
    got = compiled(q, k, v, bias)
    assert torch.equal(got, want)
    g1 = torch.autograd.grad(want, (q, k, v, bias), dout)
    g2 = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
