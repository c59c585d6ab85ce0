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

// Tile choices per head dim (kBlockM query rows per step, kBlockN = 128 keys per CTA, kStages Q / dO slots), each
// measured on one H200 (2026-11-21, bf16, whole backward; NOTES.md, "Backward: experiment variants removed from the
// product kernels", has the numbers). d64: kBlockM 128, non-causal split by keys (315 / 420 / 440 TFLOP/s at
// 1k / 4k / 16k vs 277 / 402 / 421 by columns), causal by columns. d128: kBlockM 64 (128 needs more than 240
// registers), split by columns. Persistent (the next tile's K / V load during this tile's dK / dV stores): 1-5% at
// 1k-4k non-causal; causal d128 with the dynamic tile schedule +3-4% at 1k-2k, d64 causal -2..3% at 4k+ (one CTA
// per tile). DkLast (dQ leaves while dK runs): 1.02-1.12x the plain order; d64 non-causal (64 dQ accumulators, split
// by keys) would spill 20 bytes with it and stays plain.
template <int kHeadDim, bool IsCausal> struct BwdTile;
template <bool IsCausal> struct BwdTile<64, IsCausal> {
  static constexpr int kBlockM = 128;
  static constexpr int kStages = 2;
  static constexpr bool DqSplitKeys = !IsCausal;
  static constexpr bool DkLast = IsCausal;  // (non-causal: DkLast spills 20 bytes)
  static constexpr bool Persistent = !IsCausal;  // causal: one CTA per tile (the dynamic schedule lost 3% at 4k+)
};
template <bool IsCausal> struct BwdTile<128, IsCausal> {
  static constexpr int kBlockM = 64;
  static constexpr int kStages = 2;
  static constexpr bool DqSplitKeys = false;
  static constexpr bool DkLast = true;
  static constexpr bool Persistent = true;  // causal: dynamic tile schedule (BwdKernel::DynamicSched)
};

// Deterministic mode (params.deterministic, BwdKernel's Deterministic): the dQ reduce-adds of each query block are
// ordered by key block through per-block counters, waited on and released by the dQ-writer warp (dq_writer in
// bwd_kernel.cuh; +14..46% over a consumer-side wait, H200, NOTES.md). It needs the dQ split by columns, so d64
// non-causal switches from split by keys to split by columns; the other tiles are unchanged.
template <int kHeadDim, bool IsCausal> struct BwdTileDet : BwdTile<kHeadDim, IsCausal> {
  static constexpr bool DqSplitKeys = false;
  static constexpr bool DkLast = true;
  static constexpr bool Persistent = false;  // (the counter order relies on the grid order: see dq_writer)
};

inline bool encode_bwd_maps(BwdTmaArgs& args, const BwdParams& p, int block_m, int block_n) {
  return encode_q_side(&args.q_map, p, p.q, p.q_row_stride, p.q_head_stride, p.q_batch_stride, block_m) &&
         encode_q_side(&args.do_map, p, p.dout, p.do_row_stride, p.do_head_stride, p.do_batch_stride, block_m) &&
         encode_k_side(&args.k_map, p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride, block_n) &&
         encode_k_side(&args.v_map, p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride, block_n);
}

// dK / dV through TMA stores (args.dkdv_tma) where TMA can describe both (16-byte aligned bases and strides, which
// the API's contiguous dk / dv have); otherwise the kernel writes them as 4-byte pairs. Box: 64 columns x 64 keys.
// (H200: TMA +3..8% over the pairs at 1k-2k, noise at 16k; NOTES.md.)
inline void encode_dkdv_maps(BwdTmaArgs& args, const BwdParams& p) {
  args.dkdv_tma =
      tma_layout_ok(p.dk, p.seqlen_k, p.nheads_k, p.batch, p.dk_row_stride, p.dk_head_stride, p.dk_batch_stride) &&
      tma_layout_ok(p.dv, p.seqlen_k, p.nheads_k, p.batch, p.dv_row_stride, p.dv_head_stride, p.dv_batch_stride) &&
      encode_k_side(&args.dk_map, p, p.dk, p.dk_row_stride, p.dk_head_stride, p.dk_batch_stride, 64) &&
      encode_k_side(&args.dv_map, p, p.dv, p.dv_row_stride, p.dv_head_stride, p.dv_batch_stride, 64);
}

template <typename T, int kHeadDim, int kBlockM, int kStages, bool IsCausal, bool DqSplitKeys, bool DkLast,
          bool Deterministic = false, bool Persistent = false, bool IsLocal = false, bool Dropout = false>
bool launch_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  using Kernel =
      BwdKernel<T, kHeadDim, kBlockM, kStages, IsCausal, DqSplitKeys, DkLast, Deterministic, Persistent, IsLocal, Dropout>;
  // Deterministic kernels need the counters (zeroed by the preprocess kernel below); sm90_bwd_supported checks
  // that the API allocated them.
  if (Deterministic && params.dq_semaphore == nullptr) return false;
  BwdTmaArgs args;
  args.params = params;
  if (!encode_bwd_maps(args, params, Kernel::kBlockM, Kernel::kBlockN)) return false;  // sm90_bwd_supported said no
  args.num_m_blocks = (params.seqlen_q + Kernel::kBlockM - 1) / Kernel::kBlockM;
  encode_dkdv_maps(args, params);
  launch_bwd_preprocess<T, kHeadDim, IsLocal>(params, stream);  // (the general path reads varlen batches)
  const dim3 grid_main = Kernel::Scheduler::grid(params);  // (key blocks fastest: see bwd_scheduler.cuh)
  auto kernel = sm90_kernel<Kernel, BwdTmaArgs>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kernel::kSmemBytes);
  kernel<<<grid_main, Kernel::kNThreads, Kernel::kSmemBytes, stream>>>(args);
  launch_bwd_convert_dq<T, kHeadDim, Kernel::kNDq, IsLocal>(params, stream);
  return true;
}

}  // namespace sm90

template <int kHeadDim>
bool run_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  return DTYPE_SWITCH(params.is_bf16, [&] {
    // (The local mask runs in the non-causal tiles: MASK_SWITCH.)
    return VARIANT_SWITCH(params.is_causal, params.is_local, params.dropout_rng != nullptr, IsCausal, IsLocal, Dropout, [&] {
      if (params.deterministic) {
        using Tile = sm90::BwdTileDet<kHeadDim, IsCausal>;
        return sm90::launch_bwd_sm90<elem_type, kHeadDim, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys,
                                     Tile::DkLast, true, false, IsLocal, Dropout>(params, stream);
      } else {
        using Tile = sm90::BwdTile<kHeadDim, IsCausal>;
        return sm90::launch_bwd_sm90<elem_type, kHeadDim, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys,
                                     Tile::DkLast, false, Tile::Persistent, IsLocal, Dropout>(params, stream);
      }
    });
  });
}

}  // namespace flash_ext
