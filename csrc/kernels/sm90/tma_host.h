// Host side of TMA: encoding the 4D tensor maps over (head_dim, seqlen, heads, batch). Host code only (no
// device code, no -lcuda: cuTensorMapEncodeTiled is fetched through the runtime).
#pragma once
#include <cstdint>
#include <cuda.h>  // CUtensorMap and the enums only
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "../params.h"

namespace flash_ext {
namespace sm90 {

// cuTensorMapEncodeTiled is fetched through the runtime (no -lcuda), once per process.
inline PFN_cuTensorMapEncodeTiled_v12000 get_encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult qres{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &qres) !=
            cudaSuccess ||
        qres != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// 4D map over a (batch, seqlen, heads, head_dim) tensor with element strides (row, head, batch), dims
// listed innermost first: (head_dim, seqlen, heads, batch). Box: 64 columns (128 bytes, the SW128 chunk)
// x box_rows rows x 1 x 1. Loads outside the tensor (seqlen tails, columns >= head_dim) read as zero;
// stores there are dropped. A dim of size 1 gets a harmless stride (its stride is never used).
// Returns false if the driver rejects the map.
inline bool encode_tensor_map_4d(CUtensorMap* map, const void* base, bool is_bf16, int head_dim, int seqlen,
                                 int heads, int batch, int64_t row_stride, int64_t head_stride,
                                 int64_t batch_stride, int box_rows) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = get_encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t esize = 2;
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seqlen),
                        static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  int64_t s1 = row_stride, s2 = head_stride, s3 = batch_stride;
  const int64_t fallback = static_cast<int64_t>(head_dim + 7) / 8 * 8;  // any multiple of 8 elements
  if (seqlen == 1) s1 = fallback;
  if (heads == 1) s2 = fallback;
  if (batch == 1) s3 = fallback;
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(s1) * esize, static_cast<cuuint64_t>(s2) * esize,
                           static_cast<cuuint64_t>(s3) * esize};
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  cuuint32_t estrides[4] = {1, 1, 1, 1};
  CUresult res = encode(map, is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                        const_cast<void*>(base), dims, strides, box, estrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS;
}

// Whether TMA can load / store the operand: base 16-byte aligned, the stride of every dim of size > 1 a
// positive multiple of 8 elements (16 bytes), and the driver accepting the map (extents, strides below 2^40).
// Host only, cheap (one cuTensorMapEncodeTiled call).
// The first two conditions alone (no driver call): tma_layout_ok.
inline bool tma_layout_ok(const void* base, int seqlen, int heads, int batch, int64_t row_stride,
                          int64_t head_stride, int64_t batch_stride) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  auto ok = [](int64_t stride, int size) { return size == 1 || (stride > 0 && stride % 8 == 0); };
  return ok(row_stride, seqlen) && ok(head_stride, heads) && ok(batch_stride, batch);
}
inline bool tma_operand_ok(const void* base, bool is_bf16, int head_dim, int seqlen, int heads, int batch,
                           int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  if (!tma_layout_ok(base, seqlen, heads, batch, row_stride, head_stride, batch_stride)) return false;
  CUtensorMap map;
  return encode_tensor_map_4d(&map, base, is_bf16, head_dim, seqlen, heads, batch, row_stride, head_stride,
                              batch_stride, box_rows);
}

// The operands over (seqlen_q, nheads) (q, out, dout) and over (seqlen_k, nheads_k) (k, v): their map, and
// whether TMA can describe them. A varlen batch (cu_seqlens_q set) is one entry of total_q / total_k rows: the
// kernels add each sequence's first row to the row coordinate (SeqInfoT::tma_q_row / tma_k_row).
inline int q_side_rows(const FwdParams& p) { return p.cu_seqlens_q != nullptr ? p.total_q : p.seqlen_q; }
inline int k_side_rows(const FwdParams& p) { return p.cu_seqlens_q != nullptr ? p.total_k : p.seqlen_k; }
inline int map_batch(const FwdParams& p) { return p.cu_seqlens_q != nullptr ? 1 : p.batch; }
inline bool encode_q_side(CUtensorMap* map, const FwdParams& p, const void* base, int64_t row_stride,
                          int64_t head_stride, int64_t batch_stride, int box_rows) {
  return encode_tensor_map_4d(map, base, p.is_bf16, p.head_dim, q_side_rows(p), p.nheads, map_batch(p), row_stride,
                              head_stride, batch_stride, box_rows);
}
inline bool encode_k_side(CUtensorMap* map, const FwdParams& p, const void* base, int64_t row_stride,
                          int64_t head_stride, int64_t batch_stride, int box_rows) {
  return encode_tensor_map_4d(map, base, p.is_bf16, p.head_dim, k_side_rows(p), p.nheads_k, map_batch(p), row_stride,
                              head_stride, batch_stride, box_rows);
}
inline bool q_side_tma_ok(const FwdParams& p, const void* base, int64_t row_stride, int64_t head_stride,
                          int64_t batch_stride, int box_rows) {
  return tma_operand_ok(base, p.is_bf16, p.head_dim, q_side_rows(p), p.nheads, map_batch(p), row_stride, head_stride,
                        batch_stride, box_rows);
}
inline bool k_side_tma_ok(const FwdParams& p, const void* base, int64_t row_stride, int64_t head_stride,
                          int64_t batch_stride, int box_rows) {
  return tma_operand_ok(base, p.is_bf16, p.head_dim, k_side_rows(p), p.nheads_k, map_batch(p), row_stride,
                        head_stride, batch_stride, box_rows);
}

// The shape rules both sm90 entry points share: head_dim a multiple of 8 up to 256, no empty dimension,
// nheads a multiple of nheads_k with the ratio filled in.
inline bool dense_shape_ok(const FwdParams& p) {
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > 256) return false;
  if (p.batch < 1 || p.seqlen_q < 1 || p.seqlen_k < 1 || p.nheads < 1 || p.nheads_k < 1) return false;
  return p.nheads % p.nheads_k == 0 && p.h_h_k_ratio == p.nheads / p.nheads_k;
}

}  // namespace sm90
}  // namespace flash_ext
