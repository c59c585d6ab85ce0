"""Op registration (opcheck, torch.compile, gradcheck), the SDPA-layout API, empty inputs, special
values and bad-input errors."""
import pytest
import torch
import torch.nn.functional as F

import flash_ext
from conftest import device_params, requires_cuda
from reference import attention_ref

DEVICES = device_params()


def low_precision(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def qkv(device, dtype, b=2, sq=33, sk=47, h=4, hk=2, d=32, requires_grad=False):
    mk = lambda s, n: torch.randn(b, s, n, d, device=device, dtype=dtype, requires_grad=requires_grad)
    return mk(sq, h), mk(sk, hk), mk(sk, hk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_forward(device, causal):
    q, k, v = qkv(device, low_precision(device), requires_grad=True)
    torch.library.opcheck(torch.ops.flash_ext.attention_forward.default, (q, k, v, None, causal, False))
    torch.library.opcheck(torch.ops.flash_ext.attention_forward.default, (q, k, v, 0.3, causal, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention(device, causal):
    q, k, v = qkv(device, low_precision(device), requires_grad=True)
    torch.library.opcheck(torch.ops.flash_ext.attention.default, (q, k, v, None, causal, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_backward(device, causal):
    dtype = low_precision(device)
    q, k, v = qkv(device, dtype)
    out, lse = torch.ops.flash_ext.attention_forward(q, k, v, None, causal)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.flash_ext.attention_backward.default,
                          (dout, q, k, v, out, lse, 32 ** -0.5, causal, False))


class TinyAttentionBlock(torch.nn.Module):
    def __init__(self, dim=64, nheads=4):
        super().__init__()
        self.nheads = nheads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.nheads, dim // self.nheads).unbind(2)
        o = torch.ops.flash_ext.attention(q, k, v, None, True)
        return self.proj(o.reshape(b, s, dim))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()
    dtype = low_precision(device)
    model = TinyAttentionBlock().to(device=device, dtype=dtype)
    x = torch.randn(2, 37, 64, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x] + list(model.parameters()))
    y = compiled(x)
    g = torch.autograd.grad(y.square().sum(), [x] + list(model.parameters()))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_eager, **tol)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 5, 2, 2, 8), (2, 6, 4, 4, 2, 8), (1, 5, 3, 3, 1, 16)])
