"""Public Python API."""
from typing import Optional, Tuple

import torch

from .block_mask import BlockMask


def _window_bounds(window_size) -> Tuple[int, int]:
    """window_size as a pair of ints (left, right); the op itself rejects bounds below -1."""
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
        isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in window_size)
    if not ok:
        raise ValueError(f"flash_ext.attention: window_size must be a pair of ints (left, right), -1 meaning "
                         f"unbounded on that side; got {window_size!r}")
    return window_size[0], window_size[1]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
              softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              attn_bias: Optional[torch.Tensor] = None, attention_chunk: int = 0,
              sinks: Optional[torch.Tensor] = None, block_mask: Optional[BlockMask] = None, dropout_p: float = 0.0,
              generator: Optional[torch.Generator] = None, return_lse: bool = False, deterministic: bool = False):
    """Exact attention softmax(softmax_scale * q k^T [+ modifiers, masks]) v, computed IO-aware.

    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim) with
    nheads % nheads_k == 0 (MQA/GQA). softmax_scale defaults to 1/sqrt(head_dim). With i' = i + seqlen_k -
    seqlen_q (bottom-right alignment), query i sees key j when:
      causal: j <= i' (a right bound of 0; combines with a left bound);
      window_size=(left, right): i' - left <= j <= i' + right, -1 unbounded on that side;
      attention_chunk > 0: i' // attention_chunk == j // attention_chunk (floor division);
      attn_bias bool: attn_bias[b, h, i, j] is True.
    The score s = softmax_scale * q.k is modified in this order: softcap > 0 -> softcap * tanh(s / softcap);
    alibi_slopes ((nheads,) or (batch, nheads)) -> s - slope * |i' - j|; a float attn_bias -> s + attn_bias.
    attn_bias: broadcastable to (batch, nheads, seqlen_q, seqlen_k) (fewer dims get leading size-1 dims;
    broadcast dims are read in place), bool, float32 or q's dtype; a float bias that requires grad gets its
    gradient. sinks: (nheads,) logits added to each row's softmax denominator (nothing added to the output),
    differentiable. block_mask: a flash_ext.BlockMask built for (seqlen_q, seqlen_k): only its True blocks are
    computed (block-sparse attention), the masks above still apply inside them. A row that sees no key gets out
    0 and lse -inf (lse = sink with sinks).
    dropout_p in [0, 1): dropout on the softmax probabilities, kept ones scaled by 1 / (1 - dropout_p), as SDPA; the
    mask comes from a (seed, offset) pair drawn from torch's generator for q's device (or `generator`), so
    torch.manual_seed makes it reproducible, each call draws a new one, and a CUDA graph replay draws fresh ones;
    the backward regenerates the same mask (flash_ext.dropout_mask materializes it). Dense batches (not varlen).
    deterministic=True makes the backward bitwise reproducible (CUDA; the CPU path always is).
    Returns out (batch, seqlen_q, nheads, head_dim), and with return_lse also the float32
    log-sum-exp (batch, nheads, seqlen_q) (not differentiable).
    The CUDA kernels and the CPU path run every one of these features, forward and backward.
    """
    window_left, window_right = _window_bounds(window_size)
    if attn_bias is not None and attn_bias.dim() < 4:  # a view: autograd maps dbias back to the caller's shape
        attn_bias = attn_bias.view((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    args = (q, k, v, softmax_scale, causal, deterministic, window_left, window_right, softcap, alibi_slopes,
            attn_bias, attention_chunk, sinks)
    args += _block_args(block_mask, q, k) + _dropout_args(dropout_p, generator, q)
    if return_lse:
        return torch.ops.flash_ext.attention_forward(*args)
    return torch.ops.flash_ext.attention(*args)


def _dropout_args(dropout_p, generator, q):
    """The op arguments (dropout_p, dropout_rng): dropout_rng = (seed, offset) int64 drawn from
    torch's generator on q's device (no host synchronization)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"flash_ext.attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if generator is not None and generator.device.type != q.device.type:
        raise ValueError(f"flash_ext.attention: generator is on {generator.device}, q on {q.device}: the generator "
                         "must belong to q's device")
    if not dropout_p > 0:  # 0 (no dropout), or NaN / negative (the op rejects them)
        return (float(dropout_p), None)
    rng = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=q.device, generator=generator)
    return (float(dropout_p), rng)


def _block_args(block_mask, q, k):
    """The op arguments (block_kv, block_q, block_size) of a BlockMask (the defaults without one)."""
    if block_mask is None:
        return (None, None, 0)
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"flash_ext.attention: block_mask must be a flash_ext.BlockMask, got "
                        f"{type(block_mask).__name__}")
    if q.dim() == 4 and k.dim() == 4 and (block_mask.seqlen_q, block_mask.seqlen_k) != (q.shape[1], k.shape[1]):
        raise ValueError(f"flash_ext.attention: block_mask was built for seqlen_q = {block_mask.seqlen_q}, seqlen_k = "
                         f"{block_mask.seqlen_k}, but q has seqlen_q = {q.shape[1]} and k seqlen_k = {k.shape[1]}")
    return (block_mask.kv_lists, block_mask.q_lists, block_mask.block_size)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     seqused_k: Optional[torch.Tensor] = None, causal: bool = False,
                     softmax_scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, attention_chunk: int = 0,
                     sinks: Optional[torch.Tensor] = None, return_lse: bool = False, deterministic: bool = False):
    """Attention over a packed batch of sequences of different lengths (no padding), FlashAttention's varlen call.

    q: (total_q, nheads, head_dim), k, v: (total_k, nheads_k, head_dim) (any strides with a contiguous last dim).
    cu_seqlens_q / cu_seqlens_k: int32 (batch + 1,) on q's device; sequence b is the query rows
    cu_seqlens_q[b] : cu_seqlens_q[b + 1] against the key rows cu_seqlens_k[b] : cu_seqlens_k[b] + L_b, with
    L_b = seqused_k[b] when seqused_k (int32 (batch,)) is given (keys past it are ignored) and
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] otherwise. max_seqlen_q / max_seqlen_k: Python ints at least every
    sequence's length. Each sequence is attended exactly as `attention` would attend it alone (causal, window and
    ALiBi positions bottom-right aligned per sequence; alibi_slopes of (batch, nheads) give row b to sequence b);
    every feature of `attention` but attn_bias. Zero-length sequences are allowed.

    The values inside cu_seqlens / seqused_k are the caller's contract: non-decreasing offsets from 0 up to the
    totals, lengths <= max_seqlen, 0 <= seqused_k[b] <= that sequence's key rows. The CPU path checks them; on
    CUDA checking them would synchronize with the host, so they are not checked there (the kernels clamp every
    offset to the tensors). Rows of q outside every sequence get out 0 and lse -inf on every device, and the
    backward gives every row outside a sequence zero gradients.
    Returns out (total_q, nheads, head_dim), and with return_lse also lse (nheads, total_q) float32.
    Document masking: one packed sequence with cu_seqlens at the document boundaries is attention within documents.
    """
    window_left, window_right = _window_bounds(window_size)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softmax_scale, causal,
            deterministic, window_left, window_right, softcap, alibi_slopes, attention_chunk, sinks)
    if return_lse:
        return torch.ops.flash_ext.attention_varlen_forward(*args)
    return torch.ops.flash_ext.attention_varlen(*args)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None, *,
                           cache_seqlens=None, cache_batch_idx: Optional[torch.Tensor] = None,
                           block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                           causal: bool = False, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, num_splits: int = 0,
                           return_lse: bool = False):
    """Attention against a KV cache (decoding, speculative steps, chunked prefill), FlashAttention's kvcache call.

    q: (batch, seqlen_q, nheads, head_dim). The cache is contiguous, k_cache / v_cache (batch_cache, seqlen_cache,
    nheads_k, head_dim), or paged, (num_pages, page_size, nheads_k, head_dim) with block_table int32 (batch,
    max_pages): batch row b's position t lives in page block_table[b, t // page_size], slot t % page_size (any
    page size). cache_seqlens: int32 (batch,) or an int, the tokens already in each row's cache (None: the whole
    cache). k / v (batch, seqlen_new, nheads_k, head_dim), when given, are written into the caches in place at
    positions cache_seqlens[b] .. + seqlen_new and attended in the same call. Query row b attends the first
    cache_seqlens[b] + seqlen_new keys of its cache row; causal, window_size and ALiBi are aligned with the end
    of the updated cache (query i at position i + keys - seqlen_q), as attention's bottom-right alignment.
    cache_batch_idx int32 (batch,): the cache row of each batch row (contiguous caches; default b). num_splits: how
    many parts the key range is split into (0: chosen for the GPU; 1: none); the result does not depend on it.
    Cache slots past cache_seqlens may hold anything (NaN included): they are never read into the result.

    The values of cache_seqlens / cache_batch_idx / block_table are the caller's contract (the new tokens fit the
    cache, indices name existing rows / pages): the CPU path checks them; on CUDA checking would synchronize, and
    out-of-range values give wrong results, never an out-of-bounds access. Inference only: inputs that require grad
    (with grad mode on) raise. Returns out (batch, seqlen_q, nheads, head_dim), and with return_lse also lse
    (batch, nheads, seqlen_q) float32. No host synchronization, no value-dependent allocation: CUDA-graph safe.
    """
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"flash_ext.attention_with_kvcache is inference only: {name} requires grad; "
                                   "call it under torch.no_grad() / torch.inference_mode(), or detach the inputs")
    window_left, window_right = _window_bounds(window_size)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    out, lse = torch.ops.flash_ext.attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale, causal, window_left,
        window_right, softcap, alibi_slopes, num_splits)
    return (out, lse) if return_lse else out


def dropout_mask(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, seed: int, offset: int,
                 device=None) -> torch.Tensor:
    """The keep mask (batch, nheads, seqlen_q, seqlen_k) bool that attention with dropout_p and the dropout_rng (seed,
    offset) applies (docs/ARCHITECTURE.md, "Dropout"), on `device`: a testing hook for small shapes (computed on
    the CPU and copied)."""
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    return torch.ops.flash_ext.dropout_mask(rng, batch, nheads, seqlen_q, seqlen_k, dropout_p)


def unpad_input(x: torch.Tensor, attention_mask: torch.Tensor):
    """A padded batch as the packed rows attention_varlen takes.

    x: (batch, seqlen, ...); attention_mask: (batch, seqlen), nonzero / True at real tokens (anywhere in the row:
    left or right padding). Returns (x_unpad, indices, cu_seqlens, max_seqlen): x_unpad (total, ...) the real
    tokens in row-major order (differentiable), indices (total,) int64 into x.flatten(0, 1), cu_seqlens int32
    (batch + 1,), max_seqlen a Python int (reading it, and the count of real tokens, synchronizes with the device).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"flash_ext.unpad_input: attention_mask must have shape (batch, seqlen) = "
                         f"{tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() > 0 else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1).index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad_input(x_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad_input: (total, ...) rows back to (batch, seqlen, ...), zeros at padding (differentiable)."""
    out = x_unpad.new_zeros((batch * seqlen,) + tuple(x_unpad.shape[1:]))
    return out.index_copy(0, indices, x_unpad).view((batch, seqlen) + tuple(x_unpad.shape[1:]))


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on (batch, nheads, seqlen, head_dim).

    attn_mask (bool: True = may attend; or float, added to the scores) broadcastable to
    (batch, nheads, seqlen_q, seqlen_k) is passed on as attn_bias. is_causal is aligned top-left as in SDPA
    (query i sees keys j <= i, also when seqlen_q != seqlen_k). attn_mask together with is_causal raises, as
    SDPA's documentation and its math backend do. dropout_p as `attention`'s.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"flash_ext.sdpa: {name} must be a 4-D tensor (batch, nheads, seqlen, head_dim), "
                             f"got {t.dim()}-D")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"flash_ext.sdpa: key has {key.shape[1]} heads and query {query.shape[1]}; "
                         "pass enable_gqa=True for grouped-query attention")
    if is_causal and attn_mask is not None:
        raise RuntimeError("flash_ext.sdpa: attn_mask must not be set when is_causal=True (as in "
                           "torch.nn.functional.scaled_dot_product_attention); fold the causal mask into attn_mask")
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    causal, window_size, bias = False, (-1, -1), attn_mask
    if is_causal:
        # Top-left: query i sees keys j <= i. With i' = i + seqlen_k - seqlen_q that is j <= i' + (seqlen_q -
        # seqlen_k): a window's right bound where it is >= 0, else (seqlen_q < seqlen_k) a bool mask.
        if seqlen_q == seqlen_k:
            causal = True
        elif seqlen_q > seqlen_k:
            window_size = (-1, seqlen_q - seqlen_k)
        else:
            bias = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=query.device).tril_().view(
                1, 1, seqlen_q, seqlen_k)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return attention(q, k, v, causal=causal, softmax_scale=scale, window_size=window_size, attn_bias=bias,
                     dropout_p=dropout_p).transpose(1, 2)
