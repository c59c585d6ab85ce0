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

// Tile choice per head dim. Every head dim runs the 2-D warp-tiled kernel (bwd_tiled_kernel.cuh):
// BwdTiledTraits<kHeadDim, kBlockM, kBlockN, kNWarps, kAtomMSdP, kAtomNdKV, kAtomMdQ, kUnrollSdP, kUnrollDkv,
//                kUnrollDq, kPrefetchAfterS, kDqStage, kFuseSdP>
// (d <= 128: 128 keys per CTA, 8 warps, FA2's sm80 tile shapes; d > 128: 64 x 64). Fallback (the 1-D
// bwd_dkdv_kernel, BwdTraits) runs where the device has less shared memory per block than Traits needs
// (A100: 163 KB; sm_86/89: 99 KB).
//
// Measured on one H200 (bf16, batch*seqlen 16384, hidden 2048, median of 10-20 cudaEvent-timed runs of the
// whole backward: preprocess + dK/dV(+dQ atomics) + dq convert; 2026-11-21), TFLOP/s at seqlen 1k / 4k / 16k,
// with PyTorch 2.11 SDPA FLASH (FlashAttention-2) backward on the same machine in the same session:
//                       ours (this config)      SDPA FLASH (FA2)        previous 1-D kernel
//   d64  full            224 / 254*/ 271         179 / 253 / 281         188 / - / 225
//   d64  causal          174 / 237*/ 277         126 / 211 / 264         146 / - / 221
//   d128 full            252 / 286*/ 304         190 / 274 / 301         207 / - / 241
//   d128 causal          193 / 257*/ 303         133 / 230 / 299         161 / - / 242
//   d256 full            196 / 218 / 225         170 / 233 / 255         155 / - / 174
//   d256 causal          157 / 198 / 222         121 / 199 / 247         126 / - / 172
//   (* = measured without kFuseSdP, which added 1-3% at 1k and 16k; fp16 matches bf16 within 0.3%.
//   SDPA timed as torch.autograd.grad(out, (q, k, v), dout) alone; PEERS.md's do_bench (fwd+bwd) - fwd
//   numbers for FA2 are 2-5% higher at 16k: 288/272, 310/307, 260/254.)
// What each step gave (d128 16k full; d64, d256 16k full):
//   1-D kernel -> tiled (red.v2 dQ)                      241 -> 276   (225 -> 246, 174 -> 204)
//   cheap cp.async addressing, lse/D by cp.async          276 -> 282   (246 -> 245, 204 -> 208)
//   kDqStage 1/2 (dQ staged in shared, red.v4 rows)       282 -> 295   (245 -> 265, 208 -> 225)
//   kFuseSdP (S and dP in one k loop)                     297 -> 304   (265 -> 271, 225 -> 225)
// Tried and dropped: kPrefetchAfterS false (no change), kDqFirst (dQ before dK: -0.3..-1.5%), d64
// S warps 2x4 instead of 4x2 (-2..-3%), d64 2 CTAs/SM with a 64x64 tile (8 warps of 16x32: 190, -23%),
// d128 dK/dV warps 2x4 (same as 4x2), d256 S warps 2x4 (-2%).
// Other head dims at 4k full (tiled vs 1-D): d32 191 vs 156, d96 256 vs 240, d160 191 vs 160,
// d192 203 vs 163, d224 194 vs 164.
// Dynamic shared memory: d32 154 KB, d64 218, d96 163, d128 211, d160 185, d192 225, d224 193, d256 217
// (fallbacks: d32 77, d64 109, d128 155, d160 145, d192 160). The deterministic dQ kernel needs 30..132 KB.
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
template <typename Traits, typename DqT, typename T, bool IsCausal>
void run_bwd_kernels(const BwdParams& params, cudaStream_t stream) {
  constexpr int kHeadDim = Traits::kHeadDim;
  const bool det = params.deterministic;

  // 1. D = rowsum(dO * O); zero dq_accum in atomic mode.
  const dim3 grid_pre((params.seqlen_q_rounded + 7) / 8, params.nheads, params.batch);
  if (det) bwd_preprocess_kernel<T, kHeadDim, false><<<grid_pre, 256, 0, stream>>>(params);
  else bwd_preprocess_kernel<T, kHeadDim, true><<<grid_pre, 256, 0, stream>>>(params);

  // 2. dK, dV (+ dQ atomics).
  {
    auto kernel = [] {
      if constexpr (Traits::kTiled) return bwd_dkdv_tiled_kernel<Traits, T, IsCausal>;
      else return bwd_dkdv_kernel<Traits, T, IsCausal>;
    }();
    set_smem(kernel, Traits::kSmemBytes);
    const dim3 grid((params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, params.nheads_k, params.batch);
    kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
  }

  // 3. dq.
  if (det) {
    auto kernel = bwd_dq_kernel<DqT, T, IsCausal>;
    set_smem(kernel, DqT::kSmemBytes);
    const dim3 grid((params.seqlen_q + DqT::kBlockM - 1) / DqT::kBlockM, params.nheads, params.batch);
    kernel<<<grid, DqT::kNThreads, DqT::kSmemBytes, stream>>>(params);
  } else {
    const dim3 grid((params.seqlen_q + 7) / 8, params.nheads, params.batch);
    bwd_convert_dq_kernel<T, kHeadDim><<<grid, 256, 0, stream>>>(params);
  }
}

template <typename T, int kHeadDim, bool IsCausal>
void run_bwd_impl(const BwdParams& params, cudaStream_t stream) {
  using Traits = typename BwdConfig<kHeadDim>::Traits;
  using Fallback = typename BwdConfig<kHeadDim>::Fallback;
  using DqT = DqTraits<kHeadDim, BwdConfig<kHeadDim>::kDqBlockN>;
  if constexpr (!std::is_same<Fallback, void>::value) {
    // Devices with less shared memory per block than the main config needs (A100: 163 KB).
    int dev = 0, smem_optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (smem_optin < Traits::kSmemBytes) {
      run_bwd_kernels<Fallback, DqT, T, IsCausal>(params, stream);
      return;
    }
  }
  run_bwd_kernels<Traits, DqT, T, IsCausal>(params, stream);
}

}  // namespace bwd_sm80

template <int kHeadDim>
bool run_bwd_sm80(const BwdParams& params, cudaStream_t stream) {
  DTYPE_SWITCH(params.is_bf16, [&] {
    BOOL_SWITCH(params.is_causal, IsCausal, [&] {
      bwd_sm80::run_bwd_impl<elem_type, kHeadDim, IsCausal>(params, stream);
    });
  });
  return true;
}

}  // namespace flash_ext
