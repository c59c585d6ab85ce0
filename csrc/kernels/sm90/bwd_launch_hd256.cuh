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

// Defaults. Measured on one H200 (2026-11-21, bf16, batch*seqlen = 16k, hidden 2048, whole backward incl.
// preprocess and dq conversion, cudaEvent median of 15, tools/harness/sm90_bwd_harness.cu `bench d256`), TFLOP/s at
// seqlen 1k / 4k / 16k, non-causal | causal:
//   run 4: default (red, StagedEpilogue, Stagger) 295 / 371 / 385 | 225 / 336 / 390, second pass 292 / 372 / 379 |
//          216 / 332 / 372; no Stagger 285 / 365 / 381 | 222 / 333 / 384; DqBulk 275 / 359 / 379 | 197 / 289 / 359.
//   run 3 (no Stagger): red 270 / 362 / 380 | 209 / 325 / 376, with StagedEpilogue 293 / 364 / 377 | 220 / 334 /
//          386; DqBulk 268 / 350 / 375 | 208 / 324 / 390.
//   run 2 (red, neither): issuing S^T of step i + 1 before the dQ reduction of step i 251 / 329 / 353 | 195 / 299 /
//          359 (ptxas C7514, 24 B spill), S^T and dP^T 192 / 230 / 244 | 150 / 212 / 247 (spills) vs 277 / 360 /
//          386 | 209 / 324 / 392: removed.
// DkLast (dV, dQ, dK; dQ's reduce-adds run while dK is on the tensor cores) vs dV, dK, dQ, 2026-11-21 fifth session,
// harness `ord` (two runs of two ABBA passes), DkLast / before at 1k / 2k / 4k / 16k, run 1 then run 2: non-causal
// 1.094 / 1.089 / 1.118 / 1.061, 1.075 / 1.107 / 1.100 / 1.058; causal 1.032 / 1.058 / 1.066 / 1.030, 1.047 / 1.067 /
// 1.045 / 1.041; deterministic 1.02-1.05. 0 spills.
template <bool IsCausal> struct BwdTileHd256 {
  static constexpr bool DqBulk = false;
  static constexpr bool StagedEpilogue = true;
  static constexpr bool Stagger = true;
  static constexpr bool DkLast = true;
};
// Deterministic mode (params.deterministic): ordered dQ adds (BwdKernelHd256::Det), no Stagger (the order is the
// descending lockstep one).
template <bool IsCausal> struct BwdTileHd256Det : BwdTileHd256<IsCausal> {
  static constexpr bool Stagger = false;
};

template <typename T, bool DqBulk, bool IsCausal, bool StagedEpilogue, bool Stagger, int kAblate = 0, bool Det = false,
          bool DkLast = false>
bool launch_bwd_hd256_sm90(const BwdParams& params, cudaStream_t stream) {
  using Kernel = BwdKernelHd256<T, DqBulk, IsCausal, StagedEpilogue, Stagger, kAblate, Det, DkLast>;
  if (Det && params.dq_semaphore == nullptr) return false;  // sm90_bwd_supported said no
  BwdTmaArgs args;
  args.params = params;
  if (!encode_bwd_maps(args, params, Kernel::kBlockM, Kernel::kBlockN)) return false;  // sm90_bwd_supported said no
  args.num_m_blocks = (params.seqlen_q + Kernel::kBlockM - 1) / Kernel::kBlockM;
  args.dkdv_tma = 0;  // (this kernel stages dK / dV itself: StagedEpilogue)
  launch_bwd_preprocess<T, 256>(params, stream);
  const dim3 grid_main((params.seqlen_k + Kernel::kBlockN - 1) / Kernel::kBlockN, params.nheads_k, params.batch);
  auto kernel = bwd_main_hd256_sm90<Kernel>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<grid_main, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  launch_bwd_convert_dq<T, 256, Kernel::kNDq>(params, stream);
  return true;
}

inline bool run_bwd_sm90_hd256(const BwdParams& params, cudaStream_t stream) {
  return DTYPE_SWITCH(params.is_bf16, [&] {
    return BOOL_SWITCH(params.is_causal, IsCausal, [&] {
      if (params.deterministic) {
        using Tile = BwdTileHd256Det<IsCausal>;
        return launch_bwd_hd256_sm90<elem_type, Tile::DqBulk, IsCausal, Tile::StagedEpilogue, Tile::Stagger, 0, true,
                              Tile::DkLast>(params, stream);
      } else {
        using Tile = BwdTileHd256<IsCausal>;
        return launch_bwd_hd256_sm90<elem_type, Tile::DqBulk, IsCausal, Tile::StagedEpilogue, Tile::Stagger, 0, false,
                              Tile::DkLast>(params, stream);
      }
    });
  });
}

}  // namespace sm90
}  // namespace flash_ext
