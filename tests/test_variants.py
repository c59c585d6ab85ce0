"""Issue 15's masks and score modifiers: sliding window, causal + window, attention chunks, softcap, ALiBi, attention
bias (float and bool, broadcast in every way) and sinks, alone and combined, forward and backward (dq, dk, dv,
dbias, dsinks) against the float64 reference (tests/reference.py) by assert_fa_close; fully masked rows;
flash_ext.sdpa against torch's SDPA (math backend) with masks and top-left causal; bad input; opcheck and
torch.compile with the new arguments.

The same cases run on the CPU (float32, bfloat16) and on CUDA (float16, bfloat16): the CUDA kernels have every
feature (the local mask policy of csrc/kernels/mask.cuh, the score modifiers and the bias of
csrc/kernels/score_mod.cuh, the sinks of csrc/kernels/softmax.cuh), and LOCAL_CUDA_CASES below adds a grid of
them over every kernel head dim.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_ext
from conftest import poison_cuda_allocator, requires_cuda
from reference import assert_fa_close, attention_ref, attention_ref_grads
from test_attention import make_inputs

INF = float("inf")

# (batch, nheads, nheads_k, bhsd inputs)
L_MHA, L_GQA, L_MQA, L_T = (1, 4, 4, False), (2, 6, 2, True), (2, 4, 1, False), (1, 3, 3, True)


def case(name, sq, sk, d, layout, **kw):
    return dict(name=name, sq=sq, sk=sk, d=d, layout=layout, **kw)


# bias: (shape, kind, dtype, requires_grad) with shape one of BIAS_SHAPES, kind float | bool | neginf (float with
# -inf entries and a fully -inf row), dtype f32 | q (the inputs' dtype).
CASES = [
    # window + causal (causal makes the right bound 0, whatever window_size says)
    case("window-causal", 203, 203, 64, L_MHA, causal=True, window_size=(32, -1)),
    case("window-causal-right5", 203, 203, 40, L_GQA, causal=True, window_size=(17, 5)),
    case("window-causal-1023", 1023, 1023, 64, L_MHA, causal=True, window_size=(100, -1)),
    case("window-causal-sq<sk", 113, 1023, 32, L_T, causal=True, window_size=(64, -1)),
    case("window-causal-sq>sk", 1023, 203, 32, L_MQA, causal=True, window_size=(17, 3)),
    # window + softcap
    case("window-softcap", 113, 203, 32, L_GQA, window_size=(16, 16), softcap=3.0, scale_inputs=2.0),
    case("window-softcap-d128", 203, 600, 128, L_MHA, window_size=(100, 50), softcap=10.0, scale_inputs=2.0),
    # chunks
    case("chunk-causal", 203, 203, 64, L_GQA, causal=True, attention_chunk=64),
    case("chunk-causal-1023", 1023, 1023, 32, L_T, causal=True, attention_chunk=300),
    case("chunk", 113, 203, 32, L_MHA, attention_chunk=50),
    case("chunk-sq>sk", 203, 113, 32, L_MQA, attention_chunk=40),  # i' < 0: floor division
    case("chunk-window", 600, 600, 64, L_T, attention_chunk=128, window_size=(40, 40)),
    # sinks
    case("sinks", 113, 203, 64, L_GQA, sinks="f32"),
    case("sinks-causal", 203, 113, 32, L_MHA, causal=True, sinks="f32"),  # rows that see no key: lse = sink
    case("sinks-q-dtype-window", 203, 203, 96, L_MQA, window_size=(10, 10), sinks="q"),
    # ALiBi
    case("alibi-causal", 203, 203, 64, L_MHA, causal=True, alibi="h"),
    case("alibi-batch-causal", 113, 203, 32, L_GQA, causal=True, alibi="bh"),
    case("alibi-sq>sk", 203, 113, 80, L_MQA, alibi="h"),
    # attention bias
    case("bias-causal", 113, 203, 32, L_MHA, causal=True, bias=("full", "float", "f32", True)),
    case("bias-gqa", 203, 113, 64, L_GQA, bias=("full", "float", "f32", True)),
    case("bias-q-dtype", 113, 113, 32, L_MQA, bias=("full", "float", "q", True)),
    case("bias-key-padding-bool", 113, 203, 32, L_GQA, bias=("kpm", "bool", None, False)),
    case("bias-key-padding-float", 203, 203, 64, L_MQA, bias=("kpm", "float", "f32", True)),
    case("bias-over-batch", 113, 203, 32, L_GQA, bias=("batch", "float", "f32", True)),
    case("bias-over-heads", 113, 203, 32, L_GQA, bias=("heads", "float", "q", True)),
    case("bias-over-rows", 203, 113, 32, L_MQA, bias=("rows", "float", "f32", True)),
    case("bias-shared-2d", 203, 203, 32, L_GQA, bias=("2d", "float", "f32", True)),
    case("bias-shared-1023", 1023, 1023, 32, L_MHA, bias=("shared", "float", "f32", True)),
    case("bias-neginf-causal", 113, 203, 32, L_MHA, causal=True, bias=("full", "neginf", "f32", True)),
    case("bias-bool-window", 600, 203, 64, L_T, window_size=(64, 64), bias=("full", "bool", None, False)),
    # windows: 0, 1, larger than the sequences, one-sided, sq > sk (rows that see no key)
    case("window-0-sq>sk", 203, 113, 32, L_MHA, window_size=(0, 0)),
    case("window-0", 17, 17, 32, L_GQA, window_size=(0, 0)),
    case("window-1", 113, 203, 64, L_MQA, window_size=(1, 1)),
    case("window-huge", 113, 203, 32, L_MHA, window_size=(5000, 5000)),
    case("window-left-only", 203, 113, 32, L_GQA, window_size=(20, -1)),
    case("window-right-only", 203, 113, 32, L_MHA, window_size=(-1, 20)),
    case("window-right-0", 113, 203, 32, L_T, window_size=(-1, 0)),  # the same mask as causal
    case("window-left-1023x203", 1023, 203, 32, L_MHA, window_size=(300, 0)),
    # odd lengths
    case("len-1x1", 1, 1, 32, L_MHA, window_size=(0, 0), softcap=5.0, sinks="f32"),
    case("len-1x17", 1, 17, 64, L_GQA, window_size=(3, 3), alibi="h"),
    case("len-17x1", 17, 1, 32, L_MQA, causal=True, bias=("full", "float", "f32", True)),
    case("len-1023x17", 1023, 17, 32, L_T, causal=True, attention_chunk=7),
    # everything at once
    case("all", 300, 203, 64, L_GQA, window_size=(50, 10), attention_chunk=70, softcap=2.0, alibi="h",
         bias=("shared", "float", "f32", True), sinks="f32"),
    case("all-1023", 1023, 1023, 64, L_T, window_size=(300, 10), softcap=2.0, alibi="bh",
         bias=("rows", "float", "f32", True), sinks="f32"),
    case("all-d256", 113, 203, 256, L_MHA, causal=True, window_size=(40, -1), softcap=4.0,
         bias=("kpm", "bool", None, False), sinks="q"),
]


def bias_shape(name, b, h, sq, sk):
    return {"full": (b, h, sq, sk), "kpm": (b, 1, 1, sk), "batch": (1, h, sq, sk), "heads": (b, 1, sq, sk),
            "rows": (b, h, 1, sk), "shared": (1, 1, sq, sk), "2d": (sq, sk)}[name]


def make_features(device, dtype, c):
    """The case's alibi_slopes, attn_bias, sinks tensors (leaves; bias and sinks require grad where tested)."""
    b, h, _, _ = c["layout"]
    sq, sk = c["sq"], c["sk"]
    alibi = None
    if c.get("alibi") == "h":
        alibi = torch.rand(h, device=device) * 0.2 + 0.01
    elif c.get("alibi") == "bh":
        alibi = torch.rand(b, h, device=device) * 0.2 + 0.01
    bias, bias_grad = None, False
    if c.get("bias") is not None:
        shape_name, kind, bdtype, bias_grad = c["bias"]
        shape = bias_shape(shape_name, b, h, sq, sk)
        if kind == "bool":
            bias = torch.rand(shape, device=device) < 0.75
            if len(shape) == 4 and shape[2] > 2:
                bias[:, :, 1] = False  # a row that sees no key
        else:
            bias = torch.randn(shape, device=device)
            if kind == "neginf":
                bias = bias.masked_fill(torch.rand(shape, device=device) < 0.25, -INF)
                bias[:, :, 2] = -INF  # a row that sees no key
            bias = bias.to(torch.float32 if bdtype == "f32" else dtype).requires_grad_(bias_grad)
    sinks = None
    if c.get("sinks") is not None:
        sinks = torch.randn(h, device=device).to(torch.float32 if c["sinks"] == "f32" else dtype).requires_grad_()
    return alibi, bias, bias_grad, sinks


