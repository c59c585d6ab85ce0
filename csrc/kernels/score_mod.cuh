// Score modifiers: what the general path (the kernels' IsLocal instantiations, FwdParams::is_local) does to a raw
// score s = q.k between the QK^T gemm and the softmax, written once for every kernel. Each kernel walks its own
// accumulator layout and calls these per element; the forward and the backward's recomputation of P call the same
// functions, so both see the same scores bit for bit.
//
//   softcap:  s <- (softcap / scale) * tanh(s * scale / softcap)      (the scaled score capped at +-softcap)
//   ALiBi:    s <- s - (slope / scale) * |i' - j|                      (i' = i + seqlen_k - seqlen_q)
//
// in that order, as tests/reference.py. The scores stay in raw units (the scaled score divided by scale), so
// the softmax, the lse and the backward's dQ / dK scale are the plain path's. The backward's dS is the gradient
// of the scaled score; through the softcap it gains the factor d(capped)/d(scaled) = 1 - t^2 (t the tanh),
// which the kernels apply to dS = P o (dP - D) with t recovered from P (dtanh_from_p; ALiBi adds a constant:
// no factor).
//
// Both modifiers are run-time values: a kernel tests has_softcap() / has_alibi() once per tile (warp-uniform
// branches) and runs the per-element loops only where they are on.
#pragma once
#include <cmath>

#include "params.h"

namespace flash_ext {

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

struct ScoreMod {
  float cap_in, cap_out;  // scale / softcap and softcap / scale; 0: no softcap
  float alibi;            // -slope / scale of this (batch, head); 0: no ALiBi
  int shift;              // seqlen_k - seqlen_q: row i is at i' = i + shift
  float t_scale;          // cap_in / scale_log2 = 1 / (softcap log2 e): the backward's t from log2 P (dtanh_from_p)

  // No modifiers (what the plain and causal instantiations hold; they never read it).
  __device__ __forceinline__ ScoreMod() : cap_in(0.f), cap_out(0.f), alibi(0.f), shift(0), t_scale(0.f) {}
  __device__ __forceinline__ ScoreMod(const FwdParams& p, int batch, int head, int seqlen_q, int seqlen_k)
      : cap_in(p.softcap_in), cap_out(p.softcap_out), alibi(0.f), shift(seqlen_k - seqlen_q),
        t_scale(p.softcap_in / p.scale_softmax_log2) {
    set_head(p, batch, head);
  }
  // ALiBi's slope of query head `head` (the backward's key-side kernels visit the query heads of a KV head in turn).
  __device__ __forceinline__ void set_head(const FwdParams& p, int batch, int head) {
    if (p.alibi_slopes != nullptr) alibi = -__ldg(p.alibi_slopes + batch * p.alibi_batch_stride + head) / p.scale_softmax;
  }

  __device__ __forceinline__ bool has_softcap() const { return cap_in != 0.f; }
  __device__ __forceinline__ bool has_alibi() const { return alibi != 0.f; }
  __device__ __forceinline__ bool active() const { return has_softcap() || has_alibi(); }

  // The row's position i' as a float (exact below 2^24), computed once per row; keys are floats as well, so the
  // per-element ALiBi term is one subtraction, one absolute value and one fma.
  __device__ __forceinline__ float row_pos(int row) const { return static_cast<float>(row + shift); }

  __device__ __forceinline__ float softcap(float s) const { return tanh_approx(s * cap_in) * cap_out; }
  __device__ __forceinline__ float add_alibi(float s, float row_pos, float col) const {
    return fmaf(alibi, fabsf(row_pos - col), s);
  }
  // The ALiBi term itself (raw units, <= 0).
  __device__ __forceinline__ float alibi_term(float row_pos, float col) const { return alibi * fabsf(row_pos - col); }

  // The backward's softcap factor 1 - t^2 of an element from its recomputed P = exp2(s' scale_log2 - lse_log2),
  // s' = t softcap_out + alibi_term: log2 P + lse_log2 = s' scale_log2 gives t back without keeping it in registers
  // across the dP gemm (the kernels' register budget has no room for a second score tile). The error of t is
  // that of lse_log2's last bit over softcap log2 e, far below the 16-bit rounding dS gets next. P = 0 (masked,
  // underflowed, a row without keys) gives 0: its dS is 0 whatever the factor.
  __device__ __forceinline__ float dtanh_from_p(float p, float lse_log2, float alibi_term_) const {
    const float t = fmaf(fast_log2(p) + lse_log2, t_scale, -cap_in * alibi_term_);
    return p > 0.f ? fmaxf(fmaf(-t, t, 1.f), 0.f) : 0.f;
  }
};

}  // namespace flash_ext
