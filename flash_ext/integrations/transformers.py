"""flash_ext as a HuggingFace transformers attention backend: `attn_implementation="flash_ext"`.

    import flash_ext.integrations.transformers  # registers "flash_ext" (or call register())
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flash_ext")

transformers is an optional dependency: `import flash_ext` never imports it. The backend takes the masks that
transformers builds for its "sdpa" backend (a bool (batch, 1, q_len, kv_len) mask, or None where the pattern is
plain causal or full) and runs `flash_ext.attention` in transformers' (batch, heads, seq, head_dim) layout without
repeating K / V for grouped-query attention: None with a causal module gives `causal=True`; a mask (padding,
sliding windows, chunks, packed sequences, bidirectional encoders) goes in as `attn_bias`; the model's softcap
(Gemma 2), attention sinks (gpt-oss's `s_aux`), attention dropout in training and T5-style position biases are
passed on. Generation with the model's KV cache works as with "sdpa" (the cache's keys arrive as `key` / `value`).
"""
from typing import Optional

import torch

import flash_ext

NAME = "flash_ext"


def flash_ext_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None,
                                position_bias: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function signature: query (batch, heads, q_len, head_dim), key / value (batch,
    kv_heads, kv_len, head_dim); returns (attn_output (batch, q_len, heads, head_dim), None)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    # As the "sdpa" backend decides it: causal only without a mask, past the first decoding step.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if causal and kv_len > q_len:
        # An empty static cache's prefill: transformers' causal is top-left, so the keys past q_len are unused.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    bias = attention_mask
    if bias is not None and bias.dtype != torch.bool and not bias.is_floating_point():
        bias = bias.bool()
    if position_bias is not None:  # a float bias: the mask's hidden keys become -inf in it
        pb = position_bias.to(torch.float32) if position_bias.dtype != query.dtype else position_bias
        if bias is None:
            bias = pb
        elif bias.dtype == torch.bool:
            bias = pb.masked_fill(~bias, float("-inf"))
        else:
            bias = pb + bias.to(pb.dtype)
    elif bias is not None and bias.is_floating_point() and bias.dtype not in (torch.float32, query.dtype):
        bias = bias.to(torch.float32)
    sinks = None
    if s_aux is not None:
        sinks = s_aux if s_aux.dtype in (torch.float32, query.dtype) else s_aux.float()
    out = flash_ext.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                              softmax_scale=scaling, softcap=float(softcap) if softcap else 0.0, attn_bias=bias,
                              sinks=sinks, dropout_p=float(dropout) if dropout else 0.0)
    return out.contiguous(), None


# FlashAttention-compatible entry points (flash_attn's names and keyword arguments) over flash_ext, (batch, seq, heads,
# head_dim) layout. transformers takes any implementation whose name contains "flash" for a FlashAttention build and
# preloads these three functions for it (modeling_flash_attention_utils); register() hands it these for "flash_ext",
# and code of transformers that calls them directly (continuous batching) runs flash_ext.
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None):
    out, lse = flash_ext.attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                   window_size=tuple(window_size), softcap=softcap, alibi_slopes=alibi_slopes,
                                   sinks=s_aux, deterministic=deterministic, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, s_aux=None):
    if dropout_p:
        raise NotImplementedError("flash_ext: dropout in attention_varlen is not implemented yet (docs/ARCHITECTURE.md, "
                                  "\"Dropout\")")
    out, lse = flash_ext.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                          softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                                          softcap=softcap, alibi_slopes=alibi_slopes, sinks=s_aux,
                                          deterministic=deterministic, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    if rotary_cos is not None or rotary_sin is not None or cache_leftpad is not None:
        raise NotImplementedError("flash_ext.attention_with_kvcache applies no rotary embedding and takes no "
                                  "cache_leftpad: apply them before the call")
    res = flash_ext.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                           cache_batch_idx=cache_batch_idx, block_table=block_table,
                                           softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                                           softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits,
                                           return_lse=return_softmax_lse)
    return res


def _hand_flash_functions_to_transformers():
    """Makes transformers' FlashAttention preload return flash_ext's functions for "flash_ext" (it would otherwise
    look for a hub kernel of that name); every other implementation loads as before."""
    try:
        import transformers.modeling_flash_attention_utils as fa_utils
    except ImportError:
        return
    loader = getattr(fa_utils, "_lazy_imports", None)
    if loader is None or getattr(loader, "_flash_ext", False):
        return

    def _lazy_imports(implementation, *args, **kwargs):
        if implementation == NAME:
            return (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, fa_utils._pad_input,
                    fa_utils._unpad_input)
        return loader(implementation, *args, **kwargs)

    _lazy_imports._flash_ext = True
    fa_utils._lazy_imports = _lazy_imports


def register() -> None:
    """Registers `attn_implementation="flash_ext"` with transformers' AttentionInterface (and its masks with
    AttentionMaskInterface: the ones the "sdpa" backend uses). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, flash_ext_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _hand_flash_functions_to_transformers()


register()
