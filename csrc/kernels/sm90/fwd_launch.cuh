// Launch side of the Hopper forward: tile configuration per head dim, tensor-map encoding, dispatch.
// Instantiate with: template void flash_ext::run_fwd_sm90<D>(const flash_ext::FwdParams&, cudaStream_t);
// Build: -gencode=arch=compute_90a,code=sm_90a (the kernel body is empty for any other target).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "../params.h"
#include "../static_switch.h"
#include "fwd_api.h"
#include "fwd_kernel.cuh"

namespace flash_ext {
namespace sm90 {

// Tile shapes per head dim (kBlockM = 64 * kNumWG: one consumer warpgroup per 64 query rows). Each choice was
// measured on one H200, bf16, 16k tokens x 2048 hidden (TFLOP/s); NOTES.md (eighth session) has the full numbers.
template <int kHeadDim, bool IsCausal> struct FwdTile;
// d64: 3 warpgroups non-causal 441 / 480 vs 397 / 413 with 2 at 4k / 16k; causal WgSkip 375 / 428 vs 338 / 393 (2k / 4k).
template <bool IsCausal> struct FwdTile<64, IsCausal> {
  static constexpr int kBlockN = 128, kStages = 2, kNumWG = 3;
  static constexpr bool PingPong = IsCausal, DoubleP = false, ChainTiles = IsCausal, WgSkip = IsCausal;
};
// d128: ping-pong 535 / 547 vs 510 / 536 at 1k / 4k; kBlockN 176 spilled; DoubleP noise-level.
template <bool IsCausal> struct FwdTile<128, IsCausal> {
  static constexpr int kBlockN = 128, kStages = 2, kNumWG = 2;
  static constexpr bool PingPong = true, DoubleP = true, ChainTiles = false, WgSkip = false;
};
// d256: ping-pong spills with the persistent loop; DoubleP 670 vs 694 at 16k; causal WgSkip 421 / 533 vs 403 / 513.
template <bool IsCausal> struct FwdTile<256, IsCausal> {
  static constexpr int kBlockN = 80, kStages = 2, kNumWG = 2;  // Q 64 KiB + 2 x (K 40 + V 40) KiB = 224 of 227
  static constexpr bool PingPong = false, DoubleP = false, ChainTiles = false, WgSkip = IsCausal;
};
// Where FwdTile differs for short causal problems (seqlen_q <= kShortSeqlenQ): d64 keeps 2 warpgroups (1k: 286-289
// vs 276 TFLOP/s with 3 and WgSkip).
constexpr int kShortSeqlenQ = 1024;
template <int kHeadDim, bool IsCausal> struct FwdTileShort : FwdTile<kHeadDim, IsCausal> {
  static constexpr bool kDiffers = false;
};
template <> struct FwdTileShort<64, true> {
  static constexpr bool kDiffers = true;
  static constexpr int kBlockN = 128, kStages = 2, kNumWG = 2;
  static constexpr bool PingPong = true, DoubleP = true, ChainTiles = false, WgSkip = false;
};

// Where FwdTile differs for long keys (seqlen_k >= kLongSeqlenK): d128 non-causal takes 144 keys per block, 0 spills
// (H200 dobench: 609 / 632 vs 599 / 611 TFLOP/s at 4k / 16k, slower below 4k and for causal; NOTES.md fourth session).
constexpr int kLongSeqlenK = 4096;
template <int kHeadDim, bool IsCausal> struct FwdTileLong : FwdTile<kHeadDim, IsCausal> {
  static constexpr bool kDiffers = false;
};
template <> struct FwdTileLong<128, false> : FwdTile<128, false> {
  static constexpr bool kDiffers = true;
  static constexpr int kBlockN = 144;
};

inline bool encode_fwd_maps(FwdTmaArgs& args, const FwdParams& p, int block_m, int block_n) {
  return encode_q_side(&args.q_map, p, p.q, p.q_row_stride, p.q_head_stride, p.q_batch_stride, block_m) &&
         encode_k_side(&args.k_map, p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride, block_n) &&
         encode_k_side(&args.v_map, p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride, block_n) &&
         encode_q_side(&args.o_map, p, p.out, p.o_row_stride, p.o_head_stride, p.o_batch_stride, 64);
}

// The tile order and its L2 grouping: Kernel::Scheduler (fwd_scheduler.cuh), which also gives the grid.
// grid_limit: 0 picks the default: persistent (one CTA per SM, static order over tiles) when not causal, and when
// causal with few query blocks (<= 8, or <= kCausalPersistMaxMBlocks128 at d128) and a separate O buffer
// (kHeadDim <= 128); otherwise one CTA per tile, so the hardware's block scheduler balances the unequal causal tiles.
// H200, causal, persistent vs one CTA per tile: d128 470 vs 596 TFLOP/s at 16k; paired d128 490 / 549 vs 459 / 528 at
// 2k / 4k (hence 32 blocks), d64 equal at 2k / 4k (8).
// grid_limit < 0 forces persistent, > 0 caps the CTAs; paired 0 forces the zig-zag rounds where the paired causal
// schedule would run (1k causal d128 387 vs 349 TFLOP/s); group_hb > 0 overrides the L2 grouping (harness comparisons).
constexpr int kCausalPersistMaxMBlocks128 = 32;
template <typename T, int kHeadDim, int kBlockN, int kStages, bool IsCausal, bool PingPong, bool DoubleP,
          bool ChainTiles, int kNumWG, bool WgSkip, bool IsLocal = false, bool Dropout = false>
bool launch_fwd_sm90(const FwdParams& params, cudaStream_t stream, int grid_limit = 0, int paired = -1,
                     int group_hb = 0) {
  using Kernel = FwdKernel<T, kHeadDim, kBlockN, kStages, IsCausal, PingPong, DoubleP, ChainTiles, kNumWG, WgSkip,
                           IsLocal, Dropout>;
  FwdTmaArgs args;
  args.params = params;
  if (!encode_fwd_maps(args, params, Kernel::kBlockM, kBlockN)) return false;  // sm90_fwd_supported said no
  using Scheduler = typename Kernel::Scheduler;
  const int num_sm = params.num_sm > 0 ? params.num_sm : 132;
  const int causal_persist_max_m = kHeadDim == 128 && kNumWG == 2 ? kCausalPersistMaxMBlocks128 : 8;
  // Varlen (the general path): one CTA per tile (fwd_scheduler.cuh), the ragged tiles balanced by the hardware.
  const bool varlen = IsLocal && params.cu_seqlens_q != nullptr;
  const bool persistent =
      !varlen && (!IsCausal || (Kernel::SeparateO && Scheduler::num_m_blocks(params) <= causal_persist_max_m));
  const int max_ctas = grid_limit > 0 ? grid_limit : grid_limit < 0 || persistent ? num_sm : 0;  // 0: one per tile
  const int ctas = Scheduler::grid(args.sched, params, kHeadDim, max_ctas, paired, group_hb);
  auto kernel = sm90_kernel<Kernel, FwdTmaArgs>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<ctas, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  return true;
}

}  // namespace sm90

template <int kHeadDim>
bool run_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  return DTYPE_SWITCH(params.is_bf16, [&] {
    if (params.is_local) {  // the local mask (window / chunks): the non-causal tile, one shape for every length
      using Tile = sm90::FwdTile<kHeadDim, false>;
      return BOOL_SWITCH(params.dropout_rng != nullptr, Dropout, [&] {  // (dropout: an instantiation of its own)
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Tile::kBlockN, Tile::kStages, false, Tile::PingPong,
                                     Tile::DoubleP, Tile::ChainTiles, Tile::kNumWG, Tile::WgSkip, true, Dropout>(
            params, stream);
      });
    }
    return BOOL_SWITCH(params.is_causal, IsCausal, [&] {
      using Tile = sm90::FwdTile<kHeadDim, IsCausal>;
      using Short = sm90::FwdTileShort<kHeadDim, IsCausal>;
      using Long = sm90::FwdTileLong<kHeadDim, IsCausal>;
      if (Long::kDiffers && params.seqlen_k >= sm90::kLongSeqlenK) {
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Long::kBlockN, Long::kStages, IsCausal, Long::PingPong,
                              Long::DoubleP, Long::ChainTiles, Long::kNumWG, Long::WgSkip>(params, stream);
      } else if (Short::kDiffers && params.seqlen_q <= sm90::kShortSeqlenQ) {
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Short::kBlockN, Short::kStages, IsCausal, Short::PingPong,
                              Short::DoubleP, Short::ChainTiles, Short::kNumWG, Short::WgSkip>(params, stream);
      } else {
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Tile::kBlockN, Tile::kStages, IsCausal, Tile::PingPong,
                              Tile::DoubleP, Tile::ChainTiles, Tile::kNumWG, Tile::WgSkip>(params, stream);
      }
    });
  });
}

}  // namespace flash_ext
