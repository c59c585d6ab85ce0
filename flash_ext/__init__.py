"""flash_ext: exact, IO-aware attention (FlashAttention) as PyTorch custom ops.

    import flash_ext
    out = flash_ext.attention(q, k, v, causal=True)          # (batch, seqlen, nheads, head_dim)
    out = flash_ext.sdpa(q, k, v, is_causal=True)            # (batch, nheads, seqlen, head_dim)
    out = torch.ops.flash_ext.attention(q, k, v, causal=True)
"""
import torch


def _check_build():
    """Loads the compiled extension, or raises one clear ImportError when it was built against another torch (or
    cannot be loaded): what it was built against, what is installed, how to rebuild."""
    import importlib

    try:
        info = importlib.import_module("flash_ext._build_info")
        built = f"torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA or 'none'})"
    except ImportError:
        info, built = None, "an unknown torch (flash_ext/_build_info.py is missing: built by an older setup.py?)"
    here = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    rebuild = ("Rebuild flash_ext against the installed torch: `pip install --no-build-isolation --force-reinstall "
               "--no-deps .` in its source folder (or `FLASH_EXT_REBUILD=1 bash tools/install.sh`); README, "
               "\"Troubleshooting\".")
    if info is not None and (info.TORCH_VERSION != torch.__version__ or info.TORCH_CUDA != torch.version.cuda):
        raise ImportError(f"flash_ext was built against {built}, but this is {here}: its compiled extension does not "
                          f"match. {rebuild}")
    try:
        return importlib.import_module("flash_ext._C")
    except ImportError as e:
        raise ImportError(f"flash_ext's compiled extension (flash_ext._C) could not be loaded: {e}. It was built "
                          f"against {built}; this is {here}. {rebuild}") from e


_C = _check_build()  # loads the library: registers the op schemas and kernels
from . import ops  # noqa: E402,F401  (registers fake kernels and autograd)
from .block_mask import BlockMask
from .interface import (attention, attention_varlen, attention_with_kvcache, dropout_mask, pad_input, sdpa,
                        unpad_input)

try:
    from ._build_info import VERSION as __version__
except ImportError:
    __version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether this build of flash_ext contains the CUDA kernels."""
    return bool(_C.with_cuda)


__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "BlockMask", "dropout_mask", "unpad_input",
           "pad_input", "sdpa", "cuda_built", "__version__"]
