// Online softmax pieces, in registers. Scope: one warp; each thread holds 2 rows per 16-row m-tile
// (rows g and g+8 of the m16n8 accumulator, g = lane / 4) and 2 columns per 8-column n-tile; the 4
// threads of a quad (same g) hold one row together, so row reductions are two xor-shuffles.
// Scores are kept unscaled; the softmax scale is folded into the exponent:
//   p = exp2(s * scale_log2 - m * scale_log2).
#pragma once
#include <cmath>
#include "ptx.cuh"

namespace flash_ext {

__device__ __forceinline__ float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
__device__ __forceinline__ float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// One row (i: 0 or 1, the thread's rows g and g + 8) of an m-tile's scores turned into P = exp2(s * scale_log2 -
// m_scaled) in place; returns sum plus the row's P, added in n-tile order.
template <int kNTiles>
__device__ __forceinline__ float exp2_row(float (&s)[kNTiles][4], int i, float scale_log2, float m_scaled, float sum) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const float p0 = fast_exp2(fmaf(s[nt][2 * i], scale_log2, -m_scaled));
    const float p1 = fast_exp2(fmaf(s[nt][2 * i + 1], scale_log2, -m_scaled));
    s[nt][2 * i] = p0;
    s[nt][2 * i + 1] = p1;
    sum += p0 + p1;
  }
  return sum;
}

// The end of one row's softmax with an attention sink (issue 15; the general path only): `sink` is one more
// logit (natural units, as the scaled scores) in the denominator, carrying no value. m is the row's running max
// (raw units, -inf: no key seen) and sum = sum of exp2((s - m) * scale_log2) over the row (quad-reduced). With
// M = max(m * scale_log2, sink * log2 e), the denominator relative to 2^M is sum * 2^(m scale_log2 - M) +
// 2^(sink log2 e - M), so neither term overflows: inv is the factor that turns the row's O accumulator into the
// output, lse = (M + log2 of that denominator) * ln 2. A row that sees no key gets inv = 0 and lse = sink.
__device__ __forceinline__ void finalize_row_with_sink(float m, float sum, float scale_log2, float sink, float& inv,
                                                       float& lse) {
  constexpr float kLog2eF = 1.4426950408889634f, kLn2F = 0.6931471805599453f;
  if (m == -INFINITY) {  // no key: the sink alone (exactly; -inf for a sink of -inf)
    inv = 0.f;
    lse = sink;
    return;
  }
  const float ms = m * scale_log2, s2 = sink * kLog2eF;
  const float mx = fmaxf(ms, s2);
  const float a = fast_exp2(ms - mx);
  const float denom = fmaf(sum, a, fast_exp2(s2 - mx));
  inv = a / denom;
  lse = (mx + log2f(denom)) * kLn2F;
}

// kMTiles m-tiles of 16 rows per warp -> 2 * kMTiles rows per thread.
template <int kMTiles>
struct OnlineSoftmax {
  static constexpr int kRowsPerThread = 2 * kMTiles;
  float row_max_reg[kRowsPerThread];  // running max of the raw scores (-inf: no key seen yet)
  float row_sum_reg[kRowsPerThread];  // this thread's partial sum of exp (quad-reduced at the end)

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      row_max_reg[r] = -INFINITY;
      row_sum_reg[r] = 0.f;
    }
  }

  // One key block: update the running max with the scores s, rescale o and the sums, and turn s
  // into P = exp2((s - m) * scale_log2) in place. Masked scores are -inf. A row whose max is still
  // -inf gets P = 0 and keeps o = 0 (no NaN from -inf - -inf).
  template <int kNTiles, int kDTiles>
  __device__ __forceinline__ void rescale(float (&s)[kMTiles][kNTiles][4],
                                          float (&o)[kMTiles][kDTiles][4], float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = mt * 2 + i;
        float m = row_max_reg[r];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(s[mt][nt][2 * i], s[mt][nt][2 * i + 1]));
        m = quad_allreduce_max(m);
        const float m_scaled = (m == -INFINITY) ? 0.f : m * scale_log2;
        // old max -inf -> factor 0 (o and sum are still 0 then).
        const float factor = fast_exp2(row_max_reg[r] * scale_log2 - m_scaled);
        row_max_reg[r] = m;
        float sum = row_sum_reg[r] * factor;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * i] *= factor;
          o[mt][dt][2 * i + 1] *= factor;
        }
        row_sum_reg[r] = exp2_row(s[mt], i, scale_log2, m_scaled, sum);
      }
    }
  }

  // Epilogue: o /= l; returns lse per thread row (natural log: m * scale + log(l)); a row that saw
  // no key gets o = 0 and lse = -inf.
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&o)[kMTiles][kDTiles][4], float scale,
                                           float (&lse)[kRowsPerThread]) {
    finalize_rows(o, lse, [&](int r, float l, float& inv, float& lse_r) {
      const bool empty = !(l > 0.f);  // also catches NaN
      inv = empty ? 0.f : 1.f / l;
      lse_r = empty ? -INFINITY : row_max_reg[r] * scale + logf(l);
    });
  }

  // finalize with an attention sink (finalize_row_with_sink): the general path's epilogue where sinks are given.
  template <int kDTiles>
  __device__ __forceinline__ void finalize_with_sink(float (&o)[kMTiles][kDTiles][4], float scale_log2, float sink,
                                                     float (&lse)[kRowsPerThread]) {
    finalize_rows(o, lse, [&](int r, float l, float& inv, float& lse_r) {
      finalize_row_with_sink(row_max_reg[r], l, scale_log2, sink, inv, lse_r);
    });
  }

  // The epilogue's walk over this thread's rows: row(r, l, inv, lse_r) gives row r's factor for O and its lse from
  // its quad-reduced sum l; O's row is scaled by that factor.
  template <int kDTiles, typename Row>
  __device__ __forceinline__ void finalize_rows(float (&o)[kMTiles][kDTiles][4], float (&lse)[kRowsPerThread],
                                                Row row) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = mt * 2 + i;
        float inv;
        row(r, quad_allreduce_sum(row_sum_reg[r]), inv, lse[r]);
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * i] *= inv;
          o[mt][dt][2 * i + 1] *= inv;
        }
      }
    }
  }
};

}  // namespace flash_ext
