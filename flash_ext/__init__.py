"""flash_ext: exact, IO-aware attention (FlashAttention) as PyTorch custom ops.

    import flash_ext
    out = flash_ext.attention(q, k, v, causal=True)          # (batch, seqlen, nheads, head_dim)
    out = flash_ext.sdpa(q, k, v, is_causal=True)            # (batch, nheads, seqlen, head_dim)
    out = torch.ops.flash_ext.attention(q, k, v, causal=True)
"""
import torch

from . import _C  # noqa: F401  (loads the library: registers the op schemas and kernels)
from . import ops  # noqa: F401  (registers fake kernels and autograd)
from .block_mask import BlockMask
from .interface import (attention, attention_varlen, attention_with_kvcache, dropout_mask, pad_input, sdpa,
                        unpad_input)

__version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether this build of flash_ext contains the CUDA kernels."""
    return bool(_C.with_cuda)


__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "BlockMask", "dropout_mask", "unpad_input", "pad_input", "sdpa", "cuda_built", "__version__"]
