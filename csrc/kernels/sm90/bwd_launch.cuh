// Launch side of the Hopper backward: tile configuration per head dim, tensor-map encoding, dispatch.
// Instantiate with: template void flash_ext::run_bwd_sm90<D>(const flash_ext::BwdParams&, cudaStream_t);
// Build: -gencode=arch=compute_90a,code=sm_90a (the kernel bodies are empty for any other target).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "../params.h"
#include "../static_switch.h"
#include "bwd_api.h"
#include "bwd_kernel.cuh"

namespace flash_ext {
namespace sm90 {

// Tile choices per head dim (kBlockM query rows per step, kBlockN = 128 keys per CTA, kStages Q / dO slots).
// Measured on one H200 (2026-11-21, bf16, batch*seqlen = 16k, hidden 2048, whole backward incl. preprocess and
// dq conversion, cudaEvent median of 15; all variants in one run; identical kernels differed by 4-8% between
// two passes of the same run, and by ~5% between machines), TFLOP/s at seqlen 1k / 4k / 16k:
// d64 non-causal: kBlockM 128 split by keys 315 / 420 / 440; kBlockM 64 split by keys 272 / 345 / 370,
//   3 stages 280 / 360 / 377, split by columns 264 / 347 / 371, Overlap 218 / 307 / 333 (3 stages 248 / 307 /
//   326); kBlockM 128 split by columns 277 / 402 / 421.
// d64 causal: kBlockM 128 split by columns 218 / 361 / 432; kBlockM 128 split by keys 203 / 357 / 416;
//   kBlockM 64: 210 / 331 / 380 (split by columns 212 / 333 / 396, Overlap 185 / 277 / 326).
// d128 (kBlockM 64; 128 needs more than 240 registers): split by columns, 2 stages 345 / 478 / 497 (second pass
//   330 / 450 / 478; an earlier run 377 / 509 / 525), causal 243 / 422 / 450 (242 / 406 / 492); 3 stages
//   313 / 445 / 486, causal 235 / 409 / 494 (noise-level, more shared memory); split by keys 312 / 409 / 437,
//   causal 213 / 368 / 421. Overlap spills with d128 (S^T, dP^T and dQ live together with dK, dV).
// Persistent (one CTA per SM looping over the tiles; the next tile's K / V load during this tile's dK / dV
// stores), 2026-11-21, torch.profiler time of the main kernel, bf16, same build with / without, non-causal:
//   d64 1k / 2k / 4k / 16k 883 / 1551 / 2915 / 11709 -> 847 / 1523 / 2912 / 11669 us; d128 794 / 1390 / 2829 /
//   11463 -> 774 / 1377 / 2734 / 11514 us (1-5% at 1k-4k, noise at 16k; a second run: d64 1k 881 -> 839, 4k 2949
//   -> 2831, d128 1k 760 -> 749, 4k 2772 -> 2697). Causal with the static round-robin order is much slower (d128
//   16k 5361 -> 8211 us: CTA c gets key blocks c, c + 132, ... and causal tiles shrink with the key block, so the
//   work per CTA differs up to ~3x): causal keeps one CTA per tile (the hardware balances them).
// Causal, persistent with the dynamic tile schedule (BwdKernel::DynamicSched) vs one CTA per tile, 2026-11-21 fourth
// session, harness `pers` (two passes, ABBA), TFLOP/s at 1k / 2k / 4k / 16k, pass 1 then pass 2:
//   d128 298 / 386 / 450 / 512 vs 292 / 383 / 451 / 516; 299 / 385 / 433 / 511 vs 291 / 382 / 451 / 512
//   d64  266 / 334 / 383 / 442 vs 262 / 338 / 395 / 456; 259 / 331 / 380 / 412 vs 248 / 333 / 392 / 430
//   (the d64 kernel at 40 / 232 registers: 24 / 240 spilled). The benchmark (do_bench) agreed: d128 causal +3-4% at
//   1k-2k, equal above; d64 -2..3% at 4k-16k. So d128 causal is persistent (dynamic), d64 causal one CTA per tile.
//   A static longest-first order (key blocks ascending, (kv head, batch) fastest, zig-zag rounds) had been 10-22%
//   slower at 1k-2k: up to 132 heads in flight, each CTA streaming its own Q / dO from DRAM.
// dK / dV epilogue through shared memory and TMA stores (args.dkdv_tma, the default where TMA can describe dk / dv)
// vs 4-byte pair stores from registers, 2026-11-21 fourth session, harness `epi` (two passes, ABBA; whole backward,
// cudaEvent medians), TFLOP/s TMA / pairs at 1k / 2k / 4k / 16k, pass 1 then pass 2:
//   d128 non-causal 396 / 454 / 484 / 504 vs 367 / 440 / 472 / 497; 393 / 453 / 478 / 496 vs 363 / 436 / 466 / 495
//   d128 causal     278 / 373 / 445 / 535 vs 266 / 361 / 433 / 464; 284 / 376 / 413 / 489 vs 264 / 359 / 428 / 478
//   d64 non-causal  379 / 440 / 431 / 455 vs 353 / 399 / 433 / 455; 344 / 399 / 422 / 444 vs 333 / 392 / 414 / 451
//   d64 causal      241 / 322 / 392 / 375 vs 228 / 318 / 378 / 426; 245 / 330 / 384 / 434 vs 228 / 313 / 384 / 420
// (+3..8% at 1k-2k; at 16k within the runs' noise, which the causal 16k rows show.)
// Step order (BwdKernel's Order, see bwd_kernel.cuh): kOrderDkLast (dV, dQ, dK in three groups; dQ leaves while dK
// runs) vs kOrderPlain (dV + dK, dQ; dQ leaves after all), 2026-11-21 fifth session, harness `ord` (two runs of two
// passes each, ABBA; whole backward, cudaEvent medians), DkLast / plain, mean of each run's two passes, 1k / 2k / 4k /
// 16k, run 1 then run 2:
//   d128 non-causal 1.056 / 1.058 / 1.078 / 1.045; 1.046 / 1.084 / 1.066 / 1.048 (e.g. 16k 531 vs 507 TFLOP/s)
//   d128 causal     1.047 / 1.073 / 1.075 / 0.977; 1.043 / 1.119 / 1.062 / 1.019
//   d64 causal      1.074 / 1.056 / 1.065 / 1.030; 1.043 / 1.045 / 1.067 / 1.016
//   d64 non-causal  1.045 / 1.018 / 1.024 / 1.012; 1.016 / 1.037 / 1.019 / 1.028, but this kernel (kBlockM 128,
//                   dQ split by keys: 64 dQ accumulators) spills 20 bytes with DkLast: it stays plain.
//   deterministic (d64 / d128, 1k and 4k): 1.016-1.045.
// Also measured in those runs, not kept: dV issued right after P^T (before dS^T is computed: 8 bytes spilled at
// d128 causal) 0.98-1.08x plain, below DkLast everywhere; dQ first, then dV + dK in one group (no spills), d128
// 0.97-1.07x plain, d64 0.99-1.05x. Issuing the next step's S^T before dQ leaves: ptxas C7514 (a wgmma.wait
// injected), not timed.
template <int kHeadDim, bool IsCausal> struct BwdTile;
template <bool IsCausal> struct BwdTile<64, IsCausal> {
  static constexpr int kBlockM = 128;
  static constexpr int kStages = 2;
  static constexpr bool DqSplitKeys = !IsCausal;
  static constexpr int Order = IsCausal ? kOrderDkLast : kOrderPlain;  // (non-causal: DkLast spills 20 bytes)
  static constexpr int DqMode = kDqConsumer;
  static constexpr bool Persistent = !IsCausal;  // causal: one CTA per tile (the dynamic schedule lost 3% at 4k+)
};
template <bool IsCausal> struct BwdTile<128, IsCausal> {
  static constexpr int kBlockM = 64;
  static constexpr int kStages = 2;
  static constexpr bool DqSplitKeys = false;
  static constexpr int Order = kOrderDkLast;
  static constexpr int DqMode = kDqConsumer;
  static constexpr bool Persistent = true;  // causal: dynamic tile schedule (BwdKernel::DynamicSched)
};

// Deterministic mode (params.deterministic, BwdKernel DetMode kDetDeferred, DqMode kDqWriter): the dQ
// reduce-adds of each query block are ordered by key block through per-block counters, waited on and released
// by the dQ-writer warp (see dq_writer and det_flush in bwd_kernel.cuh). It uses the
// dQ split by columns (the two consumers add disjoint columns, so only the key-block order is serialized), so
// d64 non-causal switches from split by keys to kBlockM 128 split by columns; the other tiles are unchanged.
//
// dQ mode (DqMode, see bwd_kernel.cuh), measured 2026-11-21 (harness `dqw` / `dqwb`, one process, interleaved per
// shape; TFLOP/s at 1k / 4k / 16k, non-causal then causal):
//   default mode: consumers issue the reduces (kept) d64 318 / 446 / 455, 222 / 362 / 439; d128 353 / 490 / 510,
//     248 / 423 / 510. Writer warp (kDqWriter) d64 323 / 433 / 466, 223 / 369 / 444; d128 366 / 492 / 511,
//     253 / 424 / 511: -3..+4%, within noise, so not the default. Writer + fused conversion (the writer of the
//     last contributing key block converted the block; since removed) d64 265 / 344 / 371, 172 / 300 / 375;
//     d128 290 / 397 / 445, 182 / 295 / 366: 13-31% SLOWER.
//   deterministic: the writer warp is the default (kDqWriter): d64 277 / 363 / 452, 185 / 277 / 369; d128
//     338 / 466 / 510, 228 / 372 / 498, against consumer-side deferred (before) d64 222 / 283 / 328, 158 / 232 /
//     324; d128 250 / 321 / 351, 177 / 270 / 341 (+14..+46%); fused conversion d64 237 / 329 / 421, 155 /
//     260 / 360; d128 271 / 389 / 448, 190 / 343 / 485 (slower than kDqWriter everywhere).
template <int kHeadDim, bool IsCausal> struct BwdTileDet : BwdTile<kHeadDim, IsCausal> {
  static constexpr bool DqSplitKeys = false;
  static constexpr int Order = kOrderDkLast;
  static constexpr bool Persistent = false;  // (the counter order relies on the grid order: see det_flush)
  static constexpr int DqMode = kDqWriter;
};

inline bool encode_bwd_maps(BwdTmaArgs& args, const BwdParams& p, int block_m, int block_n) {
  bool ok = true;
  ok = ok && encode_tensor_map_4d(&args.q_map, p.q, p.is_bf16, p.head_dim, p.seqlen_q, p.nheads, p.batch,
                                  p.q_row_stride, p.q_head_stride, p.q_batch_stride, block_m);
  ok = ok && encode_tensor_map_4d(&args.do_map, p.dout, p.is_bf16, p.head_dim, p.seqlen_q, p.nheads, p.batch,
                                  p.do_row_stride, p.do_head_stride, p.do_batch_stride, block_m);
  ok = ok && encode_tensor_map_4d(&args.k_map, p.k, p.is_bf16, p.head_dim, p.seqlen_k, p.nheads_k, p.batch,
                                  p.k_row_stride, p.k_head_stride, p.k_batch_stride, block_n);
  ok = ok && encode_tensor_map_4d(&args.v_map, p.v, p.is_bf16, p.head_dim, p.seqlen_k, p.nheads_k, p.batch,
                                  p.v_row_stride, p.v_head_stride, p.v_batch_stride, block_n);
  return ok;
}

// dK / dV through TMA stores (args.dkdv_tma) where TMA can describe both (16-byte aligned bases and strides, which
// the API's contiguous dk / dv have); otherwise the kernel writes them as 4-byte pairs. Box: 64 columns x 64 keys.
inline void encode_dkdv_maps(BwdTmaArgs& args, const BwdParams& p) {
  args.dkdv_tma =
      tma_layout_ok(p.dk, p.seqlen_k, p.nheads_k, p.batch, p.dk_row_stride, p.dk_head_stride, p.dk_batch_stride) &&
      tma_layout_ok(p.dv, p.seqlen_k, p.nheads_k, p.batch, p.dv_row_stride, p.dv_head_stride, p.dv_batch_stride) &&
      encode_tensor_map_4d(&args.dk_map, p.dk, p.is_bf16, p.head_dim, p.seqlen_k, p.nheads_k, p.batch,
                           p.dk_row_stride, p.dk_head_stride, p.dk_batch_stride, 64) &&
      encode_tensor_map_4d(&args.dv_map, p.dv, p.is_bf16, p.head_dim, p.seqlen_k, p.nheads_k, p.batch,
                           p.dv_row_stride, p.dv_head_stride, p.dv_batch_stride, 64);
}

template <typename T, int kHeadDim, int kBlockM, int kStages, bool IsCausal, bool DqSplitKeys, int Order,
          int DetMode = kDetOff, int DqMode = kDqConsumer, bool Persistent = false>
bool launch_bwd_sm90(const BwdParams& params, cudaStream_t stream, bool allow_dkdv_tma = true) {
  using Kernel = BwdKernel<T, kHeadDim, kBlockM, kStages, IsCausal, DqSplitKeys, Order, DetMode, DqMode, Persistent>;
  // Deterministic kernels need the counters (zeroed by the preprocess kernel below); sm90_bwd_supported checks
  // that the API allocated them.
  if (DetMode != kDetOff && params.dq_semaphore == nullptr) return false;
  BwdTmaArgs args;
  args.params = params;
  if (!encode_bwd_maps(args, params, Kernel::kBlockM, Kernel::kBlockN)) return false;  // sm90_bwd_supported said no
  args.num_m_blocks = (params.seqlen_q + Kernel::kBlockM - 1) / Kernel::kBlockM;
  encode_dkdv_maps(args, params);
  if (!allow_dkdv_tma) args.dkdv_tma = 0;  // (comparisons: the 4-byte pair stores)
  launch_bwd_preprocess<T, kHeadDim>(params, stream);
  // x = key block is the fastest grid dimension: the deterministic mode relies on CTAs of lower x of the same
  // (kv head, batch) being launched no later than higher ones (see det_flush).
  dim3 grid_main((params.seqlen_k + Kernel::kBlockN - 1) / Kernel::kBlockN, params.nheads_k, params.batch);
  if constexpr (Persistent) {
    const int64_t tiles = static_cast<int64_t>(grid_main.x) * grid_main.y * grid_main.z;
    const int num_sm = params.num_sm > 0 ? params.num_sm : 132;
    grid_main = dim3(static_cast<unsigned>(tiles < num_sm ? tiles : num_sm), 1, 1);
  }
  auto kernel = bwd_main_sm90<Kernel>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<grid_main, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  launch_bwd_convert_dq<T, kHeadDim, Kernel::kNDq>(params, stream);
  return true;
}

}  // namespace sm90

template <int kHeadDim>
bool run_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  return DTYPE_SWITCH(params.is_bf16, [&] {
    return BOOL_SWITCH(params.is_causal, IsCausal, [&] {
      if (params.deterministic) {
        using Tile = sm90::BwdTileDet<kHeadDim, IsCausal>;
        return sm90::launch_bwd_sm90<elem_type, kHeadDim, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys,
                              Tile::Order, sm90::kDetDeferred, Tile::DqMode>(params, stream);
      } else {
        using Tile = sm90::BwdTile<kHeadDim, IsCausal>;
        return sm90::launch_bwd_sm90<elem_type, kHeadDim, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys,
                              Tile::Order, sm90::kDetOff, Tile::DqMode, Tile::Persistent>(params, stream);
      }
    });
  });
}

}  // namespace flash_ext
