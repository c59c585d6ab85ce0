"""Float64 reference attention (materializes the full matrix: fine in tests) and the FlashAttention
correctness rule every test applies (assert_fa_close; docs/ARCHITECTURE.md, "Correctness")."""
import torch


def visible_keys(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), attention_chunk=0, device=None):
    """(seqlen_q, seqlen_k) bool: which keys each query row sees under causal, the window and the chunks
    (docs/ARCHITECTURE.md, "Masks and score modifiers"); i' = i + seqlen_k - seqlen_q."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)  # i'
    j = torch.arange(seqlen_k, device=device)[None, :]
    left, right = window_size
    if causal:
        right = 0
    vis = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    if attention_chunk > 0:
        vis &= torch.div(i, attention_chunk, rounding_mode="floor") == torch.div(j, attention_chunk,
                                                                                 rounding_mode="floor")
    return vis


def attention_ref(q, k, v, causal=False, softmax_scale=None, upcast=True, *, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, attn_bias=None, attention_chunk=0, sinks=None, dropout_mask=None, dropout_p=0.0):
    """softmax(scale * q k^T + modifiers + mask) v on (batch, seqlen, nheads, head_dim) tensors.

    upcast=True computes in float64 (the reference); upcast=False computes in the inputs' dtype
    (`pt`, what plain PyTorch gets in that precision; the bias, slopes and sinks are cast to it). Returns
    (out, lse); lse is -inf and out 0 for a row that sees no key (lse = sink with sinks). Causal is aligned
    bottom-right. The features act as docs/ARCHITECTURE.md ("Masks and score modifiers") says: softcap, ALiBi,
    attn_bias (float: added; bool: a mask; broadcast as torch broadcasts), then the masks; sinks join the
    softmax's denominator. dropout_mask (broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = kept) drops
    probabilities after the softmax and scales the kept ones by 1 / (1 - dropout_p) (lse is the softmax's).
    Differentiable (the reference gradients): every hidden position is filled with -inf
    by masked_fill, whose gradient there is 0, so a row that sees nothing gets zero gradients, not softmax's NaN.
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
    plain = (window_size == (-1, -1) and softcap == 0 and alibi_slopes is None and attn_bias is None
             and attention_chunk == 0 and sinks is None and dropout_mask is None)
    if plain:  # the computation every test before issue 15 was written against
        if causal:
            i = torch.arange(seqlen_q, device=q.device)[:, None]
            j = torch.arange(seqlen_k, device=q.device)[None, :]
            scores = scores.masked_fill(j > i + seqlen_k - seqlen_q, float("-inf"))
        lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows give NaN: they see no key
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.to(dtype) if not upcast else out, lse

    sdtype = scores.dtype
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(sdtype)
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(slopes.shape[0], -1, 1, 1)
        i = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores - slopes * (i - j).abs().to(sdtype)
    visible = visible_keys(seqlen_q, seqlen_k, causal, window_size, attention_chunk, q.device)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            visible = visible & attn_bias
        else:
            scores = scores + attn_bias.to(sdtype)
            visible = visible & (attn_bias != float("-inf"))
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        b, h = scores.shape[:2]
        sink_col = sinks.to(sdtype).view(1, h, 1, 1).expand(b, h, seqlen_q, 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink adds nothing to the output
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.to(dtype) if not upcast else out, lse


def attention_ref_grads(dout, q, k, v, upcast=True, attn_bias=None, sinks=None, bias_grad=False, **kw):
    """Forward and backward of attention_ref by torch autograd: in float64 (upcast=True, the reference) or in
    the inputs' dtype (upcast=False, `pt`). Returns (out, lse, grads) with grads a dict of dq, dk, dv, and
    dbias (when bias_grad: a float attn_bias, gradient of its own shape) and dsinks (when sinks are given)."""
    cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
    q, k, v = (cast(t).requires_grad_() for t in (q, k, v))
    leaves = {"dq": q, "dk": k, "dv": v}
    if attn_bias is not None:
        attn_bias = cast(attn_bias) if attn_bias.is_floating_point() else attn_bias.detach()
        if bias_grad:
            leaves["dbias"] = attn_bias.requires_grad_()
    if sinks is not None:
        sinks = cast(sinks).requires_grad_()
        leaves["dsinks"] = sinks
    alibi = kw.pop("alibi_slopes", None)
    if alibi is not None:
        alibi = cast(alibi)
    out, lse = attention_ref(q, k, v, upcast=upcast, attn_bias=attn_bias, sinks=sinks, alibi_slopes=alibi, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.double() if upcast else dout)
    return out.detach(), lse.detach(), dict(zip(leaves, grads))


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
