// Mask policies: which keys a query row may see, which key blocks a query block visits (and which of
// them need per-element masking), and the same from a key block's side for the backward. Every kernel
// (sm80 and sm90, forward and backward) asks the policy; none derives a block range or a per-element
// test of its own. Loops run from the lower bound to the upper one, so a policy with a left bound (a
// sliding window) changes no kernel. Unmasked blocks need no per-element work; kernels run them apart
// from the masked ones.
//
// Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q. Every policy
// also hides the keys >= seqlen_k (the tail of the last key block). docs/ARCHITECTURE.md says how a new
// policy plugs in.
#pragma once

namespace flash_ext {

template <bool IsCausal>
struct Mask {
  // Whether a row can have invisible keys on its left (a window's lower bound): when false, the
  // per-element test is the right bound alone and every block range starts at block 0.
  static constexpr bool kHasLeftBound = false;

  int seqlen_q, seqlen_k;

  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_) : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {}

  // ---- per element ----
  // One past the last key that query row `row` may see (may be <= 0: the row sees nothing).
  __device__ __forceinline__ int col_limit(int row) const {
    if constexpr (IsCausal) {
      const int lim = row + 1 + seqlen_k - seqlen_q;
      return lim < seqlen_k ? lim : seqlen_k;
    } else {
      return seqlen_k;
    }
  }
  // The first key that query row `row` may see.
  __device__ __forceinline__ int col_min(int /*row*/) const { return 0; }
  // The per-element test given the row's bounds (col_min, col_limit) computed once per row; with no
  // left bound the lower one is never compared, so it costs nothing.
  __device__ __forceinline__ static bool visible_in(int col, int lo, int hi) {
    if constexpr (kHasLeftBound) return col >= lo && col < hi;
    else { (void)lo; return col < hi; }
  }
  __device__ __forceinline__ bool visible(int row, int col) const {
    return visible_in(col, col_min(row), col_limit(row));
  }
  // Sets `s` to -inf (or `masked_value`) where (row, col) is not visible: the per-element mask.
  __device__ __forceinline__ void apply(float& s, int col, int lo, int hi, float masked_value) const {
    if (!visible_in(col, lo, hi)) s = masked_value;
  }

  // ---- a query block's key blocks (forward, and the dQ side of the backward) ----
  // Key blocks [n_block_min, n_block_max) hold every key that rows [m_block*kBlockM, +kBlockM) may see.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_min(int /*m_block*/) const { return 0; }
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
  // Key blocks [n_block_min, n_block_unmasked_begin) need per-element masking on their left (a
  // window's lower bound); with no left bound there are none.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_unmasked_begin(int m_block) const {
    return n_block_min<kBlockM, kBlockN>(m_block);
  }

  // ---- a key block's query blocks (the dK / dV side of the backward) ----
  // Query blocks [m_block_min, m_block_max) may see key block n_block; rows outside see none of its keys.
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
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int m_block_max(int /*n_block*/) const {
    return (seqlen_q + kBlockM - 1) / kBlockM;
  }
};

}  // namespace flash_ext
