"""Fake (meta) kernels and autograd for the C++ ops, registered the way torch.library expects, so
autograd, torch.compile(fullgraph=True) and torch.library.opcheck all work.

`attention` is CompositeImplicitAutograd in C++ (it calls attention_forward), so its gradient and
its tracing come from attention_forward's registrations here.
"""
import torch

from . import _C  # noqa: F401  (the schemas must exist before we register against them)

# Positions of the differentiable inputs of attention_forward besides q, k, v.
_BIAS_INDEX = 10
_SINKS_INDEX = 12


def _default_scale(softmax_scale, head_dim):
    return softmax_scale if softmax_scale is not None else head_dim ** -0.5


def _grad_of_out(grad_out, out):
    """out's gradient as the backward ops take it: zeros where autograd passes None, a contiguous last dim (e.g.
    out.sum() gives a gradient expanded with stride 0)."""
    if grad_out is None:
        return torch.zeros_like(out)
    return grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out


def _check_devices(q, **tensors):
    # The dispatcher runs these fake kernels, not the C++ checks, when one of the tensors is on the meta device.
    for name, t in tensors.items():
        torch._check(t is None or t.device == q.device,
                     lambda: f"{name} must be on the device of q ({q.device}), got {t.device}")


@torch.library.register_fake("flash_ext::attention_forward")
def _attention_forward_fake(q, k, v, softmax_scale=None, causal=False, deterministic=False, window_left=-1,
                            window_right=-1, softcap=0.0, alibi_slopes=None, attn_bias=None, attention_chunk=0,
                            sinks=None, block_kv=None, block_q=None, block_size=0, dropout_p=0.0,
                            dropout_rng=None):
    torch._check(q.dim() == 4, lambda: f"q must be a 4-D tensor, got {q.dim()}-D")
    torch._check(k.dim() == 4 and v.dim() == 4, lambda: "k and v must be 4-D tensors")
    torch._check(k.shape[3] == q.shape[3] and v.shape[3] == q.shape[3], lambda: "head_dim must match")
    torch._check(k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0,
                 lambda: "q's nheads must be divisible by k's nheads_k")
    torch._check(attn_bias is None or attn_bias.dim() == 4, lambda: "attn_bias must be a 4-D tensor")
    torch._check((block_kv is None) == (block_q is None), lambda: "block_kv and block_q must be given together")
    _check_devices(q, alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks, block_kv=block_kv,
                   block_q=block_q)
    batch, seqlen_q, nheads, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, nheads, head_dim))
    lse = q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("flash_ext::attention_backward")
def _attention_backward_fake(dout, q, k, v, out, lse, softmax_scale, causal, deterministic=False, window_left=-1,
                             window_right=-1, softcap=0.0, alibi_slopes=None, attn_bias=None, attention_chunk=0,
                             sinks=None, bias_requires_grad=False, block_kv=None, block_q=None, block_size=0,
                             dropout_p=0.0, dropout_rng=None):
    torch._check(dout.shape == q.shape, lambda: "dout must have the shape of q")
    torch._check(lse.dtype == torch.float32, lambda: "lse must be float32")
    torch._check(not bias_requires_grad or attn_bias is not None, lambda: "bias_requires_grad needs an attn_bias")
    _check_devices(q, alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks, block_kv=block_kv,
                   block_q=block_q)
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_requires_grad else q.new_empty((0,))
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dsinks


def _setup_context(ctx, inputs, output):
    (q, k, v, softmax_scale, causal, deterministic, window_left, window_right, softcap, alibi_slopes, attn_bias,
     attention_chunk, sinks, block_kv, block_q, block_size, dropout_p, dropout_rng) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, attn_bias, sinks, block_kv, block_q, dropout_rng)
    ctx.block_size = block_size
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = _default_scale(softmax_scale, q.shape[-1])
    ctx.causal = causal
    ctx.deterministic = deterministic
    ctx.features = (window_left, window_right, softcap, attention_chunk)
    # lse is returned for inspection; gradients flow through out only.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, alibi_slopes, attn_bias, sinks, block_kv, block_q, dropout_rng = ctx.saved_tensors
    window_left, window_right, softcap, attention_chunk = ctx.features
    grad_out = _grad_of_out(grad_out, out)
    # A bool mask has no gradient (and cannot require one).
    bias_grad = attn_bias is not None and attn_bias.is_floating_point() and ctx.needs_input_grad[_BIAS_INDEX]
    dq, dk, dv, dbias, dsinks = torch.ops.flash_ext.attention_backward(
        grad_out, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic, window_left, window_right,
        softcap, alibi_slopes, attn_bias, attention_chunk, sinks, bias_grad, block_kv, block_q, ctx.block_size,
        ctx.dropout_p, dropout_rng)
    return (dq, dk, dv, None, None, None, None, None, None, None,
            dbias if bias_grad else None, None,
            dsinks if sinks is not None and ctx.needs_input_grad[_SINKS_INDEX] else None, None, None, None, None, None)


