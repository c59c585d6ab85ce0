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

// Defaults, measured on one H200 (2026-11-21, bf16, whole backward; numbers in NOTES.md, "Backward: experiment
// variants removed from the product kernels"): Stagger +1-3% (kept); the dQ adds as red.global from registers
// (a bulk reduce through shared memory was no faster); dV, dQ, dK order 1.03-1.12x dV, dK, dQ; 0 spills.
template <bool IsCausal> struct BwdTileHd256 {
  static constexpr bool Stagger = true;
};
// Deterministic mode (params.deterministic): ordered dQ adds (BwdKernelHd256::Det), no Stagger (the order is the
// descending lockstep one).
template <bool IsCausal> struct BwdTileHd256Det : BwdTileHd256<IsCausal> {
  static constexpr bool Stagger = false;
};

template <typename T, bool IsCausal, bool Stagger, bool Det = false, bool IsLocal = false, bool Dropout = false>
bool launch_bwd_hd256_sm90(const BwdParams& params, cudaStream_t stream) {
  using Kernel = BwdKernelHd256<T, IsCausal, Stagger, Det, IsLocal, Dropout>;
  if (Det && params.dq_semaphore == nullptr) return false;  // sm90_bwd_supported said no
  BwdTmaArgs args;
  args.params = params;
  if (!encode_bwd_maps(args, params, Kernel::kBlockM, Kernel::kBlockN)) return false;  // sm90_bwd_supported said no
  args.num_m_blocks = (params.seqlen_q + Kernel::kBlockM - 1) / Kernel::kBlockM;
  args.dkdv_tma = 0;  // (this kernel stages dK / dV itself)
  launch_bwd_preprocess<T, 256>(params, stream);
  const dim3 grid_main = Kernel::Scheduler::grid(params);
  auto kernel = sm90_kernel<Kernel, BwdTmaArgs>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<grid_main, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  launch_bwd_convert_dq<T, 256, Kernel::kNDq>(params, stream);
  return true;
}

inline bool run_bwd_sm90_hd256(const BwdParams& params, cudaStream_t stream) {
  return DTYPE_SWITCH(params.is_bf16, [&] {
    return VARIANT_SWITCH(params.is_causal, params.is_local, params.dropout_rng != nullptr, IsCausal, IsLocal, Dropout, [&] {
      if (params.deterministic) {
        using Tile = BwdTileHd256Det<IsCausal>;
        return launch_bwd_hd256_sm90<elem_type, IsCausal, Tile::Stagger, true, IsLocal, Dropout>(params, stream);
      } else {
        using Tile = BwdTileHd256<IsCausal>;
        return launch_bwd_hd256_sm90<elem_type, IsCausal, Tile::Stagger, false, IsLocal, Dropout>(params, stream);
      }
    });
  });
}

}  // namespace sm90
}  // namespace flash_ext
