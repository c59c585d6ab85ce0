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

// Tile shapes per head dim (kBlockM = 64 * kNumWG: one consumer warpgroup per 64 query rows).
// Measured on one H200 (2026-11-21, bf16, batch*seqlen = 16k, hidden 2048, median of 3 interleaved rounds of
// event-timed medians; the machine was shared and identical kernels differed by up to ~10% between runs):
// d64: kBlockN 192 and 3 stages no better than 128 / 2 (e.g. 16k: 446 vs 438 TFLOP/s); no ping-pong -2..8%.
// d128: kBlockN 176 (FA3's non-causal choice) spills 32-56 B with this code and was 431-608 vs 494-597;
//   3 stages 514 vs 530 at 4k; ping-pong off 510 / 536 / 611 vs 535 / 547 / 610 (1k / 4k / 16k).
// d256: ping-pong on spills with the persistent loop; 664 vs 651 at 16k before that, 2-5% either way.
// d64, 3 consumer warpgroups (kBlockM 192, 160 registers each, so no second P buffer), 2026-11-21 run 2 of
//   the second series, same process, median of 5 rounds: non-causal 1k / 4k / 16k 386 / 441 / 480 (no
//   ping-pong) and 385 / 428 / 468 (ping-pong) vs 369 / 397 / 413 with 2; causal 263 / 398 / 454 (ping-pong,
//   token chained over tiles) vs 275 / 363 / 414: causal seqlen_q <= 1024 keeps 2 warpgroups (FwdTileShort).
//   kBlockN 96: 2-8% slower; 3 stages: noise. Software exp2 for part of P (kSwExpMask) was slower by 0-2% for
//   1/8 of the columns and 8% for 1/2 (d64 is not bound by MUFU throughput here; see NOTES.md).
// DoubleP (second P buffer): d128 535 / 547 / 610 vs 516 / 545 / 620, causal 16k 607 vs 623: noise-level;
//   d256 670 vs 694 non-causal, 751 vs 728 causal 16k: kept off there (fewer registers).
// WgSkip (causal d64 and d256). d64 (3 warpgroups): with kBlockM 192 > kBlockN 128 the diagonal crosses two key
//   blocks, and without it every warpgroup visited the tile's blocks that only the lower warpgroups' rows see (the
//   useful share of the visited work: 0.85 / 0.89 / 0.97 at 2k / 4k / 16k; 0.94 / 0.97 / 0.99 with it). Harness
//   dobench, 2026-11-21 sixth session, TFLOP/s at 1k / 2k / 4k / 16k: 276 / 375 / 428 / 469 vs 260 / 338 / 393 / 461
//   (the 2-warpgroup short kernel 289 at 1k, so FwdTileShort stays). Non-causal (it only skips the rows past
//   seqlen_q of a last tile): 385 / 445 / 457 / 485 vs 394 / 448 / 462 / 483, noise-level: kept off there.
//   A second run: causal 374 / 423 / 469 vs 337 / 390 / 462. d256 causal (kBlockN 80: the first warpgroup skips
//   about one block per tile): 421 / 533 / 596 / 672 vs 403 / 513 / 600 / 684, on there too. d128 (kBlockM =
//   kBlockN = 128): nothing to skip at seqlen_q = seqlen_k.
template <int kHeadDim, bool IsCausal> struct FwdTile;
template <bool IsCausal> struct FwdTile<64, IsCausal> {
  static constexpr int kBlockN = 128, kStages = 2, kNumWG = 3;
  static constexpr bool PingPong = IsCausal, DoubleP = false, ChainTiles = IsCausal, WgSkip = IsCausal;
};
template <bool IsCausal> struct FwdTile<128, IsCausal> {
  static constexpr int kBlockN = 128, kStages = 2, kNumWG = 2;
  static constexpr bool PingPong = true, DoubleP = true, ChainTiles = false, WgSkip = false;
};
template <bool IsCausal> struct FwdTile<256, IsCausal> {
  static constexpr int kBlockN = 80, kStages = 2, kNumWG = 2;  // Q 64 KiB + 2 x (K 40 + V 40) KiB = 224 of 227
  static constexpr bool PingPong = false, DoubleP = false, ChainTiles = false, WgSkip = IsCausal;
};
// Where FwdTile differs for short causal problems (seqlen_q <= kShortSeqlenQ): d64 keeps 2 warpgroups.
constexpr int kShortSeqlenQ = 1024;
template <int kHeadDim, bool IsCausal> struct FwdTileShort : FwdTile<kHeadDim, IsCausal> {
  static constexpr bool kDiffers = false;
};
template <> struct FwdTileShort<64, true> {
  static constexpr bool kDiffers = true;
  static constexpr int kBlockN = 128, kStages = 2, kNumWG = 2;
  static constexpr bool PingPong = true, DoubleP = true, ChainTiles = false, WgSkip = false;
};

