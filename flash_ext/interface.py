"""Public Python API."""
from typing import Optional

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, return_lse: bool = False,
              deterministic: bool = False):
    """Exact attention softmax(softmax_scale * q k^T [+ causal mask]) v, computed IO-aware.

    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim) with
    nheads % nheads_k == 0 (MQA/GQA). Only the last dimension must be contiguous. Causal with
    seqlen_q != seqlen_k is aligned bottom-right. softmax_scale defaults to 1/sqrt(head_dim).
    deterministic=True makes the backward bitwise reproducible (CUDA; the CPU path always is).
    Returns out (batch, seqlen_q, nheads, head_dim), and with return_lse also the float32
    log-sum-exp (batch, nheads, seqlen_q) (not differentiable).
    """
    if return_lse:
        return torch.ops.flash_ext.attention_forward(q, k, v, softmax_scale, causal, deterministic)
    return torch.ops.flash_ext.attention(q, k, v, softmax_scale, causal, deterministic)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on (batch, nheads, seqlen, head_dim).

    attn_mask and dropout are not supported yet and raise. SDPA's is_causal is aligned top-left
    (query i sees keys j <= i); flash_ext.attention's causal is aligned bottom-right. The two agree
    when seqlen_q == seqlen_k; for is_causal with seqlen_q != seqlen_k this function raises rather
    than silently change the meaning.
    """
    if attn_mask is not None:
        raise NotImplementedError("flash_ext.sdpa: attn_mask is not supported yet (pass is_causal instead)")
    if dropout_p != 0.0:
        raise NotImplementedError(f"flash_ext.sdpa: dropout_p must be 0.0, got {dropout_p}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"flash_ext.sdpa: {name} must be a 4-D tensor (batch, nheads, seqlen, head_dim), "
                             f"got {t.dim()}-D")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"flash_ext.sdpa: key has {key.shape[1]} heads and query {query.shape[1]}; "
                         "pass enable_gqa=True for grouped-query attention")
    if is_causal and query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"flash_ext.sdpa: is_causal with seqlen_q ({query.shape[2]}) != seqlen_k ({key.shape[2]}) is "
            "top-left aligned in SDPA and not supported; flash_ext.attention(causal=True) aligns bottom-right")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return attention(q, k, v, causal=is_causal, softmax_scale=scale).transpose(1, 2)
