// The backward's per-step recomputation on the transposed tile, shared by the sm90 backward kernels
// (bwd_kernel.cuh, bwd_kernel_hd256.cuh). The consumer holds S^T = K Q^T and dP^T = V dO^T as m64nN wgmma
// accumulators of N / 2 floats per thread: keys are the rows, queries the columns. n8 block j holds the
// queries q0 + 8j + 2t and + 1 (t = lane % 4) of the key rows key0 (registers 4j, 4j + 1) and key0 + 8
// (4j + 2, 4j + 3). The per-stage lse_log2 and D of the queries sit in shared memory as float rows.
#pragma once
#include <cstdint>
#include "../ptx.cuh"
#include "../score_mod.cuh"

namespace flash_ext {
namespace sm90 {

// P^T = exp2(S^T scale_log2 - lse_log2[query]); `lse` is the shared address of the stage's lse_log2 and
// `row0` the index of the tile's first query in it.
template <int N>
__device__ __forceinline__ void recompute_pt(float (&s)[N], uint32_t lse, int row0, int t, float scale_log2) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    float2 l2;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(l2.x), "=f"(l2.y) : "r"(lse + (row0 + 8 * j + 2 * t) * 4));
    s[4 * j + 0] = fast_exp2(fmaf(s[4 * j + 0], scale_log2, -l2.x));
    s[4 * j + 1] = fast_exp2(fmaf(s[4 * j + 1], scale_log2, -l2.y));
    s[4 * j + 2] = fast_exp2(fmaf(s[4 * j + 2], scale_log2, -l2.x));
    s[4 * j + 3] = fast_exp2(fmaf(s[4 * j + 3], scale_log2, -l2.y));
  }
}

// P^T = 0 where the mask policy hides (query, key); q0 is the tile's first query row in the sequence.
template <int N, typename MaskT>
__device__ __forceinline__ void mask_pt(float (&s)[N], const MaskT& mask, int q0, int key0, int t) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int row = q0 + 8 * j + 2 * t + e;
      const int lo = mask.col_min(row), hi = mask.col_limit(row);
      if (!MaskT::visible_in(key0, lo, hi)) s[4 * j + e] = 0.f;
      if (!MaskT::visible_in(key0 + 8, lo, hi)) s[4 * j + 2 + e] = 0.f;
    }
  }
}

// dS^T = P^T o (dP^T - D[query]), in place of dP^T; `d` and `row0` as `lse` and `row0` above.
template <int N>
__device__ __forceinline__ void ds_from_pt(float (&dp)[N], const float (&p)[N], uint32_t d, int row0, int t) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    float2 d2;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(d2.x), "=f"(d2.y) : "r"(d + (row0 + 8 * j + 2 * t) * 4));
    dp[4 * j + 0] = p[4 * j + 0] * (dp[4 * j + 0] - d2.x);
    dp[4 * j + 1] = p[4 * j + 1] * (dp[4 * j + 1] - d2.y);
    dp[4 * j + 2] = p[4 * j + 2] * (dp[4 * j + 2] - d2.x);
    dp[4 * j + 3] = p[4 * j + 3] * (dp[4 * j + 3] - d2.y);
  }
}

// This thread's terms of the sinks' gradient (BwdParams::dsink_accum), before dS^T replaces dP^T: the sum of
// exp2(sink_log2 - lse_log2[query]) P^T dP^T over its elements (`lse`, `row0` as in recompute_pt).
template <int N>
__device__ __forceinline__ float sink_terms_pt(const float (&p)[N], const float (&dp)[N], uint32_t lse, int row0, int t,
                                               float sink_log2) {
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    float2 l2;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(l2.x), "=f"(l2.y) : "r"(lse + (row0 + 8 * j + 2 * t) * 4));
    acc = fmaf(sink_share(sink_log2, l2.x), fmaf(p[4 * j + 0], dp[4 * j + 0], p[4 * j + 2] * dp[4 * j + 2]), acc);
    acc = fmaf(sink_share(sink_log2, l2.y), fmaf(p[4 * j + 1], dp[4 * j + 1], p[4 * j + 3] * dp[4 * j + 3]), acc);
  }
  return acc;
}

