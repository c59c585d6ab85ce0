// Host-side launch of the sm80 forward kernel: tile sizes per kHeadDim, dtype / causal dispatch.
// Never synchronizes, never checks errors (the API layer calls cudaGetLastError after).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "../launch.h"
#include "../params.h"
#include "../static_switch.h"
#include "fwd_kernel.cuh"

namespace flash_ext {

// One configuration: kBlockM query rows per block, kBlockN keys per step, kNWarps warps.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNWarps, bool IsCausal,
          bool kXorQAddr = false, bool kXorKVAddr = false, int kFlags = 0, bool IsLocal = false, bool Dropout = false>
void launch_fwd_sm80(const FwdParams& params, cudaStream_t stream) {
  using Traits = FwdTraits<T, kHeadDim, kBlockM, kBlockN, kNWarps, kXorQAddr, kXorKVAddr, kFlags>;
  constexpr int kSmemBytes = Traits::kSmemBytes;
  auto kernel = &fwd_kernel<Traits, IsCausal, IsLocal, Dropout>;
  if (kSmemBytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  }
  const dim3 grid((params.seqlen_q + kBlockM - 1) / kBlockM, params.nheads, params.batch);
  kernel<<<grid, Traits::kNThreads, kSmemBytes, stream>>>(params);
}

// Tile choice per head dim: kBlockM query rows, kBlockN keys per step, kNWarps warps, and whether the
// Q tile / K,V tiles use a single XOR-ed ldmatrix base register (fewer registers; only where the plain
// form spills). Every entry compiles without spills for sm_80 and sm_90a (nvcc 13.0). Numbers: H200,
// bf16, batch*seqlen = 16384, hidden 2048, TFLOP/s at seqlen 1k / 16k, from the same-machine A/B run
// (tools/harness/fwd_harness.cu functions; 2026-11-21); runs on other H200 machines spread ~5 %.
template <int kHeadDim> struct FwdTileConfig;
template <int kBlockM_, int kBlockN_, int kNWarps_, bool kXorQAddr_ = false, bool kXorKVAddr_ = false,
          int kFlags_ = 0>
struct FwdTileConfigBase {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr bool kXorQAddr = kXorQAddr_, kXorKVAddr = kXorKVAddr_;
  static constexpr int kFlags = kFlags_;  // kFwd* bits of fwd_kernel.cuh
};
// d32: 128 x 64, 4 warps (32 rows per warp); not timed against alternatives (d64's shape).
template <> struct FwdTileConfig<32> : FwdTileConfigBase<128, 64, 4> {};
// d64: 128 x 64, 4 warps: 290 / 327 non-causal, 230 / 317 causal. 128 x 128 x 4 warps (FlashAttention-2's
// choice) spills here and was 2-3 % slower in every run.
template <> struct FwdTileConfig<64> : FwdTileConfigBase<128, 64, 4> {};
// d96: 128 x 64, 4 warps (254 registers); not timed against alternatives.
template <> struct FwdTileConfig<96> : FwdTileConfigBase<128, 64, 4> {};
// d128 (serves 104-128): 128 x 64, 4 warps, XOR Q base, rolled QK^T loop (2 k-steps per trip), lazy
// rescale, K/V pointers from params (fwd_kernel.cuh kFwd* flags): 255 registers, no spills (sm_80 and
// sm_90a, bf16 and fp16). H200 same-machine run (2026-11-21, bf16), TFLOP/s at 1k / 4k / 16k:
// non-causal 348 / 364 / 377, causal 258 / 324 / 353; FlashAttention-2 (SDPA FLASH, same machine, same
// call) 331 / 341 / 346 and 245 / 309 / 327. Replaced: 128 x 32 x 4 warps XOR Q (308 / 338 / 348,
// 244 / 301 / 326); 128 x 64 x 4 warps plain (spills 100-124 bytes; 322 / 342 / 340, 255 / 314 / 338);
// 128 x 64 or 128 x 128 with 8 warps (263-337, 209-344: slower everywhere); lazy rescale without the
// rolled loop was up to 4 % faster at causal 4k but spills 8-40 bytes.
template <> struct FwdTileConfig<128>
    : FwdTileConfigBase<128, 64, 4, true, false, kFwdRolledQK | kFwdRolledQK2 | kFwdLazyRescale | kFwdKVPtrFromParams> {};
// d160, d192: 128 x 64, 8 warps (16 rows per warp keeps O at 80 / 96 registers; 80 / 96 KB shared, under
// the 99 KB per block of sm_86 / sm_89). Not timed against alternatives.
template <> struct FwdTileConfig<160> : FwdTileConfigBase<128, 64, 8> {};
template <> struct FwdTileConfig<192> : FwdTileConfigBase<128, 64, 8> {};
// d224: 64 x 64, 4 warps, XOR Q and K/V bases (every other form tried spills). Not timed against
// alternatives.
template <> struct FwdTileConfig<224> : FwdTileConfigBase<64, 64, 4, true, true> {};
// d256: 64 x 64, 4 warps, XOR Q base (the plain form spills 8 bytes on sm_80): 295 / 330 non-causal,
// 244 / 326 causal (plain form). 128 x 64 x 8 warps (FlashAttention-2's choice) was 5-10 % slower.
template <> struct FwdTileConfig<256> : FwdTileConfigBase<64, 64, 4, true, false> {};

template <int kHeadDim>
bool run_fwd_sm80(const FwdParams& params, cudaStream_t stream) {
  using Cfg = FwdTileConfig<kHeadDim>;
  DTYPE_SWITCH(params.is_bf16, [&] {
    VARIANT_SWITCH(params.is_causal, params.is_local, params.dropout_rng != nullptr, IsCausal, IsLocal, Dropout, [&] {
      launch_fwd_sm80<elem_type, kHeadDim, Cfg::kBlockM, Cfg::kBlockN, Cfg::kNWarps, IsCausal, Cfg::kXorQAddr,
                      Cfg::kXorKVAddr, Cfg::kFlags, IsLocal, Dropout>(params, stream);
    });
  });
  return true;
}

}  // namespace flash_ext