torch.library.register_autograd(
    "flash_ext::attention_forward", _backward, setup_context=_setup_context)


# ---- variable-length batches (attention_varlen_forward / attention_varlen_backward)
_VARLEN_SINKS_INDEX = 16


@torch.library.register_fake("flash_ext::attention_varlen_forward")
def _attention_varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None,
                                   softmax_scale=None, causal=False, deterministic=False, window_left=-1,
                                   window_right=-1, softcap=0.0, alibi_slopes=None, attention_chunk=0, sinks=None):
    torch._check(q.dim() == 3, lambda: f"q must be a 3-D tensor (total_q, nheads, head_dim), got {q.dim()}-D")
    torch._check(k.dim() == 3 and v.dim() == 3, lambda: "k and v must be 3-D tensors (total_k, nheads_k, head_dim)")
    torch._check(k.shape[2] == q.shape[2] and v.shape[2] == q.shape[2], lambda: "head_dim must match")
    torch._check(k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
                 lambda: "q's nheads must be divisible by k's nheads_k")
    torch._check(cu_seqlens_q.dim() == 1 and cu_seqlens_k.shape == cu_seqlens_q.shape,
                 lambda: "cu_seqlens_q and cu_seqlens_k must be 1-D tensors of batch + 1 elements")
    _check_devices(q, alibi_slopes=alibi_slopes, sinks=sinks)
    total_q, nheads, head_dim = q.shape
    return q.new_empty((total_q, nheads, head_dim)), q.new_empty((nheads, total_q), dtype=torch.float32)


@torch.library.register_fake("flash_ext::attention_varlen_backward")
def _attention_varlen_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    seqused_k, softmax_scale, causal, deterministic=False, window_left=-1,
                                    window_right=-1, softcap=0.0, alibi_slopes=None, attention_chunk=0, sinks=None):
    torch._check(dout.shape == q.shape, lambda: "dout must have the shape of q")
    torch._check(lse.dtype == torch.float32, lambda: "lse must be float32")
    _check_devices(q, alibi_slopes=alibi_slopes, sinks=sinks)
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softmax_scale, causal,
     deterministic, window_left, window_right, softcap, alibi_slopes, attention_chunk, sinks) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.softmax_scale = _default_scale(softmax_scale, q.shape[-1])
    ctx.causal = causal
    ctx.deterministic = deterministic
    ctx.features = (window_left, window_right, softcap, attention_chunk)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks = ctx.saved_tensors
    window_left, window_right, softcap, attention_chunk = ctx.features
    grad_out = _grad_of_out(grad_out, out)
    dq, dk, dv, dsinks = torch.ops.flash_ext.attention_varlen_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, seqused_k, ctx.softmax_scale,
        ctx.causal, ctx.deterministic, window_left, window_right, softcap, alibi_slopes, attention_chunk, sinks)
    return (dq, dk, dv) + (None,) * 13 + (
        dsinks if sinks is not None and ctx.needs_input_grad[_VARLEN_SINKS_INDEX] else None,)


torch.library.register_autograd(
    "flash_ext::attention_varlen_forward", _varlen_backward, setup_context=_varlen_setup_context)


# ---- KV-cache attention (attention_with_kvcache: inference only, mutates k_cache / v_cache)
@torch.library.register_fake("flash_ext::attention_with_kvcache")
def _attention_with_kvcache_fake(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None,
                                 block_table=None, softmax_scale=None, causal=False, window_left=-1, window_right=-1,
                                 softcap=0.0, alibi_slopes=None, num_splits=0):
    torch._check(q.dim() == 4, lambda: f"q must be a 4-D tensor, got {q.dim()}-D")
    torch._check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
                 lambda: "k_cache and v_cache must be 4-D tensors of one shape")
    torch._check(k_cache.shape[3] == q.shape[3], lambda: "head_dim must match")
    torch._check((k is None) == (v is None), lambda: "k and v must be given together")
    _check_devices(q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                   cache_batch_idx=cache_batch_idx, block_table=block_table, alibi_slopes=alibi_slopes)
    batch, seqlen_q, nheads, head_dim = q.shape
    return q.new_empty((batch, seqlen_q, nheads, head_dim)), q.new_empty((batch, nheads, seqlen_q),
                                                                         dtype=torch.float32)


@torch.library.register_fake("flash_ext::dropout_mask")
def _dropout_mask_fake(dropout_rng, batch, nheads, seqlen_q, seqlen_k, dropout_p):
    return dropout_rng.new_empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.bool)
