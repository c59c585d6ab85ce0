"""Correctness of out, lse, dq, dk, dv against the float64 reference, by the rule of
reference.assert_fa_close, over odd shapes, head dims, causal, MHA/GQA/MQA, strided (BHSD-transposed)
inputs and non-contiguous dout.

The same cases run on every device; the CUDA grid is the wider one (every instantiated head dim and
the seqlens around the kernels' block sizes) and skips with a stated reason where there is no CUDA device or build."""
import itertools

import pytest
import torch

import flash_ext
from conftest import poison_cuda_allocator, requires_cuda
from reference import assert_fa_close, attention_bwd_pt, attention_ref

# (batch, nheads, nheads_k, bhsd_inputs): MHA, GQA and MQA, with and without transposed inputs.
LAYOUTS = [(1, 4, 4, False), (9, 6, 2, True), (2, 4, 1, False), (1, 3, 3, True)]

CPU_SEQLENS = [(1, 1), (1, 17), (17, 1), (17, 128), (113, 203), (203, 113), (128, 128), (1023, 203),
               (203, 1023)]
CPU_HEAD_DIMS = [8, 32, 40, 64, 80, 96, 128, 256]

CUDA_SEQLENS = [(1, 1), (1, 239), (113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256),
                (1023, 1024), (1024, 1023), (2048, 2048), (4224, 4224)]
CUDA_HEAD_DIMS = [32, 40, 64, 80, 96, 128, 160, 192, 224, 256]


def _cases():
    cases = []
    # CPU: float32 and bfloat16 over the whole grid, float16 on a slice; layouts rotate per case. float32 cases
    # above 2^26 multiply-adds (batch * nheads * seqlen_q * seqlen_k * head_dim: 22 of them) run the CPU
    # kernels' float32 path, the other 122 their float64 path (csrc/cpu/attention_cpu.cpp, Precision).
    for i, (dtype, causal, (sq, sk), d) in enumerate(
            itertools.product([torch.float32, torch.bfloat16], [False, True], CPU_SEQLENS, CPU_HEAD_DIMS)):
        cases.append(pytest.param("cpu", dtype, causal, sq, sk, d, LAYOUTS[i % len(LAYOUTS)],
                                  id=f"cpu-{str(dtype)[6:]}-c{int(causal)}-{sq}x{sk}-d{d}-L{i % len(LAYOUTS)}"))
    for i, (causal, (sq, sk), d) in enumerate(itertools.product([False, True], [(113, 203), (203, 113)], [64, 96])):
        cases.append(pytest.param("cpu", torch.float16, causal, sq, sk, d, LAYOUTS[i % len(LAYOUTS)],
                                  id=f"cpu-float16-c{int(causal)}-{sq}x{sk}-d{d}"))
    # CUDA: fp16 and bf16, every head dim, every seqlen pair, causal both; MHA/GQA/MQA rotate.
    for i, (dtype, causal, (sq, sk), d) in enumerate(
            itertools.product([torch.float16, torch.bfloat16], [False, True], CUDA_SEQLENS, CUDA_HEAD_DIMS)):
        layout = LAYOUTS[i % len(LAYOUTS)]
        if sq * sk > 1024 * 1024:  # keep the float64 reference small for the longest sequences
            layout = (1,) + layout[1:]
        cases.append(pytest.param("cuda", dtype, causal, sq, sk, d, layout, marks=requires_cuda,
                                  id=f"cuda-{str(dtype)[6:]}-c{int(causal)}-{sq}x{sk}-d{d}-L{i % len(LAYOUTS)}"))
    return cases


def make_inputs(device, dtype, batch, nheads, nheads_k, sq, sk, d, bhsd, scale_inputs=1.0):
    def make(s, h):
        if bhsd:  # (batch, nheads, seqlen, d) memory, viewed as (batch, seqlen, nheads, d): no copy
            t = torch.randn(batch, h, s, d, device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(batch, s, h, d, device=device, dtype=dtype)
        return (t * scale_inputs).requires_grad_()
    return make(sq, nheads), make(sk, nheads_k), make(sk, nheads_k)


def check_attention(device, dtype, causal, q, k, v, deterministic=False, softmax_scale=None):
    """Runs our forward and backward, the float64 reference (autograd) and PyTorch in `dtype` (the same
    forward, and FlashAttention's backward formulas), and applies reference.assert_fa_close to out, lse, dq,
    dk, dv. dout is a non-contiguous (transposed) tensor."""
    batch, sq, nheads, d = q.shape
    dout = torch.randn(batch, nheads, sq, d, device=device, dtype=dtype).transpose(1, 2)

    poison_cuda_allocator(((batch, sq, nheads, d), dtype), ((batch, nheads, sq), torch.float32))
    out, lse = flash_ext.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True,
                                   deterministic=deterministic)
    # Gradients through the differentiable op (lse is not differentiable).
    poison_cuda_allocator(((batch, sq, nheads, d), dtype), (tuple(k.shape), dtype), (tuple(v.shape), dtype))
    out2 = flash_ext.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, deterministic=deterministic)
    dq, dk, dv = torch.autograd.grad(out2, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = attention_ref(q64, k64, v64, causal, softmax_scale)
    grads_ref = torch.autograd.grad(out_ref, (q64, k64, v64), dout.double())
    qp, kp, vp = (t.detach() for t in (q, k, v))
    out_pt, lse_pt = attention_ref(qp, kp, vp, causal, softmax_scale, upcast=False)
    grads_pt = attention_bwd_pt(dout, qp, kp, vp, causal, softmax_scale)

    assert torch.equal(out, out2), "out differs between two identical calls"
    assert_fa_close("out", out, out_ref, out_pt, dtype)
    assert_fa_close("lse", lse, lse_ref, lse_pt, torch.float32)
    for name, ours, ref, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref, grads_pt):
        assert_fa_close(name, ours, ref, pt, dtype)


@pytest.mark.parametrize("device,dtype,causal,sq,sk,d,layout", _cases())
def test_attention(device, dtype, causal, sq, sk, d, layout):
    batch, nheads, nheads_k, bhsd = layout
    q, k, v = make_inputs(device, dtype, batch, nheads, nheads_k, sq, sk, d, bhsd)
    check_attention(device, dtype, causal, q, k, v)
