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
//
// Mask<IsCausal, true> is the local policy (a sliding window and/or chunks, with both bounds at run time);
// Mask<IsCausal> (IsLocal = false) is the plain or causal one, whose code the local policy leaves untouched.
#pragma once

#include "params.h"

namespace flash_ext {

template <bool IsCausal, bool IsLocal = false>
struct Mask {
  // Whether a row can have invisible keys on its left (a window's lower bound): when false, the
  // per-element test is the right bound alone and every block range starts at block 0.
  static constexpr bool kHasLeftBound = false;

  int seqlen_q, seqlen_k;

  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_) : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {}
  // The constructor every kernel calls: this policy reads nothing of the window fields.
  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_, const FwdParams& /*p*/) : Mask(seqlen_q_, seqlen_k_) {}

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
  // Whether the (query block m_block, key block n_block) tile needs the per-element test.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ bool block_needs_mask(int m_block, int n_block) const {
    return n_block >= n_block_unmasked_end<kBlockM, kBlockN>(m_block) ||
           n_block < n_block_unmasked_begin<kBlockM, kBlockN>(m_block);
  }
};

// floor(a / c) for c > 0 and any a (C++ division truncates toward zero).
__device__ __forceinline__ int floor_div(int a, int c) { return a >= 0 ? a / c : (a - c + 1) / c; }

// The local policy. With i' = row + seqlen_k - seqlen_q (bottom-right alignment, as causal), row `row` sees
// the keys [col_min(row), col_limit(row)):
//   col_min   = max(i' - left, chunk_start(i'), 0)
//   col_limit = min(i' + right + 1, chunk_start(i') + chunk, seqlen_k)
// where chunk_start(x) = floor(x / chunk) * chunk and the chunk terms drop out when chunk == 0. The host
// (csrc/cuda/attention_api.cu) folds causal into right = 0 and an unbounded side (-1) into a bound no row
// reaches (seqlen_q + seqlen_k), so one policy serves window, window + causal, chunk and chunk + causal.
// Both bounds are nondecreasing in the row, so the two sides' block ranges agree: n is in
// [n_block_min(m), n_block_max(m)) iff m is in [m_block_min(n), m_block_max(n)) (both say col_min(first row
// of m) <= last key of n and col_limit(last row of m) > first key of n); the sm90 deterministic backward
// counts a query block's dQ contributors from one side and the key blocks visit it from the other. An
// empty range comes back as max == min, never max < min.
template <bool IsCausal>
struct Mask<IsCausal, true> {
  static constexpr bool kHasLeftBound = true;

  int seqlen_q, seqlen_k;
  int left, right, chunk;

  __device__ __forceinline__ Mask(int seqlen_q_, int seqlen_k_, const FwdParams& p)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), left(p.window_left), right(p.window_right), chunk(p.attention_chunk) {}

  // ---- per element ----
  __device__ __forceinline__ int col_min(int row) const {
    const int ip = row + seqlen_k - seqlen_q;
    int lo = ip - left;
    if (chunk > 0) { const int cs = floor_div(ip, chunk) * chunk; lo = lo > cs ? lo : cs; }
    return lo > 0 ? lo : 0;
  }
  __device__ __forceinline__ int col_limit(int row) const {
    const int ip = row + seqlen_k - seqlen_q;
    int hi = ip + right + 1;
    if (chunk > 0) { const int ce = floor_div(ip, chunk) * chunk + chunk; hi = hi < ce ? hi : ce; }
    hi = hi < seqlen_k ? hi : seqlen_k;
    return hi > 0 ? hi : 0;
  }
  __device__ __forceinline__ static bool visible_in(int col, int lo, int hi) { return col >= lo && col < hi; }
  __device__ __forceinline__ bool visible(int row, int col) const { return visible_in(col, col_min(row), col_limit(row)); }
  __device__ __forceinline__ void apply(float& s, int col, int lo, int hi, float masked_value) const {
    if (!visible_in(col, lo, hi)) s = masked_value;
  }

  // ---- a query block's key blocks ----
  // Rows past seqlen_q (the tail of the last query block) are left out of the upper bound; their results are
  // never stored.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_min(int m_block) const { return col_min(m_block * kBlockM) / kBlockN; }
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_max(int m_block) const {
    const int last = (m_block + 1) * kBlockM - 1;
    const int hi = col_limit(last < seqlen_q ? last : seqlen_q - 1);
    const int n_max = (hi + kBlockN - 1) / kBlockN, n_min = n_block_min<kBlockM, kBlockN>(m_block);
    return n_max > n_min ? n_max : n_min;
  }
  // Keys [col_min(last row), col_limit(first row)) are visible to every row of the block.
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_unmasked_end(int m_block) const {
    return col_limit(m_block * kBlockM) / kBlockN;
  }
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int n_block_unmasked_begin(int m_block) const {
    return (col_min((m_block + 1) * kBlockM - 1) + kBlockN - 1) / kBlockN;
  }

  // ---- a key block's query blocks ----
  // The first row whose col_limit exceeds the block's first key, and the last row whose col_min is at most its
  // last key (both bounds are nondecreasing in the row).
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int m_block_min(int n_block) const {
    const int c0 = n_block * kBlockN;
    int ip = c0 - right;
    if (chunk > 0) { const int cs = floor_div(c0, chunk) * chunk; ip = ip > cs ? ip : cs; }
    const int row = ip - (seqlen_k - seqlen_q);
    return row <= 0 ? 0 : row / kBlockM;
  }
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ int m_block_max(int n_block) const {
    int c1 = (n_block + 1) * kBlockN - 1;
    c1 = c1 < seqlen_k ? c1 : seqlen_k - 1;
    int ip = c1 + left;
    if (chunk > 0) { const int ce = floor_div(c1, chunk) * chunk + chunk - 1; ip = ip < ce ? ip : ce; }
    int row = ip - (seqlen_k - seqlen_q);
    row = row < seqlen_q - 1 ? row : seqlen_q - 1;
    const int m_max = row < 0 ? 0 : row / kBlockM + 1, m_min = m_block_min<kBlockM, kBlockN>(n_block);
    return m_max > m_min ? m_max : m_min;
  }
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ bool block_needs_mask(int m_block, int n_block) const {
    return n_block >= n_block_unmasked_end<kBlockM, kBlockN>(m_block) ||
           n_block < n_block_unmasked_begin<kBlockM, kBlockN>(m_block);
  }
};

}  // namespace flash_ext
