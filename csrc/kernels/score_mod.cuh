// Score modifiers: what the general path (the kernels' IsLocal instantiations, FwdParams::is_local) does to a raw
// score s = q.k between the QK^T gemm and the softmax, written once for every kernel. Each kernel walks its own
// accumulator layout and calls these per element; the forward and the backward's recomputation of P call the same
// functions, so both see the same scores bit for bit.
//
//   softcap:  s <- (softcap / scale) * tanh(s * scale / softcap)      (the scaled score capped at +-softcap)
//   ALiBi:    s <- s - (slope / scale) * |i' - j|                      (i' = i + seqlen_k - seqlen_q)
//   bias:     s <- s + bias[b, h, i, j] / scale  (a bool bias: -inf where false)
//
// in that order, as tests/reference.py. The bias is read element by element from global memory through its
// strides (a broadcast dim has stride 0, so a key padding mask of (batch, 1, 1, seqlen_k) stays in L1 / L2). The
// scores stay in raw units (the scaled score divided by scale), so the softmax, the lse and the backward's dQ / dK
// scale are the plain path's. The backward's dS is the gradient
// of the scaled score; through the softcap it gains the factor d(capped)/d(scaled) = 1 - t^2 (t the tanh),
// which the kernels apply to dS = P o (dP - D) with t recovered from P (dtanh_from_p; ALiBi adds a constant:
// no factor).
//
// All three are run-time values: a kernel tests has_softcap() / has_alibi() / has_bias() once per tile (warp-uniform
// branches) and runs the per-element loops only where they are on.
#pragma once
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "params.h"
#include "ptx.cuh"

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

