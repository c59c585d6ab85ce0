"""flash_ext.BlockMask: which (query block, key block) tiles block-sparse attention computes.

Built once per pattern (and reused across layers and steps), on the device of its mask, without a host
synchronization: it holds, for each query block, the ascending list of the key blocks it computes (the forward's and
dQ's walk) and, for each key block, the list of query blocks (dK / dV's walk), as docs/ARCHITECTURE.md
("Block-sparse attention") describes. Pass it as `flash_ext.attention(..., block_mask=bm)`; inside a computed block
the element masks (causal, window, chunks, a bool attn_bias) and the score modifiers still apply.
"""
from typing import Callable, Optional

import torch

BLOCK_SIZES = (64, 128)  # the block sizes the kernels take (csrc/attention_checks.h, kBlockSparseSizes)


def _lists(mask: torch.Tensor) -> torch.Tensor:
    """(..., rows, cols) bool -> (..., rows, cols + 1) int32: per row the count of True, then their column
    indices in ascending order (the rest of the row: the other columns, unused)."""
    count = mask.sum(-1, dtype=torch.int32).unsqueeze(-1)
    # A stable descending sort of 0/1 puts the True columns first, each group in ascending column order.
    order = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return torch.cat([count, order], dim=-1).contiguous()


class BlockMask:
    """A block mask for `flash_ext.attention(..., block_mask=...)`: True blocks are computed, the others skipped.

    Build it with `BlockMask.from_dense` or `BlockMask.from_fn`. Its batch and head dims are 1 (shared by every
    batch entry / head) or the call's batch / nheads (query heads). Attributes: seqlen_q, seqlen_k, block_size,
    shape (Bm, Hm, n_qb, n_kb) with n_qb = ceil(seqlen_q / block_size), n_kb = ceil(seqlen_k / block_size),
    kv_lists (Bm, Hm, n_qb, n_kb + 1) and q_lists (Bm, Hm, n_kb, n_qb + 1), int32: count, then block indices.
    A query row whose blocks are all skipped gets out 0, lse -inf (its sink with sinks) and zero gradients.
    """

    def __init__(self, kv_lists: torch.Tensor, q_lists: torch.Tensor, seqlen_q: int, seqlen_k: int,
                 block_size: int):
        self.kv_lists, self.q_lists = kv_lists, q_lists
        self.seqlen_q, self.seqlen_k, self.block_size = seqlen_q, seqlen_k, block_size

    @staticmethod
    def _check_sizes(seqlen_q, seqlen_k, block_size, who):
        for name, val in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"flash_ext.BlockMask.{who}: {name} must be an int >= 0, got {val!r}")
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"flash_ext.BlockMask.{who}: block_size must be one of {BLOCK_SIZES} (the block sizes "
                             f"the kernels take), got {block_size!r}")
        return -(-seqlen_q // block_size), -(-seqlen_k // block_size)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: int = 128) -> "BlockMask":
        """mask: bool, broadcastable to (batch, nheads, ceil(seqlen_q / block_size), ceil(seqlen_k / block_size))
        (fewer dims get leading size-1 dims), True = the block is computed. Its batch and head dims stay as given
        (size 1: shared); the block dims are expanded."""
        n_qb, n_kb = cls._check_sizes(seqlen_q, seqlen_k, block_size, "from_dense")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"flash_ext.BlockMask.from_dense: mask must be a bool tensor (True = compute the "
                            f"block), got {got}")
        if mask.dim() > 4 or any(mask.shape[d] not in (1, n) for d, n in ((-2, n_qb), (-1, n_kb))
                                 if mask.dim() >= -d):
            raise ValueError(f"flash_ext.BlockMask.from_dense: mask of shape {tuple(mask.shape)} does not broadcast "
                             f"to (batch, nheads, {n_qb}, {n_kb}), the block grid of seqlen_q = {seqlen_q}, "
                             f"seqlen_k = {seqlen_k} in blocks of {block_size}")
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mask = mask.expand(mask.shape[0], mask.shape[1], n_qb, n_kb)
        return cls(_lists(mask), _lists(mask.transpose(2, 3)), seqlen_q, seqlen_k, block_size)

    @classmethod
    def from_fn(cls, fn: Callable, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, block_size: int = 128,
                device: Optional[torch.device] = None) -> "BlockMask":
        """fn(b, h, q_block, k_block) -> bool tensor, evaluated on broadcast int64 index tensors of shapes (B, 1, 1,
        1), (1, H, 1, 1), (1, 1, n_qb, 1), (1, 1, 1, n_kb) (a vectorized predicate on block coordinates; it may
        ignore any of them). batch / nheads of 1 make a mask shared by every batch entry / head."""
        n_qb, n_kb = cls._check_sizes(seqlen_q, seqlen_k, block_size, "from_fn")
        idx = [torch.arange(n, device=device).view([n if i == d else 1 for i in range(4)])
               for d, n in enumerate((batch, nheads, n_qb, n_kb))]
        mask = fn(*idx)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"flash_ext.BlockMask.from_fn: fn must return a bool tensor, got {type(mask).__name__}")
        return cls.from_dense(mask, seqlen_q, seqlen_k, block_size)  # dims fn ignores stay shared (size 1)

    @property
    def shape(self):
        return tuple(self.kv_lists.shape[:3]) + (self.kv_lists.shape[3] - 1,)

    @property
    def device(self):
        return self.kv_lists.device

    def to(self, device) -> "BlockMask":
        return BlockMask(self.kv_lists.to(device), self.q_lists.to(device), self.seqlen_q, self.seqlen_k,
                         self.block_size)

    def to_dense(self) -> torch.Tensor:
        """The block mask (Bm, Hm, n_qb, n_kb) bool back from the lists."""
        n_kb = self.shape[3]
        count = self.kv_lists[..., :1]
        used = torch.arange(n_kb, device=self.device) < count
        idx = torch.where(used, self.kv_lists[..., 1:], 0).long()
        return torch.zeros(self.shape, dtype=torch.int32, device=self.device).scatter_add_(
            3, idx, used.to(torch.int32)) > 0

    def to_elements(self) -> torch.Tensor:
        """The element mask (Bm, Hm, seqlen_q, seqlen_k) bool (what the kernels compute; for tests and small
        shapes: it materializes seqlen_q x seqlen_k per (batch, head) of the mask)."""
        rows = torch.arange(self.seqlen_q, device=self.device) // self.block_size
        cols = torch.arange(self.seqlen_k, device=self.device) // self.block_size
        return self.to_dense().index_select(2, rows).index_select(3, cols)

    def density(self) -> float:
        """The fraction of blocks computed (reads one number from the device)."""
        n = self.kv_lists[..., 0].numel() * self.shape[3]
        return float(self.kv_lists[..., 0].sum().item()) / n if n else 0.0

    def __repr__(self):
        return (f"BlockMask(shape={self.shape}, seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
                f"block_size={self.block_size}, device={self.device})")
