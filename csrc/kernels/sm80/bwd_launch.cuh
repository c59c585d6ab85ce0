// Host launcher of the sm80-family backward: run_bwd_sm80<kHeadDim>(params, stream).
// Launches on `stream`, never synchronizes, does not check errors (the API layer does).
#pragma once
#include <cuda_runtime.h>
#include <type_traits>

#include "../launch.h"
#include "../params.h"
#include "../static_switch.h"
#include "bwd_kernel.cuh"
#include "bwd_tiled_kernel.cuh"

namespace flash_ext {
namespace bwd_sm80 {

// Tile choice per head dim: the 2-D warp-tiled kernel (bwd_tiled_kernel.cuh) everywhere, the 1-D
// bwd_dkdv_kernel as the smaller-shared-memory fallback. Chosen on one H200 (bf16, whole-backward cudaEvent
// medians against SDPA FLASH and the 1-D kernel); the numbers and what was tried: NOTES.md.
template <int kHeadDim> struct BwdConfig;  // Fallback = void: no smaller-smem variant
template <> struct BwdConfig<32> {
  using Traits = BwdTiledTraits<32, 128, 128, 8, 2, 4, 4, 0, 0, 0, true, 1>;
  using Fallback = BwdTraits<32, 64, 128, 8, 1>;
  static constexpr int kDqBlockN = 64;
};
template <> struct BwdConfig<64> {
  using Traits = BwdTiledTraits<64, 128, 128, 8, 4, 4, 4, 2, 2, 2, true, 1, true>;
  using Fallback = BwdTraits<64, 64, 128, 8, 1>;
  static constexpr int kDqBlockN = 64;
};
template <> struct BwdConfig<96> {
  using Traits = BwdTiledTraits<96, 64, 128, 8, 2, 4, 2, 0, 0, 0, true, 1>;
  using Fallback = void;  // 163 KB: fits the A100
  static constexpr int kDqBlockN = 64;
};
template <> struct BwdConfig<128> {
  using Traits = BwdTiledTraits<128, 64, 128, 8, 2, 4, 2, 0, 0, 2, true, 1, true>;
  using Fallback = BwdTraits<128, 64, 128, 8, 1, false, 32>;
  static constexpr int kDqBlockN = 64;
};
template <> struct BwdConfig<160> {
  using Traits = BwdTiledTraits<160, 64, 64, 8, 4, 2, 2, 0, 0, 0, true, 1>;
  using Fallback = BwdTraits<160, 64, 64, 8, 2>;
  static constexpr int kDqBlockN = 32;
};
template <> struct BwdConfig<192> {
  using Traits = BwdTiledTraits<192, 64, 64, 8, 4, 2, 2, 0, 0, 0, true, 1>;
  using Fallback = BwdTraits<192, 64, 64, 8, 2, false, 32>;
  static constexpr int kDqBlockN = 32;
};
template <> struct BwdConfig<224> {  // no room for a dQ staging buffer, and 56 columns per warp: kDqStage 0
  using Traits = BwdTiledTraits<224, 64, 64, 8, 4, 2, 2>;
  using Fallback = void;  // needs sm_90's 227 KB (as the 1-D kernel did)
  static constexpr int kDqBlockN = 32;
};
template <> struct BwdConfig<256> {  // dQ staged in the current Q / dO stage (kDqStage 2)
  using Traits = BwdTiledTraits<256, 64, 64, 8, 4, 2, 2, 0, 0, 2, false, 2>;
  using Fallback = void;  // needs sm_90's 227 KB (as the 1-D kernel did)
  static constexpr int kDqBlockN = 32;
};

template <typename Kernel>
inline void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// All kernels of one backward for a given tile configuration (the harness also calls this directly
// to compare configurations).
template <typename Traits, typename DqT, typename T, bool IsCausal, bool IsLocal = false, bool Dropout = false>
void run_bwd_kernels(const BwdParams& params, cudaStream_t stream) {
  constexpr int kHeadDim = Traits::kHeadDim;
  const bool det = params.deterministic;

  // 1. D = rowsum(dO * O); zero dq_accum in atomic mode.
  const dim3 grid_pre((params.seqlen_q_rounded + 7) / 8, params.nheads, params.batch);
  // (The general path's instantiations read variable-length batches: IsLocal is their MayVarlen.)
  if (det) bwd_preprocess_kernel<T, kHeadDim, false, IsLocal><<<grid_pre, 256, 0, stream>>>(params);
  else bwd_preprocess_kernel<T, kHeadDim, true, IsLocal><<<grid_pre, 256, 0, stream>>>(params);

  // 2. dK, dV (+ dQ atomics).
  {
    auto kernel = [] {
      if constexpr (Traits::kTiled) return bwd_dkdv_tiled_kernel<Traits, T, IsCausal, IsLocal, Dropout>;
      else return bwd_dkdv_kernel<Traits, T, IsCausal, IsLocal, Dropout>;
    }();
    set_smem(kernel, Traits::kSmemBytes);
    const dim3 grid((params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, params.nheads_k, params.batch);
    kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
  }

  // 3. dq.
  if (det) {
    auto kernel = bwd_dq_kernel<DqT, T, IsCausal, IsLocal, Dropout>;
    set_smem(kernel, DqT::kSmemBytes);
    const dim3 grid((params.seqlen_q + DqT::kBlockM - 1) / DqT::kBlockM, params.nheads, params.batch);
    kernel<<<grid, DqT::kNThreads, DqT::kSmemBytes, stream>>>(params);
  } else {
    const dim3 grid((params.seqlen_q + 7) / 8, params.nheads, params.batch);
    bwd_convert_dq_kernel<T, kHeadDim, IsLocal><<<grid, 256, 0, stream>>>(params);
  }
}

// Launches the main configuration, or the fallback where the shared memory per block the launcher
// may assume (the device's opt-in limit, lowered to params.sm80_smem_limit when that is set) is below
// what the main one needs. Returns false (nothing launched) where neither configuration fits, or the
// deterministic dQ kernel does not.
template <typename T, int kHeadDim, bool IsCausal, bool IsLocal, bool Dropout>
bool run_bwd_impl(const BwdParams& params, cudaStream_t stream) {
  using Traits = typename BwdConfig<kHeadDim>::Traits;
  using Fallback = typename BwdConfig<kHeadDim>::Fallback;
  using DqT = DqTraits<kHeadDim, BwdConfig<kHeadDim>::kDqBlockN>;
  int dev = 0, smem_limit = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (params.sm80_smem_limit > 0 && params.sm80_smem_limit < smem_limit) smem_limit = params.sm80_smem_limit;
  if (params.deterministic && DqT::kSmemBytes > smem_limit) return false;
  if (Traits::kSmemBytes <= smem_limit) {
    run_bwd_kernels<Traits, DqT, T, IsCausal, IsLocal, Dropout>(params, stream);
    return true;
  }
  if constexpr (!std::is_same<Fallback, void>::value) {
    if (Fallback::kSmemBytes <= smem_limit) {
      run_bwd_kernels<Fallback, DqT, T, IsCausal, IsLocal, Dropout>(params, stream);
      return true;
    }
  }
  return false;
}

}  // namespace bwd_sm80

template <int kHeadDim>
bool run_bwd_sm80(const BwdParams& params, cudaStream_t stream) {
  bool launched = false;
  DTYPE_SWITCH(params.is_bf16, [&] {
    VARIANT_SWITCH(params.is_causal, params.is_local, params.dropout_rng != nullptr, IsCausal, IsLocal, Dropout, [&] {
      launched = bwd_sm80::run_bwd_impl<elem_type, kHeadDim, IsCausal, IsLocal, Dropout>(params, stream);
    });
  });
  return launched;
}

}  // namespace flash_ext
