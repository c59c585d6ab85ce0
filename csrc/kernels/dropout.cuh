// Attention dropout in the CUDA kernels (docs/ARCHITECTURE.md, "Dropout"): the keep bits of csrc/kernels/dropout.h
// (the same Philox4x32-10 and element-to-counter mapping as the CPU path) for the accumulator fragments the kernels
// hold, in the two layouts they come in:
//   - row-major ("quad"): S = Q K^T as an mma / wgmma accumulator, a thread's 2 x 2 elements (rows i, i + 8) x
//     (keys j, j + 1) of each 8-key tile, i = 16 I + r (r < 8), j even: exactly the elements of one Philox call
//     (the forward kernels, the sm80 backward's S-major kernels);
//   - transposed ("oct"): S^T = K Q^T (the key-major backward kernels: sm90's, sm80's fallback dK / dV kernel),
//     a thread's elements (keys k, k + 8) x (queries q, q + 1) of each 8-query tile. There one call covers a query
//     pair (i, i + 8) and a key pair (j, j + 1) that two lanes share (lane ^ 4 holds the other key of the pair): each
//     lane of the pair computes the calls of one query of the pair and hands the other lane its words' bits with one
//     shuffle, so the transposed layout costs as many Philox calls per element as the row-major one.
// Where a probability is dropped: P -> 0 in O += P V (the forward's row sums and lse are those of P before dropout,
// and O is scaled by 1 / (1 - p) at the end); the backward's dP -> dP o Z / (1 - p) and the P of dV += P^T dO ->
// P o Z / (1 - p) (Z the keep mask), and dS = P o (dP - D) with D = rowsum(dO o O) as without dropout.
#pragma once
#include <cstdint>

#include "dropout.h"
#include "params.h"

namespace flash_ext {

struct DropoutDev {
  uint32_t seed_lo, seed_hi, off_lo, off_hi;
  uint32_t threshold;    // floor(p 2^32): kept iff the word >= threshold
  uint32_t col_pairs;    // ceil(seqlen_k / 2)
  uint32_t rows_per_slice;  // 8 ceil(seqlen_q / 16)
  uint64_t slice_row0;   // (b nheads + h) rows_per_slice: the first counter row of this (batch, head)
  float scale;           // 1 / (1 - p)

  // (b, h): the batch entry and the query head. Reads (seed, offset) from params.dropout_rng (non-null).
  __device__ __forceinline__ DropoutDev(const FwdParams& p, int b, int h) {
    const uint64_t seed = static_cast<uint64_t>(__ldg(p.dropout_rng));
    const uint64_t off = static_cast<uint64_t>(__ldg(p.dropout_rng + 1));
    seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
    off_lo = static_cast<uint32_t>(off), off_hi = static_cast<uint32_t>(off >> 32);
    threshold = p.dropout_threshold;
    col_pairs = static_cast<uint32_t>((p.seqlen_k + 1) / 2);
    rows_per_slice = static_cast<uint32_t>(8 * ((p.seqlen_q + 15) / 16));
    scale = p.dropout_scale;
    set_head(p, b, h);
  }
  // Another query head of the same batch entry (the key-side backward kernels visit a GQA group's heads in turn).
  __device__ __forceinline__ void set_head(const FwdParams& p, int b, int h) {
    slice_row0 = (static_cast<uint64_t>(b) * static_cast<uint64_t>(p.nheads) + static_cast<uint64_t>(h)) * rows_per_slice;
  }

  // The four words of the call for counter row 8 I + r and key pair J (dropout.h, DropoutRng::words).
  __device__ __forceinline__ Philox4 words(uint32_t row8, uint32_t pair) const {
    const uint64_t n = (slice_row0 + row8) * static_cast<uint64_t>(col_pairs) + pair;
    const Philox4 c{{static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), off_lo, off_hi}};
    return philox4x32_10(c, seed_lo, seed_hi);
  }
  __device__ __forceinline__ uint32_t kept(uint32_t word) const { return word >= threshold ? 1u : 0u; }

  // Row-major: the keep bits (bit 2 u + v: row row + 8 u, key col + v) of the quad whose first element is
  // (row, col), row % 16 < 8, col even.
  __device__ __forceinline__ uint32_t quad_bits(int row, int col) const {
    const Philox4 w = words(static_cast<uint32_t>((row >> 4) * 8 + (row & 7)), static_cast<uint32_t>(col >> 1));
    return kept(w.x[0]) | (kept(w.x[1]) << 1) | (kept(w.x[2]) << 2) | (kept(w.x[3]) << 3);
  }

