"""Attention dropout (issue 19): the Philox generator and the element-to-counter mapping (csrc/kernels/dropout.h)
against an independent Python implementation and the generator's published test vectors; the keep rate; forward and
backward against the float64 reference with the exact mask (flash_ext.dropout_mask) alone and with causal, window,
GQA, bias, softcap and sinks, odd lengths; reproducibility from torch's generator; bad input; gradcheck, opcheck,
compile; sdpa(dropout_p=...). The CUDA kernels do not have dropout yet: CUDA raises NotImplementedError (tested).
"""
import pytest
import torch

import flash_ext
from conftest import requires_cuda
from reference import assert_fa_close, attention_ref_grads
from test_attention import make_inputs

M32 = 0xFFFFFFFF


def philox_py(c, k):
    """Philox4x32-10 in Python integers: counter c (4 words), key k (2 words)."""
    c, k = list(c), list(k)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k[1]) & M32, p0 & M32]
        k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
    return c


def mask_py(batch, nheads, sq, sk, p, seed, offset):
    """The keep mask of docs/ARCHITECTURE.md ("Dropout"), element by element."""
    rows, cols = 8 * -(-sq // 16), -(-sk // 2)
    thr = int(p * 2 ** 32)
    out = torch.zeros(batch, nheads, sq, sk, dtype=torch.bool)
    for b in range(batch):
        for h in range(nheads):
            for i in range(sq):
                for j in range(0, sk, 2):
                    n = ((b * nheads + h) * rows + 8 * (i // 16) + i % 8) * cols + j // 2
                    w = philox_py([n & M32, n >> 32, offset & M32, offset >> 32], [seed & M32, seed >> 32])
                    u = (i // 8) % 2
                    out[b, h, i, j] = w[2 * u] >= thr
                    if j + 1 < sk:
                        out[b, h, i, j + 1] = w[2 * u + 1] >= thr
    return out


def test_philox_known_answers():
    """The generator's published known-answer vectors (Random123's philox4x32_10)."""
    assert philox_py([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox_py([M32] * 4, [M32, M32]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox_py([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("shape,p,seed,offset", [
    ((1, 1, 17, 9), 0.5, 0, 0),
    ((2, 3, 33, 20), 0.1, 12345, 678),
    ((1, 2, 40, 31), 0.9, 2 ** 40 + 3, 2 ** 35 + 1),  # seed and offset above 32 bits
])
def test_dropout_mask_matches_the_mapping(shape, p, seed, offset):
    got = flash_ext.dropout_mask(*shape, p, seed, offset)
    assert got.dtype == torch.bool and got.shape == shape
    assert torch.equal(got, mask_py(*shape, p, seed, offset))


def test_keep_rate():
    for p in (0.1, 0.5, 0.8):
        m = flash_ext.dropout_mask(2, 4, 256, 512, p, 7, 11)
        assert abs(m.float().mean().item() - (1 - p)) < 5e-3


def dropout_case(name, sq, sk, d, b, h, hk, p, **kw):
    return dict(name=name, sq=sq, sk=sk, d=d, b=b, h=h, hk=hk, p=p, kw=kw)


CASES = [
    dropout_case("plain", 113, 203, 32, 2, 4, 2, 0.1),
    dropout_case("p0.5-causal", 203, 203, 64, 1, 2, 2, 0.5, causal=True),
    dropout_case("p0.9", 77, 130, 32, 1, 2, 1, 0.9),
    dropout_case("window-gqa", 300, 300, 32, 2, 6, 2, 0.2, window_size=(50, 10)),
    dropout_case("softcap-sinks", 130, 77, 64, 1, 4, 4, 0.3, softcap=5.0, sinks=True),
    dropout_case("bias", 130, 200, 32, 2, 2, 1, 0.25, bias=True),
    dropout_case("len-1x1", 1, 1, 32, 1, 2, 2, 0.5),
    dropout_case("len-1023", 1023, 1023, 32, 1, 1, 1, 0.15, causal=True),
]


def check_dropout_case(dtype, c):
    b, h, hk, sq, sk, d, p = c["b"], c["h"], c["hk"], c["sq"], c["sk"], c["d"], c["p"]
    q, k, v = make_inputs("cpu", dtype, b, h, hk, sq, sk, d, False)
    kw = dict(c["kw"])
    bias = sinks = None
    if kw.pop("bias", False):
        bias = torch.randn(b, 1, 1, sk, requires_grad=True)
    if kw.pop("sinks", False):
        sinks = torch.randn(h, requires_grad=True)
    seed, offset = 987654321 + sq, 42
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    window = kw.get("window_size", (-1, -1))
    args = (q, k, v, None, kw.get("causal", False), False, window[0], window[1], kw.get("softcap", 0.0), None, bias,
            0, sinks, None, None, 0, p, rng)
    out, lse = torch.ops.flash_ext.attention_forward(*args)
    dout = torch.randn_like(out)
    leaves = [q, k, v] + ([bias] if bias is not None else []) + ([sinks] if sinks is not None else [])
    names = ["dq", "dk", "dv"] + (["dbias"] if bias is not None else []) + (["dsinks"] if sinks is not None else [])
    grads = torch.autograd.grad(out, leaves, dout)
    mask = flash_ext.dropout_mask(b, h, sq, sk, p, seed, offset)
    ref_kw = dict(kw, dropout_mask=mask, dropout_p=p)
    out_ref, lse_ref, g_ref = attention_ref_grads(dout, q, k, v, True, bias, sinks, bias is not None, **ref_kw)
    out_pt, lse_pt, g_pt = attention_ref_grads(dout, q, k, v, False, bias, sinks, bias is not None, **ref_kw)
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)
    for name, g in zip(names, grads):
        assert_fa_close(name, g, g_ref[name], g_pt[name], dtype)
    # The backward regenerates the same mask: a second call and backward are bitwise the first.
    out2, _ = torch.ops.flash_ext.attention_forward(*args)
    assert torch.equal(out, out2)
    for g1, g2 in zip(grads, torch.autograd.grad(out2, leaves, dout)):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c", CASES, ids=[c["name"] for c in CASES])
def test_dropout_against_the_reference(dtype, c):
    check_dropout_case(dtype, c)


def test_reproducible_from_torch_generator():
    q, k, v = make_inputs("cpu", torch.float32, 2, 2, 2, 50, 60, 16, False)
    torch.manual_seed(3)
    a = flash_ext.attention(q, k, v, dropout_p=0.3)
    b = flash_ext.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(flash_ext.attention(q, k, v, dropout_p=0.3), a)
    assert not torch.equal(a, b), "consecutive calls must draw different masks"
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x = flash_ext.attention(q, k, v, dropout_p=0.3, generator=g1)
    assert torch.equal(flash_ext.attention(q, k, v, dropout_p=0.3, generator=g2), x)
    # What the wrapper draws: the (seed, offset) pair from the generator, then the op with it.
    g3 = torch.Generator().manual_seed(9)
    rng = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, generator=g3)
    y = torch.ops.flash_ext.attention(q, k, v, None, False, False, -1, -1, 0.0, None, None, 0, None, None, None, 0,
                                      0.3, rng)
    assert torch.equal(y, x)


def test_zero_dropout_is_the_plain_path():
    q, k, v = make_inputs("cpu", torch.float32, 1, 2, 2, 70, 90, 16, False)
    assert torch.equal(flash_ext.attention(q, k, v, dropout_p=0.0, causal=True), flash_ext.attention(q, k, v, causal=True))


def test_sdpa_dropout():
    q = torch.randn(1, 2, 30, 16)
    torch.manual_seed(0)
    a = flash_ext.sdpa(q, q, q, dropout_p=0.2)
    torch.manual_seed(0)
    b = flash_ext.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), dropout_p=0.2).transpose(1, 2)
    assert torch.equal(a, b)


def test_bad_dropout_arguments():
    q = torch.randn(1, 8, 2, 16)
    for p, exc, msg in ((-0.1, RuntimeError, r"dropout_p must be in \[0, 1\)"), (1.0, RuntimeError, r"\[0, 1\)"),
                        (float("nan"), RuntimeError, r"\[0, 1\)"), ("0.1", TypeError, "dropout_p must be a float")):
        with pytest.raises(exc, match=msg):
            flash_ext.attention(q, q, q, dropout_p=p)
    with pytest.raises(ValueError, match="generator is on cpu, q on meta"):
        flash_ext.attention(q.to("meta"), q.to("meta"), q.to("meta"), dropout_p=0.1, generator=torch.Generator())
    base = (q, q, q, None, False, False, -1, -1, 0.0, None, None, 0, None, None, None, 0)
    with pytest.raises(RuntimeError, match="dropout_rng must be given with dropout_p > 0"):
        torch.ops.flash_ext.attention_forward(*base, 0.1, None)
    with pytest.raises(RuntimeError, match="dropout_rng must be an int64 tensor of 2 elements"):
        torch.ops.flash_ext.attention_forward(*base, 0.1, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="dropout_rng must be an int64 tensor of 2 elements"):
        torch.ops.flash_ext.attention_forward(*base, 0.1, torch.tensor([1.0, 2.0]))


def test_gradcheck_opcheck_compile():
    q, k, v = (torch.randn(1, s, 2, 8, dtype=torch.float64, requires_grad=True) for s in (7, 9, 9))
    rng = torch.tensor([5, 6], dtype=torch.int64)
    f = lambda q, k, v: torch.ops.flash_ext.attention(q, k, v, None, True, False, -1, -1, 0.0, None, None, 0, None,
                                                       None, None, 0, 0.4, rng)
    assert torch.autograd.gradcheck(f, (q, k, v))
    args = (q.float(), k.float(), v.float(), None, False, False, -1, -1, 0.0, None, None, 0, None, None, None, 0,
            0.3, rng)
    torch.library.opcheck(torch.ops.flash_ext.attention_forward.default, args)
    out, lse = torch.ops.flash_ext.attention_forward(*(t.detach() if torch.is_tensor(t) else t for t in args))
    torch.library.opcheck(torch.ops.flash_ext.attention_backward.default,
                          (torch.randn_like(out), *(a.detach() for a in args[:3]), out, lse, 0.3, False, False, -1,
                           -1, 0.0, None, None, 0, None, False, None, None, 0, 0.3, rng))
    torch.library.opcheck(torch.ops.flash_ext.dropout_mask.default, (rng, 1, 2, 7, 9, 0.3))

    def step(q, k, v):  # torch's default generator: dynamo traces its draw (an explicit Generator it cannot)
        return flash_ext.attention(q, k, v, dropout_p=0.3)

    torch.manual_seed(1)
    want = step(q, k, v)
    torch.manual_seed(1)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(got, want)


@requires_cuda
def test_cuda_dropout_is_not_there_yet():
    """Until the CUDA kernels have dropout (docs/ARCHITECTURE.md, "Dropout"), CUDA says so instead of ignoring it."""
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="dropout_p > 0 is not implemented on CUDA yet"):
        flash_ext.attention(q, q, q, dropout_p=0.1)
    m = flash_ext.dropout_mask(1, 2, 20, 30, 0.2, 1, 2, device="cuda")
    assert m.is_cuda and torch.equal(m.cpu(), flash_ext.dropout_mask(1, 2, 20, 30, 0.2, 1, 2))
