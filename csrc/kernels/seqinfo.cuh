// Sequence info: where the rows of batch entry b start and how many there are, for q (and out, dout,
// dq, lse, the backward's float32 workspaces) and for k (and v, dk, dv). Every kernel reads its
// sequences through this type; none multiplies a batch index by a stride itself.
//
// Dense batches: every entry has seqlen_q / seqlen_k rows and entry b starts b * batch_stride elements into
// its tensor. Varlen batches (MayVarlen, read at run time where cu_seqlens_q is set): rows and lengths from
// cu_seqlens / seqused_k. A paged layout will be other offsets here, not an edit of the kernels.
// docs/ARCHITECTURE.md says how it fits with the mask policy and the schedulers.
#pragma once
#include <cstdint>

#include "params.h"

namespace flash_ext {

// Rows per head of the backward's workspaces for a varlen batch (SeqInfoT::ws_offset); the API allocates these.
__host__ __device__ __forceinline__ int64_t varlen_ws_rows(int64_t total_q, int64_t batch) {
  return (total_q + 128 * batch + 127) / 128 * 128;
}

// Index is the type the entry index arrives in: int where a kernel keeps it in a variable, unsigned
// where it reads blockIdx.z at the point of use (SeqInfoT<unsigned>: the offsets widen the index with a
// zero extension, as arithmetic on blockIdx.z itself does, instead of a sign extension; the two give
// different machine code, sm80/NOTES.md "SeqInfo / Mask and SASS identity").
template <typename Index, bool MayVarlen = false>
struct SeqInfoT {
  Index b;       // batch entry
  int seqlen_q;  // query rows of entry b
  int seqlen_k;  // key rows of entry b
  // MayVarlen (the general path's kernels): with FwdParams::cu_seqlens_q set, the first q / k row of entry b in
  // the packed tensors (q_start < 0: a dense batch). Lengths are cut to the grid's (seqlen_q, seqlen_k: the
  // longest) and the rows to the tensors' totals, so that values outside the caller's contract (params.h) never
  // make a kernel read or write outside its tensors.
  int q_start = -1, k_start = 0;
  // Varlen only: lse is (nheads, total_q) (the caller's layout), and the backward's float32 workspaces (D, dQ
  // accumulator) are (nheads, ws_rows) with entry b's rows from ws_start: (q_start + 128 b) rounded down to a
  // multiple of 128, so that each entry has its seqlen_q rounded up to 128 rows of its own, and
  // ws_rows = varlen_ws_rows(total_q, batch) (total_q + 128 batch, rounded up to 128: every head's rows start
  // 512-byte aligned for the bulk copies) hold them all (instead of batch x longest).
  int total_q = 0, ws_start = 0;
  int64_t ws_rows = 0;

  __device__ __forceinline__ SeqInfoT(const FwdParams& p, Index b_) : b(b_), seqlen_q(p.seqlen_q), seqlen_k(p.seqlen_k) {
    if constexpr (MayVarlen) {
      if (p.cu_seqlens_q != nullptr) {
        auto rows = [](int start, int end, int longest, int total, int& first) {
          first = min(max(start, 0), total);
          return max(min(min(end - first, longest), total - first), 0);
        };
        seqlen_q = rows(p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1], p.seqlen_q, p.total_q, q_start);
        const int k_end = p.seqused_k != nullptr ? p.cu_seqlens_k[b] + p.seqused_k[b] : p.cu_seqlens_k[b + 1];
        seqlen_k = rows(p.cu_seqlens_k[b], k_end, p.seqlen_k, p.total_k, k_start);
        total_q = p.total_q;
        ws_start = (q_start + 128 * int(b)) / 128 * 128;
        ws_rows = varlen_ws_rows(p.total_q, p.batch);
      }
    }
  }

  // Element offset of entry b's first row in a q-side tensor (q, out, dout, dq) or a k-side one
  // (k, v, dk, dv) with these strides: b * batch_stride, or in a packed (varlen) layout start * row_stride.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride) const {
    if constexpr (MayVarlen) {
      if (q_start >= 0) return int64_t(q_start) * row_stride;
    }
    (void)row_stride;
    return int64_t(b) * batch_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride) const {
    if constexpr (MayVarlen) {
      if (q_start >= 0) return int64_t(k_start) * row_stride;
    }
    (void)row_stride;
    return int64_t(b) * batch_stride;
  }
  // First element of (entry b, head h) in a per-row float array laid out batch x nheads x rows, where
  // rows is seqlen_q (lse) or seqlen_q_rounded (the backward's D, lse_log2 and dQ accumulator rows).
  __device__ __forceinline__ int64_t row_offset(Index h, int nheads, int rows) const {
    return (int64_t(b) * nheads + h) * rows;
  }
  // Whether entry b is one sequence of a packed (varlen) batch.
  __device__ __forceinline__ bool packed() const {
    if constexpr (MayVarlen) return q_start >= 0;
    return false;
  }
  // TMA box coordinates (sm90): dense maps are (head_dim, seqlen, heads, batch), entry b at batch coordinate b;
  // varlen maps (head_dim, total rows, heads, 1), entry b's rows from q_start / k_start at batch coordinate 0.
  __device__ __forceinline__ int tma_q_row(int row) const { return packed() ? q_start + row : row; }
  __device__ __forceinline__ int tma_k_row(int row) const { return packed() ? k_start + row : row; }
  __device__ __forceinline__ int tma_batch() const { return packed() ? 0 : int(b); }
  // First element of (entry b, head h) in lse (batch x nheads x rows dense; nheads x total_q varlen).
  __device__ __forceinline__ int64_t lse_offset(Index h, int nheads, int rows) const {
    if constexpr (MayVarlen) {
      if (q_start >= 0) return int64_t(h) * total_q + q_start;
    }
    return row_offset(h, nheads, rows);
  }
  // First row of (entry b, head h) in the backward's per-row workspaces (D, lse_log2, the dQ accumulator, whose
  // rows are head_dim_rounded floats): batch x nheads x seqlen_q_rounded dense, nheads x ws_rows varlen.
  __device__ __forceinline__ int64_t ws_offset(Index h, int nheads, int seqlen_q_rounded) const {
    if constexpr (MayVarlen) {
      if (q_start >= 0) return int64_t(h) * ws_rows + ws_start;
    }
    return row_offset(h, nheads, seqlen_q_rounded);
  }
  // Rows of entry b's slice of those workspaces that the kernels touch: seqlen_q_rounded dense, the entry's
  // seqlen_q rounded up to 128 varlen (the rest of the grid's rows belong to the next entry).
  __device__ __forceinline__ int ws_rows_of_entry(int seqlen_q_rounded) const {
    if constexpr (MayVarlen) {
      if (q_start >= 0) return (seqlen_q + 127) / 128 * 128;
    }
    return seqlen_q_rounded;
  }
  // (entry b, head h) as one index of such an array's batch x nheads heads (row_offset is
  // head_index * rows), for a kernel that reads arrays of different row counts at one (b, h): the index
  // is computed once, and the row count is read after it (sm80/NOTES.md).
  __device__ __forceinline__ int64_t head_index(Index h, int nheads) const { return int64_t(b) * nheads + h; }
};
using SeqInfo = SeqInfoT<int>;

}  // namespace flash_ext