  // Transposed: the keep bits of a thread's 16 queries q16 .. q16 + 15 (q16 % 16 == 0) x keys key0, key0 + 8 (key0
  // this thread's first key, t = lane % 4): bit 4 u + 2 h + e is query q16 + 8 u + 2 t + e, key key0 + 8 h (the
  // accumulator order s[4 j + 2 h + e] of 8-query tile j = 2 (q16 / 16) + u). Warp-collective (a shuffle with
  // lane ^ 4, which holds key key0 ^ 1): every lane of the warp calls it together.
  __device__ __forceinline__ uint32_t oct_bits(int q16, int key0, int t) const {
    const uint32_t v = static_cast<uint32_t>(key0 & 1);
    uint32_t mine = 0, theirs = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // This lane's call: query row 2 t + v of the pair; the pair of keys (key0 + 8 h) / 2 (also lane ^ 4's).
      const Philox4 w = words(static_cast<uint32_t>((q16 >> 4) * 8 + 2 * t) + v, static_cast<uint32_t>((key0 + 8 * h) >> 1));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t w_mine = v ? w.x[2 * u + 1] : w.x[2 * u];
        const uint32_t w_theirs = v ? w.x[2 * u] : w.x[2 * u + 1];
        mine |= kept(w_mine) << (4 * u + 2 * h + v);
        theirs |= kept(w_theirs) << (4 * u + 2 * h + v);
      }
    }
    // lane ^ 4's `theirs` sits at its v = 1 - (this lane's v): this lane's query 2 t + (1 - v).
    return mine | __shfl_xor_sync(0xffffffffu, theirs, 4);
  }

  // The keep bits of a thread's whole accumulator of N elements, bit i (of bits[i / 64]) for flat element i. The
  // Philox calls run in rolled loops (one call live at a time), so the accumulators around them keep their registers.
  // Row-major: quad q is elements 4 q .. 4 q + 3, its first element at coord(q, row, col).
  template <int N, typename Coord>
  __device__ __forceinline__ void quad_keep(uint64_t (&bits)[(N + 63) / 64], Coord coord) const {
    static_assert(N % 4 == 0, "whole quads");
#pragma unroll
    for (int w = 0; w < (N + 63) / 64; ++w) {
      uint64_t b = 0;
      const int n_quads = N / 4 - 16 * w < 16 ? N / 4 - 16 * w : 16;
#pragma unroll 1
      for (int q = 0; q < n_quads; ++q) {
        int row, col;
        coord(16 * w + q, row, col);
        b |= static_cast<uint64_t>(quad_bits(row, col)) << (4 * q);
      }
      bits[w] = b;
    }
  }
  // Transposed: groups of 8 elements (16 queries from q0 + 16 grp, keys key0, key0 + 8; oct_bits). Warp-collective.
  template <int N>
  __device__ __forceinline__ void oct_keep(uint64_t (&bits)[(N + 63) / 64], int q0, int key0, int t) const {
    static_assert(N % 8 == 0, "whole groups of 16 queries");
#pragma unroll
    for (int w = 0; w < (N + 63) / 64; ++w) {
      uint64_t b = 0;
      const int n_groups = N / 8 - 8 * w < 8 ? N / 8 - 8 * w : 8;
#pragma unroll 1
      for (int grp = 0; grp < n_groups; ++grp)
        b |= static_cast<uint64_t>(oct_bits(q0 + 16 * (8 * w + grp), key0, t)) << (8 * grp);
      bits[w] = b;
    }
  }
};

// Whether flat element i is kept (bits from quad_keep / oct_keep).
template <int W>
__device__ __forceinline__ bool dropout_kept(const uint64_t (&bits)[W], int i) {
  return (bits[i / 64] >> (i % 64)) & 1u;
}
// x[i] <- x[i] * scale where element i is kept, else 0.
template <int N>
__device__ __forceinline__ void dropout_apply(float (&x)[N], const uint64_t (&bits)[(N + 63) / 64], float scale) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = dropout_kept(bits, i) ? x[i] * scale : 0.f;
}
// The forward's P: dropped elements -> 0, kept ones as they are (O is scaled by 1 / (1 - p) at the end).
template <int N>
__device__ __forceinline__ void dropout_zero(float (&x)[N], const uint64_t (&bits)[(N + 63) / 64]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = dropout_kept(bits, i) ? x[i] : 0.f;
}

}  // namespace flash_ext
