"""Legal inputs of every shape and layout users pass: no fault, no refusal, the same answer as the plain case.

- views whose base pointer is not 16-byte aligned (offsets of 1, 2, 4, 8 elements into a buffer) for q, k, v
  and dout, forward and backward: bitwise the result of contiguous copies (the API copies them once);
- head dims that are not multiples of 8 (padded inside the op, the caller's head dim returned), against the
  float64 reference, forward and backward;
- a non-contiguous last dimension (copied);
- expanded, batch-0 and seqlen-0 gradients;
- torch.autocast casting float32 inputs to the autocast dtype, as SDPA's inputs are;
- on CUDA both kernel families forced (FLASH_EXT_BACKEND), and the sm80 backward's A100 fallback tile
  configurations forced on any GPU (FLASH_EXT_SM80_SMEM_LIMIT), so a Hopper machine runs them too.
"""
import pytest
import torch

import flash_ext
from conftest import CUDA_OK, device_params, requires_cuda
from test_attention import check_attention, make_inputs

DEVICES = device_params()
# The families to force on this machine: sm90 only where it can run.
FAMILIES = ["sm80"]
if CUDA_OK and torch.cuda.get_device_capability() == (9, 0):
    FAMILIES.append("sm90")
# A100's opt-in shared memory per block: below what the main sm80 backward configurations of head dims
# > 64 need on Hopper, so the launcher takes their fallback configurations.
A100_SMEM = 166912


def low_precision(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.fixture(params=FAMILIES)
def family(request, monkeypatch):
    if CUDA_OK:
        monkeypatch.setenv("FLASH_EXT_BACKEND", request.param)
    return request.param


def misaligned(t, offset):
    """The same values as t, contiguous, starting `offset` elements into a larger buffer."""
    buf = torch.empty(t.numel() + offset, device=t.device, dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0 or offset % 8 == 0
    return view


def fwd_bwd(q, k, v, dout, causal, deterministic=False):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = flash_ext.attention(q, k, v, causal=causal, return_lse=True, deterministic=deterministic)
    out2 = flash_ext.attention(q, k, v, causal=causal, deterministic=deterministic)
    grads = torch.autograd.grad(out2, (q, k, v), dout)
    return (out, lse) + grads


# ---- misaligned base pointers ----

@requires_cuda
@pytest.mark.parametrize("which", ["q", "k", "v", "dout", "all"])
@pytest.mark.parametrize("offset", [1, 2, 4, 8])
@pytest.mark.parametrize("d,causal", [(64, False), (128, True), (96, True), (256, False)])
def test_misaligned_views_match_contiguous(family, which, offset, d, causal):
    """Views at element offsets 1/2/4/8 (2-16 bytes: all but 8 break 16-byte alignment) give bitwise the
    result of contiguous inputs, forward and backward (deterministic, so dq compares bitwise too)."""
    dtype = torch.float16 if offset % 2 else torch.bfloat16
    q, k, v = (t.detach() for t in make_inputs("cuda", dtype, 2, 4, 2, 77, 130, d, False))
    dout = torch.randn_like(q)
    want = fwd_bwd(q, k, v, dout, causal, deterministic=True)
    args = {"q": q, "k": k, "v": v, "dout": dout}
    for name in (["q", "k", "v", "dout"] if which == "all" else [which]):
        args[name] = misaligned(args[name], offset)
    got = fwd_bwd(args["q"], args["k"], args["v"], args["dout"], causal, deterministic=True)
    torch.cuda.synchronize()  # a fault would surface here
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), f"{name} differs from the contiguous inputs' result"


@requires_cuda
def test_misaligned_lse_and_out_in_the_backward_op():
    """attention_backward called directly with out / lse views that are not 16-byte aligned."""
    q, k, v = (t.detach() for t in make_inputs("cuda", torch.bfloat16, 1, 2, 2, 65, 65, 64, False))
    out, lse = torch.ops.flash_ext.attention_forward(q, k, v, None, True)
    dout = torch.randn_like(out)
    scale = 64 ** -0.5
    want = torch.ops.flash_ext.attention_backward(dout, q, k, v, out, lse, scale, True, True)
    lse_buf = torch.empty(lse.numel() + 1, device="cuda", dtype=torch.float32)
    lse_view = lse_buf[1:].view(lse.shape)
    lse_view.copy_(lse)
    got = torch.ops.flash_ext.attention_backward(misaligned(dout, 3), q, k, v, misaligned(out, 1), lse_view,
                                                 scale, True, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---- head dims that are not multiples of 8 ----

ODD_HEAD_DIMS = [8, 40, 59, 60, 72, 111, 200, 256]


@requires_cuda
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_any_head_dim_cuda(family, d, causal):
    for dtype, (sq, sk), layout in [(torch.float16, (113, 203), (2, 4, 2, False)),
                                    (torch.bfloat16, (203, 128), (1, 3, 1, True))]:
        q, k, v = make_inputs("cuda", dtype, *layout[:3], sq, sk, d, layout[3])
        check_attention("cuda", dtype, causal, q, k, v)


@pytest.mark.parametrize("d", [59, 111])
def test_any_head_dim_cpu(d):
    q, k, v = make_inputs("cpu", torch.float32, 2, 4, 2, 37, 53, d, False)
    check_attention("cpu", torch.float32, True, q, k, v)


@requires_cuda
def test_odd_head_dim_returns_callers_head_dim_and_scale():
    """The default scale is 1/sqrt of the caller's head dim, not of the padded one; outputs are contiguous."""
    q, k, v = make_inputs("cuda", torch.bfloat16, 1, 2, 2, 50, 50, 59, False)
    out, lse = flash_ext.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = flash_ext.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), return_lse=True)
    assert out.shape == q.shape and out.is_contiguous()
    assert (lse.cpu().double() - ref_lse).abs().max().item() < 2e-2
    (g,) = torch.autograd.grad(out.sum(), (q,))
    assert g.shape == q.shape and g.is_contiguous()