def mask_kwargs(c):
    return dict(causal=c.get("causal", False), window_size=c.get("window_size", (-1, -1)),
                softcap=c.get("softcap", 0.0), attention_chunk=c.get("attention_chunk", 0))


def check_variant(device, dtype, c):
    batch, nheads, nheads_k, bhsd = c["layout"]
    sq, sk, d = c["sq"], c["sk"], c["d"]
    q, k, v = make_inputs(device, dtype, batch, nheads, nheads_k, sq, sk, d, bhsd, c.get("scale_inputs", 1.0))
    alibi, bias, bias_grad, sinks = make_features(device, dtype, c)
    kw = mask_kwargs(c)
    feats = dict(alibi_slopes=alibi, attn_bias=bias, sinks=sinks)
    dout = torch.randn(batch, nheads, sq, d, device=device, dtype=dtype).transpose(1, 2)

    poison_cuda_allocator(((batch, sq, nheads, d), dtype), ((batch, nheads, sq), torch.float32))
    out, lse = flash_ext.attention(q, k, v, return_lse=True, **feats, **kw)
    poison_cuda_allocator(((batch, sq, nheads, d), dtype), (tuple(k.shape), dtype), (tuple(v.shape), dtype))
    det = c.get("deterministic", False)
    out2 = flash_ext.attention(q, k, v, deterministic=det, **feats, **kw)
    names = ["dq", "dk", "dv"] + (["dbias"] if bias_grad else []) + (["dsinks"] if sinks is not None else [])
    leaves = [q, k, v] + ([bias] if bias_grad else []) + ([sinks] if sinks is not None else [])
    ours = dict(zip(names, torch.autograd.grad(out2, leaves, dout, retain_graph=det)))
    if det:  # deterministic: a second backward is bitwise the first
        again = torch.autograd.grad(out2, leaves, dout)
        for name, g in zip(names, again):
            assert torch.equal(g, ours[name]), f"{name} differs between two deterministic backward calls"

    out_ref, lse_ref, g_ref = attention_ref_grads(dout, q, k, v, True, bias, sinks, bias_grad, alibi_slopes=alibi,
                                                  **kw)
    out_pt, lse_pt, g_pt = attention_ref_grads(dout, q, k, v, False, bias, sinks, bias_grad, alibi_slopes=alibi,
                                               **kw)
    assert torch.equal(out, out2), "out differs between two identical calls"
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)
    assert sorted(g_ref) == sorted(names)
    for name in names:
        assert ours[name].dtype == leaves[names.index(name)].dtype, f"{name}: dtype {ours[name].dtype}"
        assert_fa_close(name, ours[name], g_ref[name], g_pt[name], dtype)