// A 16-bit element of type T (as its bits) as a float.
template <typename T>
__device__ __forceinline__ float to_float(unsigned short bits);
template <>
__device__ __forceinline__ float to_float<__half>(unsigned short bits) { return __half2float(__ushort_as_half(bits)); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(unsigned short bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

struct ScoreMod {
  float cap_in, cap_out;  // scale / softcap and softcap / scale; 0: no softcap
  float alibi;            // -slope / scale of this (batch, head); 0: no ALiBi
  int shift;              // seqlen_k - seqlen_q: row i is at i' = i + shift
  float t_scale;          // cap_in / scale_log2 = 1 / (softcap log2 e): the backward's t from log2 P (dtanh_from_p)
  // The bias of this (batch, head): its element (0, 0), the kind (FwdParams::bias_kind; 0: none), 1 / scale, and
  // the bounds of the elements that exist (rows past seqlen_q and keys past seqlen_k are never read).
  const char* bias;
  int bias_kind;
  float bias_unscale;
  int seqlen_q, seqlen_k;

  // No modifiers (what the plain and causal instantiations hold; they never read it).
  __device__ __forceinline__ ScoreMod()
      : cap_in(0.f), cap_out(0.f), alibi(0.f), shift(0), t_scale(0.f), bias(nullptr), bias_kind(0), bias_unscale(0.f),
        seqlen_q(0), seqlen_k(0) {}
  __device__ __forceinline__ ScoreMod(const FwdParams& p, int batch, int head, int seqlen_q_, int seqlen_k_)
      : cap_in(p.softcap_in), cap_out(p.softcap_out), alibi(0.f), shift(seqlen_k_ - seqlen_q_),
        t_scale(p.softcap_in / p.scale_softmax_log2), bias(nullptr), bias_kind(p.bias_kind),
        bias_unscale(1.f / p.scale_softmax), seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {
    set_head(p, batch, head);
  }
  // ALiBi's slope and the bias of query head `head` (the backward's key-side kernels visit the query heads of a KV
  // head in turn).
  __device__ __forceinline__ void set_head(const FwdParams& p, int batch, int head) {
    if (p.alibi_slopes != nullptr) alibi = -__ldg(p.alibi_slopes + batch * p.alibi_batch_stride + head) / p.scale_softmax;
    if (bias_kind != 0) {
      const int64_t off = batch * p.bias_batch_stride + head * p.bias_head_stride;
      bias = static_cast<const char*>(p.attn_bias) + off * (bias_kind == 1 ? 1 : bias_kind == 2 ? 4 : 2);
    }
  }
  __device__ __forceinline__ bool has_bias() const { return bias_kind != 0; }

  // The bias's strides inside a (batch, head) slice, as 32-bit values (the API layer keeps every offset inside a
  // slice, and dbias's, below 2^31). They pass through an opaque move once per tile: otherwise the compiler hoists
  // the per-element products (constant offset x stride) out of the main loop and keeps dozens of them live across
  // it (hundreds of bytes of spills); recomputed per tile they are one IMAD each.
  struct Strides {
    int row, col, dbias_row;
  };
  __device__ __forceinline__ Strides strides(const FwdParams& p) const {
    return Strides{opaque(static_cast<int>(p.bias_row_stride)), opaque(static_cast<int>(p.bias_col_stride)),
                   opaque(seqlen_k)};
  }
  __device__ __forceinline__ static int opaque(int x) {
    int y;
    asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
  }
  // One element of the bias: its address (element (row, col) of this (batch, head)'s slice), its bits read with a
  // load of its own size (call only for an element inside the tensor), and those bits in raw units (-inf where a
  // bool bias hides the key). T: the inputs' element type (bias_kind 3). The kind is a warp-uniform value tested per
  // element: one loop for every kind (add_bias below) spills nothing where three loops, one per kind, made the
  // register allocator spill (the kernels have few registers to spare).
  __device__ __forceinline__ uintptr_t bias_addr(const Strides& st, int row, int col) const {
    const int elem_shift = bias_kind == 1 ? 0 : bias_kind == 2 ? 2 : 1;  // log2 of the element size
    return reinterpret_cast<uintptr_t>(bias) +
           (static_cast<uintptr_t>(static_cast<unsigned>(row * st.row + col * st.col)) << elem_shift);
  }
  __device__ __forceinline__ unsigned bias_bits(uintptr_t addr) const {
    if (bias_kind == 2) return __ldg(reinterpret_cast<const unsigned*>(addr));
    if (bias_kind == 3) return __ldg(reinterpret_cast<const unsigned short*>(addr));
    return __ldg(reinterpret_cast<const unsigned char*>(addr));
  }
  template <typename T>
  __device__ __forceinline__ float bias_value(unsigned bits) const {
    if (bias_kind == 2) return __uint_as_float(bits) * bias_unscale;
    if (bias_kind == 3) return to_float<T>(static_cast<unsigned short>(bits & 0xffffu)) * bias_unscale;
    return (bits & 0xffu) ? 0.f : -INFINITY;
  }
  __device__ __forceinline__ bool in_tensor(int row, int col) const { return row < seqlen_q && col < seqlen_k; }
  // One element's bias in raw units (0 outside the tensor): the softcap backward's single reads.
  template <typename T>
  __device__ __forceinline__ float bias_at(const Strides& st, int row, int col) const {
    return in_tensor(row, col) ? bias_value<T>(bias_bits(bias_addr(st, row, col))) : 0.f;
  }

  __device__ __forceinline__ bool has_softcap() const { return cap_in != 0.f; }
  __device__ __forceinline__ bool has_alibi() const { return alibi != 0.f; }
  __device__ __forceinline__ bool active() const { return has_softcap() || has_alibi() || bias_kind != 0; }

  // The row's position i' as a float (exact below 2^24, so ALiBi's |i' - j| is exact for sequences up to 16M
  // positions and rounded to float beyond), computed once per row; keys are floats as well, so the
  // per-element ALiBi term is one subtraction, one absolute value and one fma.
  __device__ __forceinline__ float row_pos(int row) const { return static_cast<float>(row + shift); }

  __device__ __forceinline__ float softcap(float s) const { return tanh_approx(s * cap_in) * cap_out; }
  __device__ __forceinline__ float add_alibi(float s, float row_pos, float col) const {
    return fmaf(alibi, fabsf(row_pos - col), s);
  }
  // The ALiBi term itself (raw units, <= 0).
  __device__ __forceinline__ float alibi_term(float row_pos, float col) const { return alibi * fabsf(row_pos - col); }

  // dbias of (row, col) = dS (the gradient of the scaled score), into the (batch, head)'s seqlen_q x seqlen_k float32
  // rows at dbias_bh (BwdParams::dbias_accum); nothing outside the tensor.
  __device__ __forceinline__ void store_dbias(float* dbias_bh, const Strides& st, int row, int col, float ds) const {
    if (row < seqlen_q && col < seqlen_k) dbias_bh[row * st.dbias_row + col] = ds;
  }

  // The backward's softcap factor 1 - t^2 of an element from its recomputed P = exp2(s' scale_log2 - lse_log2),
  // s' = t softcap_out + additive (the ALiBi and bias terms, raw units): log2 P + lse_log2 = s' scale_log2 gives t back without keeping it in registers
  // across the dP gemm (the kernels' register budget has no room for a second score tile). The error of t is
  // that of lse_log2's last bit over softcap log2 e, far below the 16-bit rounding dS gets next. P = 0 (masked,
  // underflowed, a row without keys) gives 0: its dS is 0 whatever the factor.
  __device__ __forceinline__ float dtanh_from_p(float p, float lse_log2, float additive) const {
    const float t = fmaf(fast_log2(p) + lse_log2, t_scale, -cap_in * additive);
    return p > 0.f ? fmaxf(fmaf(-t, t, 1.f), 0.f) : 0.f;
  }
};

// s[i] += the bias of element i (ScoreMod::bias_at), for the N scores a thread holds; coord(i, row, col) gives element
// i's query row and key.
template <typename T, int N, typename Coord>
__device__ __forceinline__ void add_bias(float (&s)[N], const ScoreMod& mod, const FwdParams& p, Coord coord) {
  const ScoreMod::Strides st = mod.strides(p);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int row, col;
    coord(i, row, col);
    const bool in = mod.in_tensor(row, col);
    const uintptr_t addr = mod.bias_addr(st, row, col);
    const unsigned bits = in ? mod.bias_bits(addr) : 0u;
    const float v = mod.bias_value<T>(bits);
    if (in) s[i] += v;
  }
}

// dbias = ds[i] of element i (ScoreMod::store_dbias), coord as in add_bias.
template <int N, typename Coord>
__device__ __forceinline__ void store_dbias(const float (&ds)[N], const ScoreMod& mod, const FwdParams& p,
                                            float* dbias_bh, Coord coord) {
  const ScoreMod::Strides st = mod.strides(p);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int row, col;
    coord(i, row, col);
    mod.store_dbias(dbias_bh, st, row, col, ds[i]);
  }
}