// Where FwdTile differs for long keys (seqlen_k >= kLongSeqlenK): d128 non-causal takes 144 keys per block (fewer
// block iterations, each with more work per softmax; 0 spills). Harness dobench, 2026-11-21 fourth session, d128
// non-causal, kBlockN 144 vs 128 (TFLOP/s): 1k 495 vs 538, 2k 567 vs 577, 4k 609 vs 599, 16k 632 vs 611 (the
// variant without the second P buffer: 500 / 568 / 606 / 630); causal 144 was slower at 1k-4k (380 / 451 / 526 vs
// 412 / 469 / 539) and equal at 16k: causal keeps 128.
constexpr int kLongSeqlenK = 4096;
template <int kHeadDim, bool IsCausal> struct FwdTileLong : FwdTile<kHeadDim, IsCausal> {
  static constexpr bool kDiffers = false;
};
template <> struct FwdTileLong<128, false> : FwdTile<128, false> {
  static constexpr bool kDiffers = true;
  static constexpr int kBlockN = 144;
};

inline bool encode_fwd_maps(FwdTmaArgs& args, const FwdParams& p, int block_m, int block_n) {
  bool ok = true;
  ok = ok && encode_tensor_map_4d(&args.q_map, p.q, p.is_bf16, p.head_dim, p.seqlen_q, p.nheads, p.batch,
                                  p.q_row_stride, p.q_head_stride, p.q_batch_stride, block_m);
  ok = ok && encode_tensor_map_4d(&args.k_map, p.k, p.is_bf16, p.head_dim, p.seqlen_k, p.nheads_k, p.batch,
                                  p.k_row_stride, p.k_head_stride, p.k_batch_stride, block_n);
  ok = ok && encode_tensor_map_4d(&args.v_map, p.v, p.is_bf16, p.head_dim, p.seqlen_k, p.nheads_k, p.batch,
                                  p.v_row_stride, p.v_head_stride, p.v_batch_stride, block_n);
  ok = ok && encode_tensor_map_4d(&args.o_map, p.out, p.is_bf16, p.head_dim, p.seqlen_q, p.nheads, p.batch,
                                  p.o_row_stride, p.o_head_stride, p.o_batch_stride, 64);
  return ok;
}

// Tile order and L2. Persistent grids (non-causal; causal with short tiles, paired): one (head, batch) pair per
// group, i.e. all query blocks of a head before the next head, so the CTAs running at once cover few heads and read
// each K / V block at about the same time (L2 hits). Causal with one CTA per tile: groups of (head, batch) pairs
// whose K / V total kL2GroupBytes, query blocks longest first across the group, which balances the unequal tiles
// better.
// H200, bf16, 16k tokens x 2048 hidden, the benchmark's timing (back-to-back calls, L2 flushed before each; harness
// `dobench`, 2026-11-21 fourth session), TFLOP/s at 1k / 2k / 4k / 16k, 32 MiB groups (before) -> 1 pair:
//   d128 non-causal 459 / 506 / 547 / 582 -> 516 / 548 / 583 / 606 (2, 4 and 8 pairs: within ~3% of 1);
//   d256 non-causal 526 / 601 / 635 / 682 -> 559 / 607 / 647 / 683; d64 non-causal 380 / 428 / 442 / 478 -> 386 /
//   440 / 450 / 481. Causal with 1 pair: d128 1k (persistent, paired) 385 -> 401 and, in a second run, 400 -> 418;
//   d64 1k (persistent, paired, 2 warpgroups) 284 -> 287; one CTA per tile: d128 2k-16k within noise or worse (2nd
//   run 471 / 546 -> 458 / 519 at 2k / 4k), d256 2k / 4k 516 / 596 -> 479 / 548: those keep the groups.
constexpr int64_t kL2GroupBytes = 32ll << 20;

// grid_limit: 0 picks the default: persistent (one CTA per SM, static zig-zag over tiles) when not causal,
// and when causal with few query blocks (<= 8, or <= kCausalPersistMaxMBlocks128 at d128) and a separate O buffer
// (kHeadDim <= 128); otherwise
// one CTA per tile, so the hardware's block scheduler balances the unequal causal tiles dynamically.
// H200, bf16, causal, persistent vs one CTA per tile: d64 282 vs 241 TFLOP/s at 1k, 375 vs 382 at 4k,
// 402 vs 439 at 16k; d128 356 vs 348 at 1k, 455 vs 548 at 4k, 470 vs 596 at 16k; d256 293 vs 370 at 1k.
// Non-causal, persistent vs not: d64 391 vs 344 at 1k; d128 504-535 vs 462 at 1k; equal at 16k.
// grid_limit < 0 forces persistent, > 0 caps the CTAs (comparisons).
// paired (causal, persistent only): -1 (default) or 1 runs the paired schedule (see FwdTmaArgs), 0 the zig-zag
// rounds. 2026-11-21, same process, median of 5 rounds, 1k causal: d128 387 vs 349 TFLOP/s (zig-zag), d64 274 vs
// 275 (noise). A model with per-tile cost = key blocks + 1 gives 83% balance for zig-zag, 97% for pairs.
// group_hb > 0 overrides the L2 grouping (comparisons).
// CrossTile (next tile's first S before this tile's epilogue) is an option, not a default: d128 1k +2-3% in
// two runs (474 vs 459), noise-level; d128 causal 4k / 16k -3..4% with DoubleP; d64 (2 or 3 warpgroups) no gain.
// Causal d128 (2 warpgroups, kBlockM 128) stays persistent (paired) up to 32 query blocks (seqlen_q 4096): harness
// dobench, 2026-11-21 fifth session (with the one-pair L2 groups), persistent paired vs one CTA per tile, TFLOP/s at
// 1k / 2k / 4k / 16k: 406 / 490 / 549 / 598 vs 408 / 459 / 528 / 602. d64 (3 warpgroups above 1k): persistent
// paired 327 / 394 at 2k / 4k vs 335 / 394 (and the 2-warpgroup kernel persistent 344 / 382): unchanged, 8.
constexpr int kCausalPersistMaxMBlocks128 = 32;
template <typename T, int kHeadDim, int kBlockN, int kStages, bool IsCausal, bool PingPong, bool DoubleP,
          int kSwExpMask = 0, bool ChainTiles = false, int kNumWG = 2, bool CrossTile = false, bool WgSkip = false>