# CUDA only: the local mask in every instantiated kernel family and head dim, at lengths where it skips whole key
# blocks on both sides, leaves key blocks that no query sees (dK / dV = 0) and query blocks that see nothing, with
# the deterministic backward too. dtypes alternate.
LOCAL_PATTERNS = [
    dict(name="window-causal", sq=1100, sk=1100, causal=True, window_size=(256, -1)),
    dict(name="window-both", sq=1000, sk=1300, window_size=(300, 200)),
    dict(name="window-narrow-sq>sk", sq=1300, sk=600, window_size=(10, 0)),  # 700 rows see no key
    dict(name="window-sq<sk", sq=300, sk=1500, window_size=(100, 0)),  # 1100 keys no query sees
    dict(name="chunk-causal", sq=1100, sk=1100, causal=True, attention_chunk=256),
    dict(name="chunk-window", sq=777, sk=1500, attention_chunk=500, window_size=(-1, 64)),
]
# The score modifiers and sinks on CUDA, every kernel head dim: softcap and ALiBi alone, with causal, with a window,
# both at once, sinks alone and with a window (rows that see no key) or softcap + causal; odd lengths both ways, per-head and per-(batch, head) slopes, GQA (the key-side backward kernels visit
# the query heads of a KV head in turn, each with its own slope).
MOD_PATTERNS = [
    dict(name="softcap", sq=1000, sk=1000, softcap=20.0, scale_inputs=2.0),
    dict(name="softcap-causal", sq=700, sk=1100, causal=True, softcap=5.0, scale_inputs=2.0),
    dict(name="alibi-causal", sq=1100, sk=1100, causal=True, alibi="h"),
    dict(name="alibi-bh-sq>sk", sq=1300, sk=600, alibi="bh"),
    dict(name="softcap-alibi-window", sq=900, sk=1300, window_size=(200, 100), softcap=8.0, alibi="h",
         scale_inputs=2.0),
    dict(name="sinks", sq=1000, sk=1100, sinks="f32"),
    dict(name="sinks-window-sq>sk", sq=1300, sk=600, window_size=(10, 0), sinks="q"),  # rows with no key: lse = sink
    dict(name="sinks-softcap-causal", sq=1000, sk=1000, causal=True, softcap=10.0, sinks="f32", scale_inputs=2.0),
    dict(name="bias-kpm-bool", sq=700, sk=1100, bias=("kpm", "bool", None, False)),
    dict(name="bias-full-f32-grad", sq=600, sk=500, bias=("full", "float", "f32", True)),
    dict(name="bias-heads-q-causal", sq=900, sk=900, causal=True, bias=("heads", "float", "q", True)),
    dict(name="bias-neginf-softcap-window", sq=500, sk=700, window_size=(100, 100), softcap=6.0,
         bias=("shared", "neginf", "f32", True), scale_inputs=2.0),
]
LOCAL_CUDA_CASES = []
for _i, (_d, _p) in enumerate((d, p) for d in (64, 96, 128, 192, 256) for p in LOCAL_PATTERNS + MOD_PATTERNS):
    _kw = {k: v for k, v in _p.items() if k not in ("name", "sq", "sk")}
    LOCAL_CUDA_CASES.append((torch.bfloat16 if _i % 2 else torch.float16,
                             case(f"local-{_p['name']}-d{_d}", _p["sq"], _p["sk"], _d, (L_GQA, L_MHA)[_i % 2],
                                  deterministic=_i % 3 == 0, **_kw)))