// Element i of a thread's S^T accumulator: query q0 + 8 (i / 4) + 2t + i % 2 (the column), key key0 + 8 ((i % 4) / 2).
__device__ __forceinline__ void st_coord(int i, int q0, int key0, int t, int& row, int& col) {
  row = q0 + 8 * (i / 4) + 2 * t + i % 2;
  col = key0 + 8 * ((i % 4) / 2);
}

// The score modifiers on S^T (general path), before P^T is recomputed from it: q0 is the query row of the tile's
// column 0, key0 this thread's first key row.
template <typename T, int N>
__device__ __forceinline__ void score_mod_st(float (&s)[N], const ScoreMod& mod, const FwdParams& p, int q0, int key0,
                                             int t) {
  if (mod.has_softcap()) {
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = mod.softcap(s[i]);
  }
  if (mod.has_alibi()) {
    const float k0 = static_cast<float>(key0), k1 = static_cast<float>(key0 + 8);
    const float ip = mod.row_pos(q0 + 2 * t);
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float ipq = ip + static_cast<float>(8 * j + e);
        s[4 * j + e] = mod.add_alibi(s[4 * j + e], ipq, k0);
        s[4 * j + 2 + e] = mod.add_alibi(s[4 * j + 2 + e], ipq, k1);
      }
    }
  }
  if (mod.has_bias()) add_bias<T>(s, mod, p, [&](int i, int& row, int& col) { st_coord(i, q0, key0, t, row, col); });
}

// dbias = dS^T (before the softcap's factor) into the (batch, head)'s rows at dbias_bh (ScoreMod::store_dbias).
template <int N>
__device__ __forceinline__ void store_dbias_st(const float (&ds)[N], const ScoreMod& mod, const FwdParams& p,
                                               float* dbias_bh, int q0, int key0, int t) {
  store_dbias(ds, mod, p, dbias_bh, [&](int i, int& row, int& col) { st_coord(i, q0, key0, t, row, col); });
}

// dS^T through the softcap (general path, softcap on): dS^T o (1 - t^2), t recovered from P^T
// (ScoreMod::dtanh_from_p, the ALiBi and bias terms read again); `lse`, `row0` as in recompute_pt, q0 and key0 as
// in score_mod_st.
template <typename T, int N>
__device__ __forceinline__ void softcap_grad_st(float (&ds)[N], const float (&p)[N], uint32_t lse, int row0,
                                                const ScoreMod& mod, const FwdParams& prm, int q0, int key0, int t) {
  const float k0 = static_cast<float>(key0), k1 = static_cast<float>(key0 + 8);
  const float ip = mod.row_pos(q0 + 2 * t);
  const ScoreMod::Strides st = mod.strides(prm);
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    float2 l2;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(l2.x), "=f"(l2.y) : "r"(lse + (row0 + 8 * j + 2 * t) * 4));
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float ipq = ip + static_cast<float>(8 * j + e);
      const float l = e ? l2.y : l2.x;
      float add0 = mod.alibi_term(ipq, k0), add1 = mod.alibi_term(ipq, k1);
      if (mod.has_bias()) {
        const int q = q0 + 8 * j + 2 * t + e;
        add0 += mod.bias_at<T>(st, q, key0);
        add1 += mod.bias_at<T>(st, q, key0 + 8);
      }
      ds[4 * j + e] *= mod.dtanh_from_p(p[4 * j + e], l, add0);
      ds[4 * j + 2 + e] *= mod.dtanh_from_p(p[4 * j + 2 + e], l, add1);
    }
  }
}

}  // namespace sm90
}  // namespace flash_ext