# ---- layouts: non-contiguous last dimension, expanded / empty gradients ----

@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_last_dim(device):
    dtype = low_precision(device)
    wide = [torch.randn(2, n, h, 48, 2, device=device, dtype=dtype) for n, h in ((31, 4), (45, 2), (45, 2))]
    q, k, v = (t[..., 1] for t in wide)  # last-dim stride 2
    assert q.stride(-1) == 2
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    check_attention(device, dtype, True, q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_dout_with_noncontiguous_last_dim(device):
    dtype = low_precision(device)
    q, k, v = (t.detach() for t in make_inputs(device, dtype, 2, 4, 2, 33, 47, 64, False))
    dout = torch.randn(2, 33, 4, 64, 3, device=device, dtype=dtype)[..., 0]
    want = fwd_bwd(q, k, v, dout.contiguous(), False, deterministic=True)
    got = fwd_bwd(q, k, v, dout, False, deterministic=True)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 16, 4, 2, 32), (2, 0, 4, 2, 32), (2, 16, 4, 2, 32)],
                         ids=["batch0", "seqlen_q0", "dense"])
def test_expanded_gradient_any_size(device, shape):
    """out.sum().backward() hands the op an expanded gradient (stride 0 everywhere), also for empty outputs."""
    b, s, h, hk, d = shape
    dtype = low_precision(device)
    q = torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, 19, hk, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, 19, hk, d, device=device, dtype=dtype, requires_grad=True)
    flash_ext.attention(q, k, v, causal=True).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
    if b == 0 or s == 0:
        assert float(k.grad.abs().sum()) == 0.0 and float(v.grad.abs().sum()) == 0.0
    else:
        assert float(v.grad.abs().sum()) > 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_seqlen_k_zero_backward(device):
    dtype = low_precision(device)
    q = torch.randn(2, 7, 2, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 0, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 0, 2, 32, device=device, dtype=dtype, requires_grad=True)
    out = flash_ext.attention(q, k, v)
    assert float(out.abs().sum()) == 0.0
    out.backward(torch.randn_like(out))
    assert float(q.grad.abs().sum()) == 0.0 and k.grad.shape == k.shape


# ---- autocast ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_float32_inputs(device, amp_dtype):
    """Under torch.autocast float32 q, k, v run in the autocast dtype (as SDPA's do) and the gradients reach
    the float32 leaves in float32; the result is that of casting by hand."""
    q, k, v = (t.detach() for t in make_inputs(device, torch.float32, 2, 4, 2, 41, 57, 64, False))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.autocast(device_type=device, dtype=amp_dtype):
        out = flash_ext.attention(q, k, v, causal=True, deterministic=True)
        sdpa_out = flash_ext.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False,
                                  enable_gqa=True)
    assert out.dtype == amp_dtype and sdpa_out.dtype == amp_dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert all(g.dtype == torch.float32 for g in grads)
    qc, kc, vc = (t.detach().to(amp_dtype).requires_grad_() for t in (q, k, v))
    want = flash_ext.attention(qc, kc, vc, causal=True, deterministic=True)
    want_grads = torch.autograd.grad(want, (qc, kc, vc), dout)
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w.float())


# ---- the sm80 backward's A100 fallback configurations ----

@requires_cuda
@pytest.mark.parametrize("d", [32, 64, 128, 160, 192])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_sm80_fallback_backward(monkeypatch, d, causal, deterministic):
    """FLASH_EXT_SM80_SMEM_LIMIT below a configuration's shared memory makes the sm80 launcher take the
    fallback tiles an A100 gets (head dims 32, 64, 128, 160, 192 have one); they must meet the same accuracy
    rule."""
    monkeypatch.setenv("FLASH_EXT_BACKEND", "sm80")
    monkeypatch.setenv("FLASH_EXT_SM80_SMEM_LIMIT", str(A100_SMEM))
    q, k, v = make_inputs("cuda", torch.bfloat16, 2, 4, 2, 203, 113, d, True)
    check_attention("cuda", torch.bfloat16, causal, q, k, v, deterministic=deterministic)


@requires_cuda
@pytest.mark.parametrize("d", [224, 256])
def test_sm80_backward_without_fallback_raises(monkeypatch, d):
    """Head dims 224 / 256 have no sm80 backward configuration that fits an A100's shared memory: with that
    limit the op raises a clear error instead of failing a launch."""
    monkeypatch.setenv("FLASH_EXT_BACKEND", "sm80")
    monkeypatch.setenv("FLASH_EXT_SM80_SMEM_LIMIT", str(A100_SMEM))
    q, k, v = make_inputs("cuda", torch.bfloat16, 1, 2, 2, 64, 64, d, False)
    with pytest.raises(RuntimeError, match="no CUDA backward kernel for head_dim"):
        flash_ext.attention(q, k, v).sum().backward()


@requires_cuda
def test_bad_smem_limit_env(monkeypatch):
    monkeypatch.setenv("FLASH_EXT_SM80_SMEM_LIMIT", "lots")
    q, k, v = make_inputs("cuda", torch.bfloat16, 1, 2, 2, 16, 16, 64, False)
    with pytest.raises(RuntimeError, match="FLASH_EXT_SM80_SMEM_LIMIT must be a positive number of bytes"):
        flash_ext.attention(q, k, v).sum().backward()