def _params():
    params = []
    for c in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            params.append(pytest.param("cpu", dtype, c, id=f"cpu-{str(dtype)[6:]}-{c['name']}"))
    for c in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            params.append(pytest.param("cuda", dtype, c, marks=[requires_cuda], id=f"cuda-{str(dtype)[6:]}-{c['name']}"))
    for dtype, c in LOCAL_CUDA_CASES:
        det = "-det" if c["deterministic"] else ""
        params.append(pytest.param("cuda", dtype, c, marks=[requires_cuda], id=f"cuda-{str(dtype)[6:]}-{c['name']}{det}"))
    return params


@pytest.mark.parametrize("device,dtype,c", _params())
def test_variant(device, dtype, c):
    check_variant(device, dtype, c)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=[requires_cuda], id="cuda")]


def low_precision(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


# ---- special cases checked exactly ----

@pytest.mark.parametrize("device", DEVICES)
def test_neginf_bias_is_the_bool_mask(device):
    """A float bias of 0 and -inf gives bitwise the results of the bool mask that is False where it is -inf."""
    dtype = low_precision(device)
    q, k, v = make_inputs(device, dtype, 2, 4, 2, 113, 203, 32, False)
    mask = torch.rand(2, 1, 113, 203, device=device) < 0.6
    mask[:, :, 5] = False  # a row that sees no key
    fbias = torch.zeros(mask.shape, device=device).masked_fill(~mask, -INF)
    dout = torch.randn_like(q)
    results = []
    for bias in (mask, fbias):
        out, lse = flash_ext.attention(q, k, v, attn_bias=bias, causal=True, return_lse=True)
        # deterministic: CUDA's default dQ accumulation order varies run to run (the CPU path's never does)
        grads = torch.autograd.grad(flash_ext.attention(q, k, v, attn_bias=bias, causal=True, deterministic=True),
                                    (q, k, v), dout)
        results.append((out, lse) + grads)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between the -inf bias and the bool mask"
    assert bool((results[0][1][:, :, 5] == -INF).all())


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key(device):
    """Rows hidden by the window (window 0, seqlen_q > seqlen_k) or by an all-False mask row: out 0, lse -inf
    (the sink with sinks), zero gradients, no NaN; keys that no row sees get zero dk, dv."""
    dtype = low_precision(device)
    sq, sk = 50, 20
    q, k, v = make_inputs(device, dtype, 2, 4, 2, sq, sk, 32, False)
    dead = torch.zeros(sq, dtype=torch.bool, device=device)
    dead[: sq - sk] = True  # window (0, 0): i' = i - 30 < 0 sees no key
    mask = torch.ones(2, 1, sq, sk, dtype=torch.bool, device=device)
    mask[:, :, 40] = False
    mask[:, :, :, 7] = False  # key 7 is seen by no row
    sinks = torch.randn(4, device=device, requires_grad=True)
    for kw, dead_rows in ((dict(window_size=(0, 0)), dead), (dict(attn_bias=mask), torch.arange(sq) == 40)):
        for with_sinks in (False, True):
            extra = dict(sinks=sinks) if with_sinks else {}
            out, lse = flash_ext.attention(q, k, v, return_lse=True, **kw, **extra)
            dead_rows = dead_rows.to(device)
            assert torch.equal(out[:, dead_rows], torch.zeros_like(out[:, dead_rows]))
            want_lse = sinks.detach().view(1, 4, 1).expand(2, 4, int(dead_rows.sum())) if with_sinks else -INF
            assert bool((lse[:, :, dead_rows] == want_lse).all())
            assert bool(torch.isfinite(lse[:, :, ~dead_rows]).all())
            out = flash_ext.attention(q, k, v, **kw, **extra)
            grads = torch.autograd.grad(out, (q, k, v) + ((sinks,) if with_sinks else ()), torch.randn_like(out))
            assert torch.equal(grads[0][:, dead_rows], torch.zeros_like(grads[0][:, dead_rows]))
            if "attn_bias" in kw:
                assert torch.equal(grads[1][:, 7], torch.zeros_like(grads[1][:, 7]))
                assert torch.equal(grads[2][:, 7], torch.zeros_like(grads[2][:, 7]))
            for g in (out,) + grads:
                assert not torch.isnan(g).any()


@pytest.mark.parametrize("device", DEVICES)
def test_bias_gradient_reaches_the_callers_shape(device):
    """A bias expanded with stride 0 (read in place) and a 2-D bias (viewed as 4-D) get their gradients in the
    shapes the caller made them in, equal to the reference's."""
    dtype = low_precision(device)
    b, h, sq, sk = 2, 4, 113, 203
    q, k, v = make_inputs(device, dtype, b, h, 2, sq, sk, 32, False)
    dout = torch.randn_like(q)
    base = torch.randn(b, 1, 1, sk, device=device, requires_grad=True)
    two_d = torch.randn(sq, sk, device=device, requires_grad=True)
    for leaf, make in ((base, lambda t: t.expand(b, h, sq, sk)), (two_d, lambda t: t)):
        out = flash_ext.attention(q, k, v, attn_bias=make(leaf), causal=True)
        (dbias,) = torch.autograd.grad(out, (leaf,), dout)
        assert dbias.shape == leaf.shape
        grads = []  # the reference's (float64) and PyTorch's in the inputs' dtype, by autograd through `make`
        for upcast in (True, False):
            cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
            lf = cast(leaf).requires_grad_()
            o = attention_ref(cast(q), cast(k), cast(v), True, upcast=upcast, attn_bias=make(lf))[0]
            grads.append(torch.autograd.grad(o, (lf,), dout.double() if upcast else dout)[0])
        assert_fa_close("dbias", dbias, grads[0], grads[1], dtype)


def test_dbias_and_dsinks_are_deterministic():
    """A bias broadcast over batch and heads (its elements shared by many pass-1 tasks): bitwise the same dbias
    and dsinks run to run."""
    q, k, v = make_inputs("cpu", torch.float32, 2, 4, 2, 300, 600, 32, False)
    bias = torch.randn(1, 1, 300, 600, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out = flash_ext.attention(q, k, v, attn_bias=bias, sinks=sinks, window_size=(200, 20))
        runs.append(torch.autograd.grad(out, (q, k, v, bias, sinks), dout))
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            assert torch.equal(a, b)


def test_gradcheck_float64_features():
    """torch.autograd.gradcheck of the op itself (float64 is computed in float64 on the CPU) with every feature."""
    q, k, v = (torch.randn(1, s, n, 8, dtype=torch.float64, requires_grad=True) for s, n in ((7, 4), (9, 2), (9, 2)))
    bias = torch.randn(1, 4, 1, 9, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(4, dtype=torch.float64)

    def f(q, k, v, bias, sinks):
        return flash_ext.attention(q, k, v, window_size=(3, 1), attention_chunk=4, softcap=1.5, alibi_slopes=slopes,
                                   attn_bias=bias, sinks=sinks)
    assert torch.autograd.gradcheck(f, (q, k, v, bias, sinks))

    def g(q, k, v, bias):
        return flash_ext.attention(q, k, v, causal=True, attn_bias=bias)
    assert torch.autograd.gradcheck(g, (q, k, v, torch.randn(1, 1, 7, 9, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_features(amp_dtype):
    """Under CPU autocast q, k, v are cast; a float32 bias, float32 sinks and slopes are passed as they are and
    get float32 gradients; the result is that of casting q, k, v by hand."""
    q, k, v = (t.detach().requires_grad_() for t in make_inputs("cpu", torch.float32, 2, 4, 2, 41, 57, 32, False))
    bias = torch.randn(2, 1, 41, 57, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    kw = dict(window_size=(10, 3), softcap=5.0, alibi_slopes=torch.rand(4) * 0.1)
    with torch.autocast(device_type="cpu", dtype=amp_dtype):
        out = flash_ext.attention(q, k, v, attn_bias=bias, sinks=sinks, **kw)
    assert out.dtype == amp_dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias, sinks), dout)
    assert all(g.dtype == torch.float32 for g in grads)
    qc, kc, vc = (t.detach().to(amp_dtype).requires_grad_() for t in (q, k, v))
    want = flash_ext.attention(qc, kc, vc, attn_bias=bias, sinks=sinks, **kw)
    want_grads = torch.autograd.grad(want, (qc, kc, vc, bias, sinks), dout)
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w.float())


# ---- sdpa: attn_mask and top-left causal, against torch's SDPA (math backend) ----

SDPA_CASES = [
    # (name, L, S, hk, mask: (shape, kind, requires_grad) or None, is_causal)
    ("bool-key-padding", 113, 203, 4, ((2, 1, 1, 203), "bool", False), False),
    ("bool-2d", 203, 113, 4, ((203, 113), "bool", False), False),
    ("float-full-grad", 113, 203, 4, ((2, 4, 113, 203), "float", True), False),
    ("float-2d-grad", 203, 203, 4, ((203, 203), "float", True), False),
    ("float-gqa-grad", 113, 203, 2, ((1, 4, 113, 203), "float", True), False),
    ("causal-L<S", 113, 203, 4, None, True),
    ("causal-L>S", 203, 113, 4, None, True),
    ("causal-L=S", 128, 128, 2, None, True),
]


def _sdpa_params():
    params = []
    for name, L, S, hk, mask, causal in SDPA_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            params.append(pytest.param("cpu", dtype, L, S, hk, mask, causal, id=f"cpu-{str(dtype)[6:]}-{name}"))
        for dtype in (torch.float16, torch.bfloat16):
            params.append(pytest.param("cuda", dtype, L, S, hk, mask, causal, marks=[requires_cuda],
                                       id=f"cuda-{str(dtype)[6:]}-{name}"))
    return params


@pytest.mark.parametrize("device,dtype,L,S,hk,mask_spec,is_causal", _sdpa_params())
def test_sdpa_matches_torch_sdpa_math(device, dtype, L, S, hk, mask_spec, is_causal):
    b, h, d = 2, 4, 64
    q = torch.randn(b, h, L, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, S, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, S, d, device=device, dtype=dtype, requires_grad=True)
    mask, mask_grad = None, False
    if mask_spec is not None:
        shape, kind, mask_grad = mask_spec
        if kind == "bool":
            mask = torch.rand(shape, device=device) < 0.7
            mask[..., 0] = True  # every row sees a key (SDPA's math backend gives NaN gradients otherwise)
        else:
            mask = torch.randn(shape, device=device, dtype=dtype).requires_grad_(mask_grad)
    dout = torch.randn(b, h, L, d, device=device, dtype=dtype)
    leaves = [q, k, v] + ([mask] if mask_grad else [])
    gqa = hk != h

    out = flash_ext.sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    ours = torch.autograd.grad(out, leaves, dout)

    def torch_sdpa(upcast):
        cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
        ls = [cast(t).requires_grad_() for t in (q, k, v)]
        m = mask
        if mask is not None and mask.is_floating_point():
            m = cast(mask).requires_grad_(mask_grad)
            if mask_grad:
                ls.append(m)
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(*ls[:3], attn_mask=m, is_causal=is_causal, enable_gqa=gqa)
        return o.detach(), torch.autograd.grad(o, ls, dout.double() if upcast else dout)

    out_ref, g_ref = torch_sdpa(True)
    out_pt, g_pt = torch_sdpa(False)
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    for name, a, r, p in zip(("dq", "dk", "dv", "dmask"), ours, g_ref, g_pt):
        assert_fa_close(name, a, r, p, dtype)


def test_sdpa_mask_with_is_causal_raises_as_torch_does():
    """torch documents that attn_mask with is_causal raises, and its math backend does; so does sdpa."""
    q = torch.randn(1, 2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="attn_mask"), sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask must not be set when is_causal=True"):
        flash_ext.sdpa(q, q, q, attn_mask=mask, is_causal=True)


# ---- bad input: a clear error naming the argument ----

def _bad_cases():
    q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 10, 2, 16)
    meta = dict(device="meta")
    R, V = RuntimeError, ValueError
    return [
        (R, "window_left .* must be >= -1", dict(window_size=(-2, 0))),
        (R, "window_right .* must be >= -1", dict(window_size=(0, -5))),
        (V, "window_size must be a pair of ints", dict(window_size=(1.5, 0))),
        (V, "window_size must be a pair of ints", dict(window_size=4)),
        (V, "window_size must be a pair of ints", dict(window_size=(1, 2, 3))),
        (V, "window_size must be a pair of ints", dict(window_size=(True, 0))),
        (R, "attention_chunk must be >= 0", dict(attention_chunk=-1)),
        (R, "softcap must be a finite number >= 0", dict(softcap=-1.0)),
        (R, "softcap must be a finite number >= 0", dict(softcap=float("nan"))),
        (R, "softcap must be a finite number >= 0", dict(softcap=INF)),
        (R, "alibi_slopes must have shape \\(nheads,\\)", dict(alibi_slopes=torch.rand(3))),
        (R, "alibi_slopes must have shape \\(nheads,\\)", dict(alibi_slopes=torch.rand(3, 4))),
        (R, "alibi_slopes must have shape \\(nheads,\\)", dict(alibi_slopes=torch.rand(2, 4, 1))),
        (R, "alibi_slopes must be float32 or q's dtype", dict(alibi_slopes=torch.rand(4).double())),
        (R, "alibi_slopes must be float32 or q's dtype", dict(alibi_slopes=torch.ones(4, dtype=torch.int32))),
        (R, "alibi_slopes must be on the device of q", dict(alibi_slopes=torch.rand(4, **meta))),
        (R, "sinks must have shape \\(nheads,\\)", dict(sinks=torch.rand(3))),
        (R, "sinks must have shape \\(nheads,\\)", dict(sinks=torch.rand(2, 4))),
        (R, "sinks must be float32 or q's dtype", dict(sinks=torch.rand(4).half())),
        (R, "sinks must be on the device of q", dict(sinks=torch.rand(4, **meta))),
        (R, "attn_bias must be a 4-D tensor broadcastable", dict(attn_bias=torch.rand(2, 4, 8, 11))),
        (R, "attn_bias must be a 4-D tensor broadcastable", dict(attn_bias=torch.rand(3, 1, 1, 10))),
        (R, "attn_bias must be a 4-D tensor broadcastable", dict(attn_bias=torch.rand(2, 2, 8, 10))),
        (R, "attn_bias must be a 4-D tensor", dict(attn_bias=torch.rand(1, 2, 4, 8, 10))),
        (R, "attn_bias must be bool \\(a mask\\), float32 or q's dtype", dict(attn_bias=torch.rand(8, 10).double())),
        (R, "attn_bias must be bool \\(a mask\\), float32 or q's dtype", dict(attn_bias=torch.rand(8, 10).half())),
        (R, "attn_bias must be bool \\(a mask\\), float32 or q's dtype",
         dict(attn_bias=torch.ones(8, 10, dtype=torch.int64))),
        (R, "attn_bias must be on the device of q", dict(attn_bias=torch.rand(8, 10, **meta))),
    ], q, k


@pytest.mark.parametrize("i", range(len(_bad_cases()[0])))
def test_bad_feature_arguments(i):
    cases, q, k = _bad_cases()
    exc, message, kwargs = cases[i]
    with pytest.raises(exc, match=message):
        flash_ext.attention(q, k, k, **kwargs)


def test_bad_backward_feature_arguments():
    q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 10, 2, 16)
    mask = torch.rand(2, 1, 8, 10) < 0.5
    out, lse = torch.ops.flash_ext.attention_forward(q, k, k, None, False, False, -1, -1, 0.0, None, mask)
    bwd = torch.ops.flash_ext.attention_backward
    with pytest.raises(RuntimeError, match="attn_bias is a bool mask, and a gradient of a bool mask does not exist"):
        bwd(out, q, k, k, out, lse, 0.25, False, False, -1, -1, 0.0, None, mask, 0, None, True)
    with pytest.raises(RuntimeError, match="bias_requires_grad needs an attn_bias"):
        bwd(out, q, k, k, out, lse, 0.25, False, False, -1, -1, 0.0, None, None, 0, None, True)
    with pytest.raises(RuntimeError, match="window_left"):
        bwd(out, q, k, k, out, lse, 0.25, False, False, -3, -1, 0.0, None, mask, 0, None, False)
    with pytest.raises(RuntimeError, match="sinks must have shape"):
        bwd(out, q, k, k, out, lse, 0.25, False, False, -1, -1, 0.0, None, mask, 0, torch.rand(2), False)


# ---- op registration with the new arguments ----

def _feature_args(q, with_grad=True):
    h = q.shape[2]
    bias = torch.randn(q.shape[0], 1, q.shape[1], 47, requires_grad=with_grad)
    sinks = torch.randn(h, requires_grad=with_grad)
    slopes = torch.rand(h) * 0.1
    return bias, sinks, slopes


def _qkv(dtype=torch.float32, requires_grad=True):
    mk = lambda s, n: torch.randn(2, s, n, 32, dtype=dtype, requires_grad=requires_grad)
    return mk(33, 4), mk(47, 2), mk(47, 2)


@pytest.mark.parametrize("variant", ["all", "chunk-causal", "bool-mask"])
def test_opcheck_forward_and_attention_with_features(variant):
    q, k, v = _qkv()
    bias, sinks, slopes = _feature_args(q)
    if variant == "all":
        args = (q, k, v, None, False, False, 8, 4, 5.0, slopes, bias, 0, sinks)
    elif variant == "chunk-causal":
        args = (q, k, v, 0.3, True, True, 12, -1, 0.0, None, None, 16, sinks)
    else:
        args = (q, k, v, None, False, False, -1, -1, 0.0, slopes, torch.rand(2, 1, 1, 47) < 0.7, 0, None)
    torch.library.opcheck(torch.ops.flash_ext.attention_forward.default, args)
    torch.library.opcheck(torch.ops.flash_ext.attention.default, args)


def test_opcheck_backward_with_features():
    q, k, v = _qkv(requires_grad=False)
    bias, sinks, slopes = _feature_args(q, with_grad=False)
    feats = (8, 4, 5.0, slopes, bias, 10, sinks)
    out, lse = torch.ops.flash_ext.attention_forward(q, k, v, None, False, False, *feats)
    dout = torch.randn_like(out)
    for bias_grad in (True, False):
        torch.library.opcheck(torch.ops.flash_ext.attention_backward.default,
                              (dout, q, k, v, out, lse, 32 ** -0.5, False, False, *feats, bias_grad))


class GemmaLikeBlock(torch.nn.Module):
    """Sliding window + softcap + a learned bias over keys + learned sinks + ALiBi."""

    def __init__(self, dim=64, nheads=4, seqlen=37):
        super().__init__()
        self.nheads = nheads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.bias = torch.nn.Parameter(torch.randn(1, nheads, 1, seqlen) * 0.1)
        self.sinks = torch.nn.Parameter(torch.randn(nheads))
        self.register_buffer("slopes", torch.rand(nheads) * 0.1)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.nheads, dim // self.nheads).unbind(2)
        o = flash_ext.attention(q, k, v, causal=True, window_size=(8, 0), softcap=5.0, attn_bias=self.bias,
                                sinks=self.sinks, alibi_slopes=self.slopes, attention_chunk=16)
        return self.proj(o.reshape(b, s, dim))


def test_compile_fullgraph_with_features():
    torch._dynamo.reset()
    model = GemmaLikeBlock()
    x = torch.randn(2, 37, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x] + list(model.parameters()))
    y = compiled(x)
    g = torch.autograd.grad(y.square().sum(), [x] + list(model.parameters()))
    torch.testing.assert_close(y, y_eager, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
