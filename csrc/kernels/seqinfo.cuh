// Sequence info: where the rows of batch entry b start and how many there are, for q (and out, dout,
// dq, lse, the backward's float32 workspaces) and for k (and v, dk, dv). Every kernel reads its
// sequences through this type; none multiplies a batch index by a stride itself.
//
// Dense batches (today's only kind): every entry has seqlen_q / seqlen_k rows and entry b starts
// b * batch_stride elements into its tensor. A varlen or paged layout is another constructor and other
// offsets here (rows from cu_seqlens, lengths from cu_seqlens / seqused_k / cache_seqlens), not an edit
// of the kernels. docs/ARCHITECTURE.md says how it fits with the mask policy and the schedulers.
#pragma once
#include <cstdint>

#include "params.h"

namespace flash_ext {

// Index is the type the entry index arrives in: int where a kernel keeps it in a variable, unsigned
// where it reads blockIdx.z at the point of use (SeqInfoT<unsigned>: the offsets widen the index with a
// zero extension, as arithmetic on blockIdx.z itself does, instead of a sign extension; the two give
// different machine code, sm80/NOTES.md "SeqInfo / Mask and SASS identity").
template <typename Index>
struct SeqInfoT {
  Index b;       // batch entry
  int seqlen_q;  // query rows of entry b
  int seqlen_k;  // key rows of entry b

  __device__ __forceinline__ SeqInfoT(const FwdParams& p, Index b_) : b(b_), seqlen_q(p.seqlen_q), seqlen_k(p.seqlen_k) {}

  // Element offset of entry b's first row in a q-side tensor (q, out, dout, dq) or a k-side one
  // (k, v, dk, dv) with these strides. The row stride is what a packed (varlen) layout uses instead.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t /*row_stride*/) const {
    return int64_t(b) * batch_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t /*row_stride*/) const {
    return int64_t(b) * batch_stride;
  }
  // First element of (entry b, head h) in a per-row float array laid out batch x nheads x rows, where
  // rows is seqlen_q (lse) or seqlen_q_rounded (the backward's D, lse_log2 and dQ accumulator rows).
  __device__ __forceinline__ int64_t row_offset(Index h, int nheads, int rows) const {
    return (int64_t(b) * nheads + h) * rows;
  }
  // (entry b, head h) as one index of such an array's batch x nheads heads (row_offset is
  // head_index * rows), for a kernel that reads arrays of different row counts at one (b, h): the index
  // is computed once, and the row count is read after it (sm80/NOTES.md).
  __device__ __forceinline__ int64_t head_index(Index h, int nheads) const { return int64_t(b) * nheads + h; }
};
using SeqInfo = SeqInfoT<int>;

}  // namespace flash_ext
