// Host-side entry points of the Hopper (sm_90a) forward, for the API layer. Torch-free, no device code.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../instantiations/head_dims.h"  // kSm90FwdHeadDims
#include "../params.h"
#include "tma_host.h"

namespace flash_ext {

// Encodes the TMA maps on the host and launches on `stream`; never synchronizes or checks errors.
// Call only where sm90_fwd_supported(params) is true, on a device of compute capability 9.0.
template <int kHeadDim> bool run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

// False where TMA cannot describe the tensors (a base pointer not 16-byte aligned, a byte stride not a
// multiple of 16, head_dim not a multiple of 8 or above 256) or the driver rejects a map: the API then
// falls back to the sm80 kernel. Host only, cheap (four cuTensorMapEncodeTiled calls, no device work).
// The caller still checks the device: compute capability 9.0 and a binary built for sm_90a.
inline bool sm90_fwd_supported(const FwdParams& p) {
  if (!sm90::dense_shape_ok(p)) return false;
  // Each operand: aligned base, strides TMA can describe, a map the driver accepts (the box rows do not matter).
  return sm90::q_side_tma_ok(p, p.q, p.q_row_stride, p.q_head_stride, p.q_batch_stride, 128) &&
         sm90::k_side_tma_ok(p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride, 128) &&
         sm90::k_side_tma_ok(p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride, 128) &&
         sm90::q_side_tma_ok(p, p.out, p.o_row_stride, p.o_head_stride, p.o_batch_stride, 64);
}

}  // namespace flash_ext
