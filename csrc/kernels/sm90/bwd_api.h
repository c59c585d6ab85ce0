// Host-side entry points of the Hopper (sm_90a) backward, for the API layer. Torch-free, no device code.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../instantiations/head_dims.h"  // kSm90BwdHeadDims
#include "../params.h"
#include "tma_host.h"

namespace flash_ext {

// Runs preprocess (D = rowsum(dO o O), zero dq_accum and dq_semaphore when given), the main kernel and
// the dq conversion on `stream`; never synchronizes or checks errors. Call only where
// sm90_bwd_supported(params) is true, on a device of compute capability 9.0. params.head_dim_rounded must
// equal kHeadDim (dq_accum rows are kHeadDim floats).
template <int kHeadDim> bool run_bwd_sm90(const BwdParams& params, cudaStream_t stream);
// kHeadDim 256 is a different kernel (bwd_launch_hd256.cuh); its definition is in the generated
// instantiation file.
template <> bool run_bwd_sm90<256>(const BwdParams& params, cudaStream_t stream);

// False where the sm90 backward cannot run: causal (not deterministic, head_dim 65..128) without the tile_counter
// workspace, deterministic mode without the dq_semaphore workspace (batch x nheads x seqlen_q_rounded / 64 int32,
// 4-byte aligned), head_dim above 256 or not a multiple of 8, TMA unable to describe q, k, v or dout (a base
// pointer not 16-byte aligned, a byte stride not a multiple of 16, the driver rejecting a map), out or dq not
// 16-byte aligned with strides multiples of 8 elements (the preprocess and dq conversion kernels move
// 16- and 8-byte vectors), or an odd dk / dv stride (written in pairs where TMA cannot store them). The API
// then falls back to sm80 (its attention_backward passes out aligned that way and allocates dq contiguous).
// Host only, cheap (four cuTensorMapEncodeTiled calls, no device work).
inline bool sm90_bwd_supported(const BwdParams& p) {
  // Varlen: the head dim 64 / 128 kernels read packed sequences (seqinfo.cuh); the d256 kernel does not yet.
  if (p.cu_seqlens_q != nullptr && p.head_dim > 128) return false;
  if (p.deterministic && (p.dq_semaphore == nullptr || reinterpret_cast<uintptr_t>(p.dq_semaphore) % 4 != 0))
    return false;
  if (!sm90::dense_shape_ok(p)) return false;
  if (p.dq_accum == nullptr || p.dsoftmax_sum == nullptr || p.lse_log2 == nullptr) return false;
  // The persistent causal kernel (head dims 65..128, not deterministic) takes its tiles from p.tile_counter.
  if (p.is_causal && !p.deterministic && p.head_dim > 64 && p.head_dim <= 128 &&
      (p.tile_counter == nullptr || reinterpret_cast<uintptr_t>(p.tile_counter) % 4 != 0))
    return false;
  if (reinterpret_cast<uintptr_t>(p.dq_accum) % 16 != 0 || reinterpret_cast<uintptr_t>(p.dsoftmax_sum) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.lse_log2) % 16 != 0)
    return false;
  if (p.seqlen_q_rounded != (p.seqlen_q + 127) / 128 * 128) return false;
  const int inst = p.head_dim <= 64 ? 64 : p.head_dim <= 128 ? 128 : 256;
  if (p.head_dim_rounded != inst) return false;
  // out, dq: read / written as 16- / 8-byte vectors; dk, dv: written as 4-byte pairs.
  const int64_t vec_strides[] = {p.o_batch_stride,  p.o_row_stride,  p.o_head_stride,
                                 p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride};
  for (int64_t s : vec_strides) {
    if (s % 8 != 0) return false;
  }
  if (reinterpret_cast<uintptr_t>(p.out) % 16 != 0 || reinterpret_cast<uintptr_t>(p.dq) % 16 != 0) return false;
  const int64_t pair_strides[] = {p.dk_batch_stride, p.dk_row_stride,  p.dk_head_stride,
                                  p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride};
  for (int64_t s : pair_strides) {
    if (s % 2 != 0) return false;
  }
  if (reinterpret_cast<uintptr_t>(p.dk) % 4 != 0 || reinterpret_cast<uintptr_t>(p.dv) % 4 != 0) return false;
  return sm90::q_side_tma_ok(p, p.q, p.q_row_stride, p.q_head_stride, p.q_batch_stride, 64) &&
         sm90::q_side_tma_ok(p, p.dout, p.do_row_stride, p.do_head_stride, p.do_batch_stride, 64) &&
         sm90::k_side_tma_ok(p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride, 128) &&
         sm90::k_side_tma_ok(p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride, 128);
}

}  // namespace flash_ext