// The sinks' gradient (BwdParams::dsink_accum): each (b, h) row has kDsinkSlotsPer128Keys (params.h) slots per 128 keys. A
// key-side kernel with kBlockN keys per CTA and kSlotWarps warps adding terms gives warp w of key block n the slot
// n * kSlotWarps + w, which stays below the row's end when kBlockN divides 128 and kSlotWarps <= kBlockN / 8.
template <int kBlockN, int kSlotWarps>
__device__ __forceinline__ int dsink_slot(int n_block, int warp) {
  static_assert(128 % kBlockN == 0 && kSlotWarps * (128 / kBlockN) <= kDsinkSlotsPer128Keys,
                "dsink slots: kBlockN must divide 128, at most kBlockN / 8 warps add terms");
  return n_block * kSlotWarps + warp;
}
// exp(sink - lse) of a query row from the sink and the row's lse_log2 (both times log2 e): the sink's share of the
// row's softmax; 0 where lse_log2 = +inf (a row past seqlen_q or without keys) or the sink is -inf.
__device__ __forceinline__ float sink_share(float sink_log2, float lse_log2) { return fast_exp2(sink_log2 - lse_log2); }
// The sink of query head `head` times log2 e (ScoreMod-free: the backward kernels read it once per head).
__device__ __forceinline__ float sink_log2_of(const BwdParams& p, int head) { return p.sinks[head] * 1.4426950408889634f; }
// The warp's sum of v (every lane calls it), added by lane 0 to slot `slot` of (batch, head). The slot has no
// other writer, so the plain read-modify-write is exact and its order fixed.
__device__ __forceinline__ void add_dsink_terms(const BwdParams& p, int batch, int head, int slot, float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) {
    float* dst = p.dsink_accum + (int64_t(batch) * p.nheads + head) * p.dsink_slots + slot;
    *dst += v;
  }
}

// A thread's scores as one flat array (the sm80 kernels hold them as [m-tile][n-tile][4]).
template <int A, int B, int C>
__device__ __forceinline__ float (&flat(float (&x)[A][B][C]))[A * B * C] {
  return reinterpret_cast<float(&)[A * B * C]>(x);
}
template <int A, int C>
__device__ __forceinline__ float (&flat(float (&x)[A][C]))[A * C] {
  return reinterpret_cast<float(&)[A * C]>(x);
}

}  // namespace flash_ext