bool launch_fwd_sm90(const FwdParams& params, cudaStream_t stream, int grid_limit = 0, int paired = -1,
                     int group_hb = 0) {
  using Kernel = FwdKernel<T, kHeadDim, kBlockN, kStages, IsCausal, PingPong, DoubleP, kSwExpMask, ChainTiles, kNumWG,
                           CrossTile, WgSkip>;
  FwdTmaArgs args;
  args.params = params;
  if (!encode_fwd_maps(args, params, Kernel::kBlockM, kBlockN)) return false;  // sm90_fwd_supported said no
  args.num_m_blocks = (params.seqlen_q + Kernel::kBlockM - 1) / Kernel::kBlockM;
  args.num_hb = params.nheads * params.batch;
  args.num_tiles = args.num_m_blocks * args.num_hb;
  // Query heads h_h_k_ratio apart share one K/V head: a group of G pairs reads G / ratio heads' K and V.
  const int64_t kv_bytes = static_cast<int64_t>(params.seqlen_k) * kHeadDim * 2 * 2;
  const int num_sm = params.num_sm > 0 ? params.num_sm : 132;
  const int causal_persist_max_m = kHeadDim == 128 && kNumWG == 2 ? kCausalPersistMaxMBlocks128 : 8;
  const bool persistent =
      !IsCausal || ((Kernel::SeparateO || CrossTile) && args.num_m_blocks <= causal_persist_max_m);
  const int limit = grid_limit > 0 ? grid_limit : grid_limit < 0 ? num_sm : persistent ? num_sm : args.num_tiles;
  int64_t group = limit < args.num_tiles ? 1 : kL2GroupBytes * params.h_h_k_ratio / (kv_bytes > 0 ? kv_bytes : 1);
  if (group_hb > 0) group = group_hb;
  args.group_hb = static_cast<int>(group < 1 ? 1 : group > args.num_hb ? args.num_hb : group);
  args.paired = IsCausal && limit < args.num_tiles && paired != 0 ? 1 : 0;
  if (args.paired) args.num_tiles = 2 * ((args.num_m_blocks + 1) / 2) * args.num_hb;
  const int units = args.paired ? args.num_tiles / 2 : args.num_tiles;  // what one CTA takes per round
  const int ctas = units < limit ? units : limit;
  auto kernel = fwd_kernel_sm90<Kernel>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<ctas, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  return true;
}

}  // namespace sm90

template <int kHeadDim>
bool run_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  return DTYPE_SWITCH(params.is_bf16, [&] {
    return BOOL_SWITCH(params.is_causal, IsCausal, [&] {
      using Tile = sm90::FwdTile<kHeadDim, IsCausal>;
      using Short = sm90::FwdTileShort<kHeadDim, IsCausal>;
      using Long = sm90::FwdTileLong<kHeadDim, IsCausal>;
      if (Long::kDiffers && params.seqlen_k >= sm90::kLongSeqlenK) {
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Long::kBlockN, Long::kStages, IsCausal, Long::PingPong,
                              Long::DoubleP, 0, Long::ChainTiles, Long::kNumWG, false,
                              Long::WgSkip>(params, stream);
      } else if (Short::kDiffers && params.seqlen_q <= sm90::kShortSeqlenQ) {
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Short::kBlockN, Short::kStages, IsCausal, Short::PingPong,
                              Short::DoubleP, 0, Short::ChainTiles, Short::kNumWG, false,
                              Short::WgSkip>(params, stream);
      } else {
        return sm90::launch_fwd_sm90<elem_type, kHeadDim, Tile::kBlockN, Tile::kStages, IsCausal, Tile::PingPong,
                              Tile::DoubleP, 0, Tile::ChainTiles, Tile::kNumWG, false,
                              Tile::WgSkip>(params, stream);
      }
    });
  });
}

}  // namespace flash_ext
