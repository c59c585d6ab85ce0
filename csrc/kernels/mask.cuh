// Mask policies: which keys a query row may see, and which key blocks of a query block need masking.
// Kernels ask the policy for the range of key blocks to visit and for the blocks that need per-element
// masking, so the main loop runs the unmasked blocks without any per-element test.
// Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.
#pragma once

namespace flash_ext {

template <bool IsCausal>
struct Mask {
  int seqlen_q, seqlen_k;

  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_) : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {}

  // One past the last key that query row `row` may see (may be <= 0: the row sees nothing).
  __device__ __forceinline__ int col_limit(int row) const {
    if constexpr (IsCausal) {
      const int lim = row + 1 + seqlen_k - seqlen_q;
      return lim < seqlen_k ? lim : seqlen_k;
    } else {
      return seqlen_k;
    }
  }
  __device__ __forceinline__ bool visible(int row, int col) const { return col < col_limit(row); }

  // Key blocks [0, n_block_max) hold every key that rows [m_block*kBlockM, +kBlockM) may see.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_max(int m_block) const {
    int lim = seqlen_k;
    if constexpr (IsCausal) {
      const int last_row = (m_block + 1) * kBlockM - 1;
      const int c = last_row + 1 + seqlen_k - seqlen_q;
      lim = c < lim ? c : lim;
    }
    return lim <= 0 ? 0 : (lim + kBlockN - 1) / kBlockN;
  }
  // Key blocks [n_block_unmasked_end, n_block_max) need per-element masking (the tail block of
  // seqlen_k and, for causal, every block the diagonal crosses); blocks below it need none.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_unmasked_end(int m_block) const {
    int lim = seqlen_k;  // keys < lim are visible to every row of the block
    if constexpr (IsCausal) {
      const int first_row = m_block * kBlockM;
      const int c = first_row + 1 + seqlen_k - seqlen_q;
      lim = c < lim ? c : lim;
    }
    return lim <= 0 ? 0 : lim / kBlockN;
  }

  // Query blocks [m_block_min, ...) may see key block n_block (for the backward, which loops over
  // query blocks for a fixed key block). Rows below it see none of the block's keys.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int m_block_min(int n_block) const {
    if constexpr (IsCausal) {
      // first row that sees key n_block*kBlockN: row >= col - seqlen_k + seqlen_q
      const int row = n_block * kBlockN - seqlen_k + seqlen_q;
      return row <= 0 ? 0 : row / kBlockM;
    } else {
      return 0;
    }
  }
};

}  // namespace flash_ext
