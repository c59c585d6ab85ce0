// Launch side of the Hopper backward for kHeadDim = 256 (bwd_kernel_hd256.cuh): tile options, launch, and
// run_bwd_sm90_hd256, which the explicit specialization run_bwd_sm90<256> (declared in bwd_api.h, defined in
// csrc/kernels/instantiations/bwd_sm90_hdim256.cu) calls.
// Build: -gencode=arch=compute_90a,code=sm_90a (the kernel bodies are empty for any other target).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "../params.h"
#include "../static_switch.h"
#include "bwd_api.h"
#include "bwd_kernel_hd256.cuh"
#include "bwd_launch.cuh"

namespace flash_ext {
namespace sm90 {

// Defaults (kStages = 2 is the most that fits; Overlap measured in tools/harness/sm90_bwd_harness.cu, see NOTES.md).
template <bool IsCausal> struct BwdTileHd256 {
  static constexpr bool DqBulk = false;
  static constexpr bool StagedEpilogue = true;
  static constexpr bool Stagger = true;
};

template <typename T, bool DqBulk, bool IsCausal, bool StagedEpilogue, bool Stagger, int kAblate = 0>
void launch_bwd_hd256_sm90(const BwdParams& params, cudaStream_t stream) {
  using Kernel = BwdKernelHd256<T, DqBulk, IsCausal, StagedEpilogue, Stagger, kAblate>;
  BwdTmaArgs args;
  args.params = params;
  if (!encode_bwd_maps(args, params, Kernel::kBlockM, Kernel::kBlockN)) return;  // sm90_bwd_supported said no
  args.num_m_blocks = (params.seqlen_q + Kernel::kBlockM - 1) / Kernel::kBlockM;
  const dim3 grid_pre(params.seqlen_q_rounded / 64, params.nheads, params.batch);
  bwd_preprocess_sm90<T, 256><<<grid_pre, 256, 0, stream>>>(params);
  const dim3 grid_main((params.seqlen_k + Kernel::kBlockN - 1) / Kernel::kBlockN, params.nheads_k, params.batch);
  auto kernel = bwd_main_hd256_sm90<Kernel>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<grid_main, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  const dim3 grid_cvt((params.seqlen_q + 63) / 64, params.nheads, params.batch);
  bwd_convert_dq_sm90<T, 256, Kernel::kNDq><<<grid_cvt, 256, 0, stream>>>(params);
}

inline void run_bwd_sm90_hd256(const BwdParams& params, cudaStream_t stream) {
  DTYPE_SWITCH(params.is_bf16, [&] {
    BOOL_SWITCH(params.is_causal, IsCausal, [&] {
      using Tile = BwdTileHd256<IsCausal>;
      launch_bwd_hd256_sm90<elem_type, Tile::DqBulk, IsCausal, Tile::StagedEpilogue, Tile::Stagger>(params, stream);
    });
  });
}

}  // namespace sm90
}  // namespace flash_ext
