"""Float64 reference attention (materializes the full matrix: fine in tests) and the FlashAttention
correctness rule every test applies (assert_fa_close; docs/ARCHITECTURE.md, "Correctness")."""
import torch


def attention_ref(q, k, v, causal=False, softmax_scale=None, upcast=True):
    """softmax(scale * q k^T + mask) v on (batch, seqlen, nheads, head_dim) tensors.

    upcast=True computes in float64 (the reference); upcast=False computes in the inputs' dtype
    (`pt`, what plain PyTorch gets in that precision). Returns (out, lse); lse is -inf and out 0 for
    a row that sees no key. Causal is aligned bottom-right.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if causal:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + seqlen_k - seqlen_q, float("-inf"))
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows give NaN: they see no key
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.to(dtype) if not upcast else out, lse


def attention_bwd_pt(dout, q, k, v, causal=False, softmax_scale=None):
    """The backward FlashAttention computes, done by PyTorch in the inputs' dtype with the matrix
    materialized: P = softmax(scale q k^T), D = rowsum(dO * O), dP = dO v^T, dS = P * (dP - D),
    dV = P^T dO, dQ = scale dS k, dK = scale dS^T q (summed over each K/V head's group)."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    nheads, nheads_k = q.shape[2], k.shape[2]
    group = nheads // nheads_k
    kr, vr = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, kr)
    if causal:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + seqlen_k - seqlen_q, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    d = (dout * out).sum(-1).transpose(1, 2)[..., None]  # batch x nheads x seqlen_q x 1
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - d)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    b = q.shape[0]
    dk = dk.reshape(b, seqlen_k, nheads_k, group, -1).sum(3)
    dv = dv.reshape(b, seqlen_k, nheads_k, group, -1).sum(3)
    return dq, dk, dv


def rounding_atol(ref, dtype):
    """2 * max|(ref + 0.3 - 0.3) - ref| with the arithmetic in `dtype`: a rounding-level floor."""
    finite = ref[torch.isfinite(ref)]
    if finite.numel() == 0:
        return 0.0
    r = finite.to(dtype)
    return 2 * ((r + 0.3) - 0.3).double().sub(finite.double()).abs().max().item()


def assert_fa_close(name, ours, ref, pt, dtype):
    """max|ours - ref| <= 2 * max|pt - ref| + atol, NaN never passes, -inf must match exactly."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours, ref, pt = ours.double(), ref.double(), pt.double()
    assert not torch.isnan(ours).any(), f"{name}: {int(torch.isnan(ours).sum())} NaN elements"
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(ours), inf_ref), f"{name}: infinite entries differ from the reference"
    if inf_ref.any():
        assert torch.equal(ours[inf_ref], ref[inf_ref]), f"{name}: -inf entries differ in sign"
    fin = ~inf_ref
    if fin.sum() == 0:
        return
    err = (ours[fin] - ref[fin]).abs().max().item()
    pt_err = (pt[fin] - ref[fin]).abs().max().item()
    atol = rounding_atol(ref, dtype)
    assert err <= 2 * pt_err + atol, (
        f"{name}: max error {err:.3e} > 2 * {pt_err:.3e} (PyTorch in {dtype}) + {atol:.3e}")