def test_gradcheck_float64(causal, shape):
    b, sq, sk, h, hk, d = shape
    q, k, v = (torch.randn(b, s, n, d, dtype=torch.float64, requires_grad=True)
               for s, n in ((sq, h), (sk, hk), (sk, hk)))
    f = lambda q, k, v: flash_ext.attention(q, k, v, causal=causal)
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_float64_forward_matches_reference():
    """float64 is a CPU dtype (CUDA float64 is rejected: test_cuda_rejects_float32_and_float64 below)."""
    q, k, v = qkv("cpu", torch.float64, sq=130, sk=700, d=48)
    for causal in (False, True):
        out, lse = flash_ext.attention(q, k, v, causal=causal, return_lse=True)
        out_ref, lse_ref = attention_ref(q, k, v, causal)
        torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse, lse_ref.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch_sdpa(device, causal):
    dtype = low_precision(device)
    mk = lambda h, s: torch.randn(2, h, s, 64, device=device, dtype=dtype)
    q, k, v = mk(8, 100), mk(8, 100), mk(8, 100)
    out = flash_ext.sdpa(q, k, v, is_causal=causal)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # GQA and an explicit scale
    kg, vg = mk(2, 100), mk(2, 100)
    out = flash_ext.sdpa(q, kg, vg, scale=0.05, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), kg.double(), vg.double(), scale=0.05, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_sdpa_rejects_what_it_does_not_support():
    """attn_mask and top-left is_causal are supported since issue 15 (tests/test_variants.py); attn_mask with
    is_causal raises as torch's SDPA documents (and its math backend does). dropout_p is supported since issue 19
    (tests/test_dropout.py)."""
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        flash_ext.sdpa(q, q[:, :1], q[:, :1])
    with pytest.raises(RuntimeError, match="attn_mask must not be set when is_causal=True"):
        flash_ext.sdpa(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="query must be a 4-D"):
        flash_ext.sdpa(q[0], q, q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,sq,sk", [(0, 16, 16), (2, 0, 16), (2, 16, 0), (0, 0, 0)])
def test_empty_inputs(device, b, sq, sk):
    dtype = low_precision(device)
    q = torch.randn(b, sq, 4, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, sk, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, sk, 2, 32, device=device, dtype=dtype, requires_grad=True)
    for causal in (False, True):
        out, lse = flash_ext.attention(q, k, v, causal=causal, return_lse=True)
        assert out.shape == (b, sq, 4, 32) and lse.shape == (b, 4, sq)
        assert torch.equal(out, torch.zeros_like(out))
        if sk == 0:
            assert bool((lse == float("-inf")).all())
        out = flash_ext.attention(q, k, v, causal=causal)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), allow_unused=False)
        for g, t in ((dq, q), (dk, k), (dv, v)):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key(device):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key (bottom-right
    alignment): out 0, lse -inf, gradients 0 there, and no NaN anywhere."""
    dtype = low_precision(device)
    q, k, v = qkv(device, dtype, sq=50, sk=20, requires_grad=True)
    out, lse = flash_ext.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert bool((lse[:, :, :30] == float("-inf")).all()) and bool(torch.isfinite(lse[:, :, 30:]).all())
    out = flash_ext.attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[:, :30], torch.zeros_like(dq[:, :30]))
    for g in (out, dq, dk, dv):
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("device", DEVICES)
def test_large_inputs_do_not_overflow(device):
    """Inputs scaled x5 (scores in the hundreds): online softmax must stay finite and correct."""
    dtype = low_precision(device)
    q, k, v = (t * 5 for t in qkv(device, dtype, sq=200, sk=300, d=64))
    out, lse = flash_ext.attention(q, k, v, return_lse=True)
    out_ref, lse_ref = attention_ref(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), out_ref, atol=tol * 5, rtol=tol)
    torch.testing.assert_close(lse.double(), lse_ref, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_output(device):
    """out.sum() gives a gradient expanded with stride 0 in every dimension; it must work."""
    dtype = low_precision(device)
    q, k, v = qkv(device, dtype, requires_grad=True)
    flash_ext.attention(q, k, v).sum().backward()
    out = flash_ext.attention(q.detach(), k.detach(), v.detach())
    assert q.grad is not None and torch.isfinite(q.grad).all() and out.shape == q.shape


def test_deterministic_flag_cpu_gradients_identical():
    q, k, v = qkv("cpu", torch.float32, requires_grad=True)
    grads = []
    for det in (False, True, True):
        out = flash_ext.attention(q, k, v, causal=True, deterministic=det)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            assert torch.equal(a, b)


# ---- bad input: a clear error naming the argument ----

def _bad_cases():
    f32 = torch.float32
    ok = lambda *shape, dtype=f32: torch.randn(*shape, dtype=dtype)
    q, k = ok(2, 8, 4, 16), ok(2, 10, 2, 16)
    return [
        ("q must be a 4-D tensor", (ok(8, 4, 16), k, k), {}),
        ("k must be a 4-D tensor", (q, ok(10, 2, 16), k), {}),
        ("v must be a 4-D tensor", (q, k, ok(2, 10, 2, 16, 1)), {}),
        ("k must have the same dtype as q", (q, k.double(), k), {}),
        ("v must have the same dtype as q", (q, k, k.half()), {}),
        ("k must have the head_dim of q", (q, ok(2, 10, 2, 8), ok(2, 10, 2, 8)), {}),
        ("v must have the head_dim of q", (q, k, ok(2, 10, 2, 8)), {}),
        ("v must have the \\(seqlen_k, nheads_k\\) of k", (q, k, ok(2, 11, 2, 16)), {}),
        ("k must have the batch size of q", (q, ok(3, 10, 2, 16), ok(3, 10, 2, 16)), {}),
        ("must be divisible by k's nheads_k", (q, ok(2, 10, 3, 16), ok(2, 10, 3, 16)), {}),
        ("q must be float64, float32, bfloat16 or float16", (q.int(), k.int(), k.int()), {}),
        ("softmax_scale must be a finite number > 0", (q, k, k), {"softmax_scale": 0.0}),
        ("softmax_scale must be a finite number > 0", (q, k, k), {"softmax_scale": -1.0}),
        ("softmax_scale must be a finite number > 0", (q, k, k), {"softmax_scale": float("nan")}),
    ]


@pytest.mark.parametrize("message,args,kwargs", _bad_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_errors(message, args, kwargs):
    with pytest.raises(RuntimeError, match=message):
        flash_ext.attention(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_inputs(device):
    dtype = low_precision(device)
    q, k, v = qkv(device, dtype)
    out, lse = torch.ops.flash_ext.attention_forward(q, k, v)
    bwd = torch.ops.flash_ext.attention_backward
    with pytest.raises(RuntimeError, match="dout must have the shape of q"):
        bwd(out[:, :-1], q, k, v, out, lse, 0.1, False)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        bwd(out, q, k, v, out, lse.double(), 0.1, False)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        bwd(out, q, k, v, out, lse[:, :1], 0.1, False)
    with pytest.raises(RuntimeError, match="out must have the dtype of q"):
        bwd(out, q, k, v, out.double(), lse, 0.1, False)
    with pytest.raises(RuntimeError, match="softmax_scale must be a finite number > 0"):
        bwd(out, q, k, v, out, lse, -0.1, False)


@requires_cuda
def test_mixed_devices_rejected():
    q = torch.randn(1, 8, 2, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="k must be on the same device as q"):
        flash_ext.attention(q, q.cpu(), q)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_rejects_float32_and_float64(dtype):
    q = torch.randn(1, 8, 2, 32, device="cuda", dtype=dtype)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16 on CUDA"):
        flash_ext.attention(q, q, q)


@requires_cuda
def test_cuda_rejects_head_dim_above_256():
    q = torch.randn(1, 8, 2, 264, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim must be at most 256 on CUDA, got 264"):
        flash_ext.attention(q, q, q)
