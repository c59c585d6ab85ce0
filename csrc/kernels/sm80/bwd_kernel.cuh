// FlashAttention backward for the sm80 family (mma.sync m16n8k16 + ldmatrix + cp.async; runs on sm_80
// and newer, including the H100/H200). Torch-free.
//
// Kernels (launched in this order by run_bwd_sm80, bwd_launch.cuh):
//  1. bwd_preprocess_kernel: D = rowsum(dO * O) (fp32) into dsoftmax_sum; zeroes dq_accum (atomic mode).
//  2. bwd_dkdv_tiled_kernel (bwd_tiled_kernel.cuh, the default for every head dim), or bwd_dkdv_kernel
//     below (the fallback for devices with less shared memory per block, e.g. the A100):
//     bwd_dkdv_kernel: one CTA per (key block, batch, K/V head). K_j, V_j stay in shared memory; the
//     CTA loops over the query heads of its GQA group and the query blocks that can see the key block
//     (Q_i, dO_i, lse, D double-buffered with cp.async). The S matrix is computed transposed,
//     S^T = K Q^T, so that each warp owns 16 key rows: P^T and dS^T are born in the accumulator layout of
//     the warp that needs them as the A operand of dV += P^T dO and dK += dS^T Q (no shared-memory
//     round trip for P). dK, dV of the whole group accumulate in registers: no atomics, deterministic.
//     In atomic mode dS^T also goes to shared memory and dQ_i += dS K is added into dq_accum (fp32 red).
//  3. bwd_convert_dq_kernel: dq = dq_accum * scale in the element type (atomic mode), or
//     bwd_dq_kernel (deterministic mode): one CTA per (query block, head, batch) recomputes P and dP
//     and accumulates dQ in registers, writing dq directly.
#pragma once
#include <cstdint>
#include <cmath>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "../params.h"
#include "../ptx.cuh"
#include "../mask.cuh"
#include "../score_mod.cuh"
#include "../dropout.cuh"
#include "../seqinfo.cuh"

namespace flash_ext {
namespace bwd_sm80 {

constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory tiles are row-major with each row padded by 8 elements (16 bytes): a row is
// kHeadDim/8 + 1 sixteen-byte chunks, an odd number, so the 8 row addresses of one ldmatrix phase
// (and the 8 rows one cp.async phase writes) fall in 8 distinct bank groups: conflict-free without XOR.

// ---- per-lane ldmatrix address offsets (in elements), for a tile with row stride kStride ----------
// A operand (16x16), tile stored [m][k]: matrices (rows 0-7|8-15) x (cols 0-7|8-15) in a0..a3 order.
template <int kStride>
__device__ __forceinline__ int lane_off_a(int lane) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
}
// Two B operands (k16 x n8, n-tiles n0 and n0+8), tile stored [n][k] (non-transposed ldmatrix).
template <int kStride>
__device__ __forceinline__ int lane_off_b_nk(int lane) {
  return ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
}
// Two B operands (n-tiles n0, n0+8), tile stored [k][n] (ldmatrix .trans): the same four 8x8 matrices in the
// same order as lane_off_a's, so the same addresses. Also valid for x2 (lanes 0-15).
template <int kStride>
__device__ __forceinline__ int lane_off_b_kn(int lane) {
  return lane_off_a<kStride>(lane);
}
// A operand (16x16), tile stored transposed [k][m] (ldmatrix .trans): lane_off_b_nk's addresses, likewise.
template <int kStride>
__device__ __forceinline__ int lane_off_a_km(int lane) {
  return lane_off_b_nk<kStride>(lane);
}

// dst[0] += a, dst[1] += b in global memory (fp32 reduction; dst 8-byte aligned). sm_90 has a
// vector form (one instruction, one L2 request); older chips use two scalar reductions.
// H200, bf16 d128 bwd 16k non-causal: scalar atomicAdd 188 TFLOP/s (with the other changes of that
// step), v2 237-243; a v4 variant (lane pairs swapping a pair by shuffle) measured 2-3% slower than v2.
__device__ __forceinline__ void red_add_f32x2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Asynchronously copy rows [row0, row0 + kRows) x cols [0, kHeadDim) of a global tile into shared
// memory; rows >= nrows_valid and cols >= head_dim are zero-filled.
template <int kRows, int kHeadDim, int kStride, int kNThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile_smem,        // kRows x kStride
                                                const T* base_gmem,  // row 0 of the (batch, head)
                                                int64_t row_stride, int row0, int nrows_valid,
                                                int head_dim, int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int c = tid; c < kChunks; c += kNThreads) {
    const int r = c / kChunksPerRow;
    const int cc = c % kChunksPerRow;
    const bool valid = (row0 + r < nrows_valid) && (cc * 8 < head_dim);
    const T* src = valid ? base_gmem + (int64_t)(row0 + r) * row_stride + cc * 8 : base_gmem;
    cp_async_16(smem_u32(tile_smem + r * kStride + cc * 8), src, valid);
  }
}

// ==================================================================================================
// Tile configuration of the dK/dV kernel.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kWarpsD_, bool kDeferDq_ = true,
          int kSubM_ = kBlockM_>
struct BwdTraits {
  static constexpr bool kTiled = false;  // 1-D warp layout (bwd_dkdv_kernel); see bwd_tiled_kernel.cuh
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per inner iteration
  static constexpr int kBlockN = kBlockN_;  // key rows per CTA
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Warps that share one group of 16 key rows and split the head dim of dK/dV between them
  // (> 1 only for big head dims, where one warp cannot hold 16 x kHeadDim of both dK and dV).
  // They recompute the same S^T/dP^T (the price of keeping P in registers).
  static constexpr int kWarpsD = kWarpsD_;
  static constexpr int kWarpsN = kNWarps / kWarpsD;
  static_assert(kBlockN == 16 * kWarpsN, "each warp owns 16 key rows");
  static constexpr int kDW = kHeadDim / kWarpsD;  // dK/dV columns per warp
  static_assert(kDW % 16 == 0, "");
  static_assert(kBlockM % 16 == 0 && kHeadDim % 16 == 0, "");
  // dQ_i = dS K partition: (kBlockM/16) row tiles x kDqWarpsD column groups, each in kDqPasses passes.
  static constexpr int kDqWarpsM = kBlockM / 16;
  static constexpr int kDqWarpsD = kNWarps / kDqWarpsM;
  static_assert(kNWarps % kDqWarpsM == 0, "");
  static constexpr int kDqDW = kHeadDim / kDqWarpsD;
  // dQ columns per pass: the dQ accumulator is live on top of dK + dV; 32 columns where those take 128
  // registers (d128: 64-column passes spill), else 64.
  static constexpr int kDqMaxPassW = (kWarpsD == 1 && kHeadDim >= 128) ? 32 : 64;
  static constexpr int kDqPasses = (kDqDW + kDqMaxPassW - 1) / kDqMaxPassW;
  static constexpr int kDqPassW = kDqDW / kDqPasses;
  static_assert(kDqPassW % 8 == 0 && kDqDW % kDqPasses == 0, "");

  // dQ of iteration i runs in iteration i+1, after its barrier: one __syncthreads per iteration
  // instead of two, and the reductions overlap the next S^T; costs a second dS^T buffer.
  static constexpr bool kDeferDq = kDeferDq_;
  // Queries per S^T/dP^T sub-step inside one query block (< kBlockM only to save registers).
  static constexpr int kSubM = kSubM_;
  static_assert(kBlockM % kSubM == 0 && kSubM % 16 == 0, "");
  static constexpr int kDsBufs = kDeferDq ? 2 : 1;
  static constexpr int kStride = kHeadDim + 8;  // padded smem row of Q, dO, K, V
  static constexpr int kDsStride = kBlockM + 8;  // padded smem row of dS^T (key x query)
  static constexpr int kTileN = kBlockN * kStride;
  static constexpr int kTileM = kBlockM * kStride;
  static constexpr int kSmemElems = 2 * kTileN + 4 * kTileM + kDsBufs * kBlockN * kDsStride;
  static constexpr int kSmemBytes = kSmemElems * 2 + 4 * kBlockM * (int)sizeof(float);
};

// ==================================================================================================
// 1. D = rowsum(dO * O), one warp per query row; rows in [seqlen_q, seqlen_q_rounded) get D = 0.
//    Also zeroes the row of dq_accum when ZeroDq. Grid: (seqlen_q_rounded / 8, nheads, batch), 256 threads.
template <typename T, int kHeadDim, bool ZeroDq, bool MayVarlen = false>
__global__ void __launch_bounds__(256)
bwd_preprocess_kernel(const __grid_constant__ BwdParams params) {
  static_assert(kHeadDim / 8 <= 32, "one 16-byte chunk per lane");
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= params.seqlen_q_rounded) return;
  const SeqInfoT<int, MayVarlen> seq(params, b);
  if constexpr (MayVarlen) {
    if (row >= seq.ws_rows_of_entry(params.seqlen_q_rounded)) return;  // the next entry's workspace rows (varlen)
  }
  const int c = lane * 8;
  float sum = 0.f;
  if (row < seq.seqlen_q && c < params.head_dim) {
    const T* o_gmem = reinterpret_cast<const T*>(params.out) + seq.q_offset(params.o_batch_stride, params.o_row_stride) +
                      (int64_t)row * params.o_row_stride + h * params.o_head_stride + c;  // 8 elems
    const T* do_gmem = reinterpret_cast<const T*>(params.dout) + seq.q_offset(params.do_batch_stride, params.do_row_stride) +
                       (int64_t)row * params.do_row_stride + h * params.do_head_stride + c;  // 8 elems
    const uint4 o4 = *reinterpret_cast<const uint4*>(o_gmem);
    const uint4 d4 = *reinterpret_cast<const uint4*>(do_gmem);
    const uint32_t ow[4] = {o4.x, o4.y, o4.z, o4.w};
    const uint32_t dw[4] = {d4.x, d4.y, d4.z, d4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 of = unpack2<T>(ow[i]);
      const float2 df = unpack2<T>(dw[i]);
      sum = fmaf(of.x, df.x, sum);
      sum = fmaf(of.y, df.y, sum);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  // TODO(seqinfo.cuh): row_offset would scale (b, h) by seqlen_q_rounded once here instead of per array
  // (different machine code); proposed SeqInfo::head_rows(h, nheads) = int64_t(b) * nheads + h.
  const int64_t bh = (int64_t)b * params.nheads + h;
  // (The general path's instantiation takes the workspace rows from SeqInfo::ws_offset.)
  const int64_t ws_row0 = MayVarlen ? seq.ws_offset(h, params.nheads, params.seqlen_q_rounded) : 0;
  if (lane == 0) params.dsoftmax_sum[MayVarlen ? ws_row0 + row : bh * params.seqlen_q_rounded + row] = sum;
  if constexpr (ZeroDq) {
    if (c < kHeadDim) {
      float* dqa = params.dq_accum + (MayVarlen ? ws_row0 + row : bh * params.seqlen_q_rounded + row) * kHeadDim +
                   c;  // 8 floats
      reinterpret_cast<float4*>(dqa)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      reinterpret_cast<float4*>(dqa)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

// The dK / dV kernels' walk over (query head of the K/V head's group, query block): query blocks
// [m_block_min, m_block_max) of each query head in turn. next_head_block gives the iteration after (h, m_block).
struct HeadBlock {
  int h, m_block;
};
__device__ __forceinline__ HeadBlock next_head_block(int h, int m_block, int m_block_min, int m_block_max) {
  int h_next = h, m_block_next = m_block + 1;
  if (m_block_next == m_block_max) { m_block_next = m_block_min; ++h_next; }
  return HeadBlock{h_next, m_block_next};
}

// 3a. dq = dq_accum * scale (element type). One warp per row. Grid: (ceil(seqlen_q / 8), nheads, batch).
template <typename T, int kHeadDim, bool MayVarlen = false>
__global__ void __launch_bounds__(256)
bwd_convert_dq_kernel(const __grid_constant__ BwdParams params) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  const int h = blockIdx.y;
  const SeqInfoT<int, MayVarlen> seq(params, blockIdx.z);
  const int c = lane * 8;
  if (row >= seq.seqlen_q || c >= params.head_dim) return;
  const float* dqa = params.dq_accum + (seq.ws_offset(h, params.nheads, params.seqlen_q_rounded) + row) * kHeadDim +
                     c;  // 8 floats
  const float4 x = reinterpret_cast<const float4*>(dqa)[0];
  const float4 y = reinterpret_cast<const float4*>(dqa)[1];
  const float s = params.scale_softmax;
  uint4 out;
  out.x = pack2<T>(x.x * s, x.y * s);
  out.y = pack2<T>(x.z * s, x.w * s);
  out.z = pack2<T>(y.x * s, y.y * s);
  out.w = pack2<T>(y.z * s, y.w * s);
  T* dq_gmem = reinterpret_cast<T*>(params.dq) + seq.q_offset(params.dq_batch_stride, params.dq_row_stride) +
               (int64_t)row * params.dq_row_stride + h * params.dq_head_stride + c;  // 8 elems
  *reinterpret_cast<uint4*>(dq_gmem) = out;
}

// ==================================================================================================
// 2. dK, dV (and dQ through atomics unless params.deterministic).
// Grid: (ceil(seqlen_k / kBlockN), nheads_k, batch). Block: kNThreads. Dynamic smem: kSmemBytes.
template <typename Traits, typename T, bool IsCausal, bool IsLocal = false, bool Dropout = false>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
bwd_dkdv_kernel(const __grid_constant__ BwdParams params) {
  constexpr int kHeadDim = Traits::kHeadDim, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads, kWarpsN = Traits::kWarpsN, kDW = Traits::kDW;
  constexpr int kStride = Traits::kStride, kDsStride = Traits::kDsStride, kSubM = Traits::kSubM;
  constexpr int kDqWarpsM = Traits::kDqWarpsM, kDqDW = Traits::kDqDW, kDqPassW = Traits::kDqPassW;

  extern __shared__ __align__(16) char smem_raw[];
  T* k_smem = reinterpret_cast<T*>(smem_raw);            // kBlockN x kStride
  T* v_smem = k_smem + Traits::kTileN;                   // kBlockN x kStride
  T* q_smem = v_smem + Traits::kTileN;                   // 2 stages x kBlockM x kStride
  T* do_smem = q_smem + 2 * Traits::kTileM;              // 2 stages x kBlockM x kStride
  T* ds_smem = do_smem + 2 * Traits::kTileM;             // kDsBufs x kBlockN x kDsStride (dS^T: key x query)
  float* lse_smem = reinterpret_cast<float*>(ds_smem + Traits::kDsBufs * kBlockN * kDsStride);  // 2 x kBlockM, lse*log2e
  float* dsum_smem = lse_smem + 2 * kBlockM;             // 2 x kBlockM, D = rowsum(dO * O)

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int wn = warp % kWarpsN;  // key rows [16 wn, 16 wn + 16) of the block
  const int wd = warp / kWarpsN;  // dK/dV columns [wd kDW, (wd+1) kDW)
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  // The general path reads variable-length batches (seqinfo.cuh); the plain and causal kernels dense ones only.
  const SeqInfoT<int, IsLocal> seq(params, b);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  const bool with_dq = !params.deterministic;
  if constexpr (IsLocal) {
    if (n_block * kBlockN >= seqlen_k) return;  // a key block past a shorter sequence's end (varlen)
  }

  const Mask<IsCausal, IsLocal> mask(seqlen_q, seqlen_k, params);
  // The score modifiers: read (and their code run) only in the general path's instantiation.
  ScoreMod mod = IsLocal ? ScoreMod(params, b, hk * params.h_h_k_ratio, seqlen_q, seqlen_k) : ScoreMod();
  const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
  const int m_block_max = mask.template m_block_max<kBlockM, kBlockN>(n_block);
  const int n_m = m_block_max > m_block_min ? m_block_max - m_block_min : 0;
  const int n_iter = n_m * params.h_h_k_ratio;  // (query head of the group, query block) pairs

  const T* k_gmem = reinterpret_cast<const T*>(params.k) + seq.k_offset(params.k_batch_stride, params.k_row_stride) +
                    hk * params.k_head_stride;  // seqlen_k x head_dim (row stride k_row_stride)
  const T* v_gmem = reinterpret_cast<const T*>(params.v) + seq.k_offset(params.v_batch_stride, params.v_row_stride) +
                    hk * params.v_head_stride;  // seqlen_k x head_dim

  // Issue the loads of one iteration (Q_i, dO_i async; lse, D through registers) into `stage`.
  // Iterations run over (query head of the group, query block) pairs, query block fastest.
  auto load_iter = [&](int h, int m_block, int stage) {
    const T* q_gmem = reinterpret_cast<const T*>(params.q) + seq.q_offset(params.q_batch_stride, params.q_row_stride) +
                      h * params.q_head_stride;  // seqlen_q x head_dim
    const T* do_gmem = reinterpret_cast<const T*>(params.dout) + seq.q_offset(params.do_batch_stride, params.do_row_stride) +
                       h * params.do_head_stride;  // seqlen_q x head_dim
    load_tile_async<kBlockM, kHeadDim, kStride, kNThreads>(q_smem + stage * Traits::kTileM, q_gmem,
                                                          params.q_row_stride, m_block * kBlockM,
                                                          seqlen_q, params.head_dim, tid);
    load_tile_async<kBlockM, kHeadDim, kStride, kNThreads>(do_smem + stage * Traits::kTileM, do_gmem,
                                                          params.do_row_stride, m_block * kBlockM,
                                                          seqlen_q, params.head_dim, tid);
    const int64_t bh = seq.head_index(h, params.nheads);
    for (int i = tid; i < kBlockM; i += kNThreads) {
      const int row = m_block * kBlockM + i;
      // (The general path's instantiation takes the lse and D rows from SeqInfo::lse_offset / ws_offset.)
      const float lse =
          row < seqlen_q ? params.lse[(IsLocal ? seq.lse_offset(h, params.nheads, seqlen_q) : bh * seqlen_q) + row]
                         : -INFINITY;
      // +inf makes P = exp2(s - inf) = 0: rows that see no key and rows past seqlen_q.
      lse_smem[stage * kBlockM + i] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      dsum_smem[stage * kBlockM + i] =
          params.dsoftmax_sum[(IsLocal ? seq.ws_offset(h, params.nheads, params.seqlen_q_rounded)
                                       : bh * params.seqlen_q_rounded) + row];
    }
  };

  // K_j, V_j once, together with the first query block.
  load_tile_async<kBlockN, kHeadDim, kStride, kNThreads>(k_smem, k_gmem, params.k_row_stride,
                                                        n_block * kBlockN, seqlen_k, params.head_dim, tid);
  load_tile_async<kBlockN, kHeadDim, kStride, kNThreads>(v_smem, v_gmem, params.v_row_stride,
                                                        n_block * kBlockN, seqlen_k, params.head_dim, tid);
  if (n_iter > 0) load_iter(hk * params.h_h_k_ratio, m_block_min, 0);
  cp_async_commit();

  float acc_dv[kDW / 8][4];  // 16 keys x kDW of dV, mma accumulator layout
  float acc_dk[kDW / 8][4];
#pragma unroll
  for (int i = 0; i < kDW / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dv[i][e] = acc_dk[i][e] = 0.f;

  const uint32_t k_base = smem_u32(k_smem), v_base = smem_u32(v_smem);
  // Per-lane byte offsets of the operand tiles this warp reads.
  const uint32_t kv_a_off = (16 * wn * kStride + lane_off_a<kStride>(lane)) * 2;   // K, V as A
  const uint32_t qdo_b_off = lane_off_b_nk<kStride>(lane) * 2;                     // Q, dO as B (n = query)
  const uint32_t qdo_bt_off = (wd * kDW + lane_off_b_kn<kStride>(lane)) * 2;       // Q, dO as B (k = query)
  const int dq_wm = warp % kDqWarpsM, dq_wd = warp / kDqWarpsM;
  const uint32_t ds_a_off = (16 * dq_wm + lane_off_a_km<kDsStride>(lane)) * 2;     // dS^T as A (trans)
  const uint32_t k_bt_off = (dq_wd * kDqDW + lane_off_b_kn<kStride>(lane)) * 2;    // K as B (k = key)

  // dQ_i (kBlockM x kHeadDim) += dS K for query head h, query block m_block, from dS^T buffer `buf`; fp32 reductions
  // into dq_accum. Warp tile 16 rows x kDqDW cols, k = kBlockN keys.
  auto dq_step = [&](int h, int m_block, int buf) {
    const uint32_t ds_base = smem_u32(ds_smem + buf * kBlockN * kDsStride);
    float* dqa_gmem = params.dq_accum +
                      ((IsLocal ? seq.ws_offset(h, params.nheads, params.seqlen_q_rounded)
                                : seq.head_index(h, params.nheads) * params.seqlen_q_rounded) + m_block * kBlockM) *
                          kHeadDim;  // kBlockM x kHeadDim (fp32, the entry's rows)
#pragma unroll 1  // d128: unrolled passes spill (nvcc 13.0 ptxas)
    for (int pass = 0; pass < Traits::kDqPasses; ++pass) {
      float acc_dq[kDqPassW / 8][4];
#pragma unroll
      for (int i = 0; i < kDqPassW / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dq[i][e] = 0.f;
#pragma unroll 2  // full unroll hoists the ldmatrix of all steps: d128 spills (nvcc 13.0)
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, ds_base + ds_a_off + kk * 16 * kDsStride * 2);
#pragma unroll
        for (int nt = 0; nt < kDqPassW / 16; ++nt) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, k_base + k_bt_off + (kk * 16 * kStride + pass * kDqPassW + nt * 16) * 2);
          const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
          mma_16816<T>(acc_dq[2 * nt], a, b0);
          mma_16816<T>(acc_dq[2 * nt + 1], a, b1);
        }
        if constexpr (kDqPassW % 16 != 0) {
          uint32_t bk[2];
          ldmatrix_x2_trans(bk, k_base + k_bt_off + (kk * 16 * kStride + pass * kDqPassW + kDqPassW - 8) * 2);
          mma_16816<T>(acc_dq[kDqPassW / 8 - 1], a, bk);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kDqPassW / 8; ++nt) {
        const int col = dq_wd * kDqDW + pass * kDqPassW + nt * 8 + 2 * t;
        float* p0 = dqa_gmem + (16 * dq_wm + g) * kHeadDim + col;
        float* p8 = p0 + 8 * kHeadDim;
        red_add_f32x2(p0, acc_dq[nt][0], acc_dq[nt][1]);
        red_add_f32x2(p8, acc_dq[nt][2], acc_dq[nt][3]);
      }
    }
  };

  int h = hk * params.h_h_k_ratio, m_block = m_block_min;  // this iteration
  int h_prev = h, m_block_prev = m_block;                    // the previous one (deferred dQ)
  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    const HeadBlock next = next_head_block(h, m_block, m_block_min, m_block_max);  // iteration it + 1
    // One barrier per iteration (two without kDeferDq): after it, stage `stage` (and K, V) is visible,
    // every warp is done with iteration it-1 (so stage^1 and the other dS^T buffer may be refilled),
    // and dS^T of iteration it-1 is complete.
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_iter) load_iter(next.h, next.m_block, stage ^ 1);
    cp_async_commit();
    if constexpr (Traits::kDeferDq) {
      if (with_dq && it > 0) dq_step(h_prev, m_block_prev, stage ^ 1);
    }

    const uint32_t q_base = smem_u32(q_smem + stage * Traits::kTileM);
    const uint32_t do_base = smem_u32(do_smem + stage * Traits::kTileM);

    const float* lse_s = lse_smem + stage * kBlockM;
    const float* dsum_s = dsum_smem + stage * kBlockM;
    if constexpr (IsLocal) {
      if (params.h_h_k_ratio > 1) mod.set_head(params, b, h);  // this iteration's query head
    }
    // The query block is processed in sub-blocks of kSubM queries (registers: d128 spills with 64).
#pragma unroll 1
    for (int q0 = 0; q0 < kBlockM; q0 += kSubM) {
    // acc = A B^T for this sub-block: A the warp's 16 keys of K or V (a_base), B the kSubM queries of Q or dO
    // (b_base) from row q0.
    auto gemm_sub = [&](float (&acc)[kSubM / 8][4], uint32_t a_base, uint32_t b_base) {
#pragma unroll
      for (int i = 0; i < kSubM / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, a_base + kv_a_off + ks * 32);
#pragma unroll
        for (int nt = 0; nt < kSubM / 16; ++nt) {
          uint32_t bf[4];
          ldmatrix_x4(bf, b_base + qdo_b_off + ((q0 + nt * 16) * kStride + ks * 16) * 2);
          const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
          mma_16816<T>(acc[2 * nt], a, b0);
          mma_16816<T>(acc[2 * nt + 1], a, b1);
        }
      }
    };
    // S^T = K Q^T: 16 keys x kSubM queries per warp.
    float acc_s[kSubM / 8][4];
    gemm_sub(acc_s, k_base, q_base);
    // The score modifiers (general path): key rows key0, key0 + 8; queries m_block kBlockM + q0 + 8j + 2t (+1).
    const float ip_sub = IsLocal ? mod.row_pos(m_block * kBlockM + q0 + 2 * t) : 0.f;
    const float key0f = IsLocal ? static_cast<float>(n_block * kBlockN + 16 * wn + g) : 0.f;
    (void)ip_sub;
    (void)key0f;
    if constexpr (IsLocal) {
      if (mod.has_softcap()) {
#pragma unroll
        for (int j = 0; j < kSubM / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[j][e] = mod.softcap(acc_s[j][e]);
      }
      if (mod.has_alibi()) {
#pragma unroll
        for (int j = 0; j < kSubM / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc_s[j][e] = mod.add_alibi(acc_s[j][e], ip_sub + static_cast<float>(8 * j + (e & 1)),
                                        key0f + static_cast<float>(8 * (e >> 1)));
      }
      if (mod.has_bias()) {  // element (j, e): query q0 + 8j + 2t + e % 2, key 16 wn + g + 8 (e / 2) of the blocks
        add_bias<T>(flat(acc_s), mod, params, [&](int i, int& row, int& col) {
          row = m_block * kBlockM + q0 + 8 * (i / 4) + 2 * t + i % 2;
          col = n_block * kBlockN + 16 * wn + g + 8 * ((i % 4) / 2);
        });
      }
    }

    // P^T = exp2(S^T * scale_log2 - lse_log2), masked. (Key rows g, g + 8 of the warp's 16.)
    {
      const int key0 = n_block * kBlockN + 16 * wn + g;
      // Block fully visible unless it is the seqlen_k tail or (causal) the diagonal crosses it.
      const bool need_mask = IsLocal ? mask.template block_needs_mask<kBlockM, kBlockN>(m_block, n_block)
                                     : (n_block + 1) * kBlockN > seqlen_k ||
                                           (IsCausal && (n_block + 1) * kBlockN - 1 > m_block * kBlockM + seqlen_k - seqlen_q);
      const int key_lim = seqlen_k - key0;  // key0 + 8 * half >= seqlen_k: past the end
      // key0 - (last key that query row m_block*kBlockM sees): causal masks key0 + 8 half if this
      // + 8 half > local query row.
      const int key_diag = key0 - (m_block * kBlockM + seqlen_k - seqlen_q);
      const float scale_log2 = params.scale_softmax_log2;
#pragma unroll
      for (int j = 0; j < kSubM / 8; ++j) {
        const int ql = q0 + 8 * j + 2 * t;
        const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + ql);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float p = fast_exp2(fmaf(acc_s[j][e], scale_log2, (e & 1) ? -lse2.y : -lse2.x));
          if (need_mask) {
            // Same test as mask.col_limit: key >= seqlen_k, or (causal) key > row + seqlen_k - seqlen_q.
            bool masked;
            if constexpr (IsLocal) {
              masked = !mask.visible(m_block * kBlockM + ql + (e & 1), key0 + (e >> 1) * 8);
            } else {
              masked = (e >> 1) * 8 >= key_lim;
              if constexpr (IsCausal) masked |= key_diag + (e >> 1) * 8 - (e & 1) > ql;
            }
            if (masked) p = 0.f;
          }
          acc_s[j][e] = p;
        }
      }
    }
    // dP^T = V dO^T.
    float acc_dp[kSubM / 8][4];
    gemm_sub(acc_dp, v_base, do_base);
    // Dropout (dropout.cuh): dP^T o Z / (1 - p) here; the P^T of dV += P^T dO is P^T o Z / (1 - p) (below).
    uint64_t keep[(kSubM / 2 + 63) / 64];
    if constexpr (Dropout) {
      const DropoutDev drop(params, b, h);
      drop.template oct_keep<kSubM / 2>(keep, m_block * kBlockM + q0, n_block * kBlockN + 16 * wn + g, t);
      dropout_apply(flat(acc_dp), keep, drop.scale);
    }
    (void)keep;
    if constexpr (IsLocal) {
      // The sinks' gradient terms exp2(sink_log2 - lse_log2) P^T dP^T (params.h); the kWarpsD warps of a key row
      // group hold the same P^T and dP^T: one adds them.
      if (params.dsink_accum != nullptr && wd == 0) {
        const float sink_log2 = sink_log2_of(params, h);
        float terms = 0.f;
#pragma unroll
        for (int j = 0; j < kSubM / 8; ++j) {
          const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + q0 + 8 * j + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            terms = fmaf(sink_share(sink_log2, (e & 1) ? lse2.y : lse2.x), acc_s[j][e] * acc_dp[j][e], terms);
        }
        add_dsink_terms(params, b, h, dsink_slot<kBlockN, kWarpsN>(n_block, wn), terms);
      }
    }
    // dS^T = P^T (dP^T - D). P^T and dS^T are packed at once (element type) into the A fragments of
    // dV += P^T dO and dK += dS^T Q (k = query); packing P only now keeps one copy of it live
    // during the dP^T GEMM (d128: packing earlier spilled).
    uint32_t a_p[kSubM / 16][4];
    uint32_t a_ds[kSubM / 16][4];
#pragma unroll
    for (int j = 0; j < kSubM / 8; ++j) {
      const float2 dsum2 = *reinterpret_cast<const float2*>(dsum_s + q0 + 8 * j + 2 * t);
      float ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[e] = acc_s[j][e] * (acc_dp[j][e] - ((e & 1) ? dsum2.y : dsum2.x));
      if constexpr (IsLocal) {
        // dbias = dS (before the softcap's factor); the kWarpsD warps of a key row group hold the same dS: one stores.
        if (params.dbias_accum != nullptr && wd == 0) {
          float* dbias_bh = params.dbias_accum + (int64_t(b) * params.nheads + h) * int64_t(seqlen_q) * seqlen_k;
          store_dbias(ds, mod, params, dbias_bh, [&](int e, int& row, int& col) {
            row = m_block * kBlockM + q0 + 8 * j + 2 * t + (e & 1);
            col = n_block * kBlockN + 16 * wn + g + 8 * (e >> 1);
          });
        }
        if (mod.has_softcap()) {  // through the softcap: dS o (1 - t^2), t from P (ScoreMod::dtanh_from_p)
          const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + q0 + 8 * j + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float add = mod.alibi_term(ip_sub + static_cast<float>(8 * j + (e & 1)),
                                       key0f + static_cast<float>(8 * (e >> 1)));
            if (mod.has_bias()) {
              add += mod.bias_at<T>(mod.strides(params), m_block * kBlockM + q0 + 8 * j + 2 * t + (e & 1),
                                    n_block * kBlockN + 16 * wn + g + 8 * (e >> 1));
            }
            ds[e] *= mod.dtanh_from_p(acc_s[j][e], (e & 1) ? lse2.y : lse2.x, add);
          }
        }
      }
      float pv[4] = {acc_s[j][0], acc_s[j][1], acc_s[j][2], acc_s[j][3]};  // the P^T of dV += P^T dO
      if constexpr (Dropout) {
#pragma unroll
        for (int e = 0; e < 4; ++e) pv[e] = dropout_kept(keep, 4 * j + e) ? pv[e] * params.dropout_scale : 0.f;
      }
      a_p[j / 2][(j & 1) * 2] = pack2<T>(pv[0], pv[1]);
      a_p[j / 2][(j & 1) * 2 + 1] = pack2<T>(pv[2], pv[3]);
      a_ds[j / 2][(j & 1) * 2] = pack2<T>(ds[0], ds[1]);
      a_ds[j / 2][(j & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
    }

    // dV += P^T dO, dK += dS^T Q (k = query). P^T and dS^T accumulators become A fragments.
#pragma unroll
    for (int kk = 0; kk < kSubM / 16; ++kk) {
      if (with_dq && wd == 0) {  // dS^T -> smem for dQ (one copy per key row group)
        T* ds_buf = ds_smem + (Traits::kDeferDq ? stage : 0) * kBlockN * kDsStride;
        uint32_t* ds_row0 = reinterpret_cast<uint32_t*>(ds_buf + (16 * wn + g) * kDsStride + q0 + 16 * kk + 2 * t);
        uint32_t* ds_row8 = reinterpret_cast<uint32_t*>(ds_buf + (16 * wn + g + 8) * kDsStride + q0 + 16 * kk + 2 * t);
        ds_row0[0] = a_ds[kk][0];
        ds_row8[0] = a_ds[kk][1];
        ds_row0[4] = a_ds[kk][2];
        ds_row8[4] = a_ds[kk][3];
      }
#pragma unroll
      for (int nt = 0; nt < kDW / 16; ++nt) {
        uint32_t bdo[4], bq[4];
        ldmatrix_x4_trans(bdo, do_base + qdo_bt_off + ((q0 + kk * 16) * kStride + nt * 16) * 2);
        ldmatrix_x4_trans(bq, q_base + qdo_bt_off + ((q0 + kk * 16) * kStride + nt * 16) * 2);
        const uint32_t bdo0[2] = {bdo[0], bdo[1]}, bdo1[2] = {bdo[2], bdo[3]};
        const uint32_t bq0[2] = {bq[0], bq[1]}, bq1[2] = {bq[2], bq[3]};
        mma_16816<T>(acc_dv[2 * nt], a_p[kk], bdo0);
        mma_16816<T>(acc_dv[2 * nt + 1], a_p[kk], bdo1);
        mma_16816<T>(acc_dk[2 * nt], a_ds[kk], bq0);
        mma_16816<T>(acc_dk[2 * nt + 1], a_ds[kk], bq1);
      }
    }
    }  // q0

    if (with_dq) {
      if constexpr (Traits::kDeferDq) {
        // Deferred: dQ of this iteration runs at the start of the next one (after its barrier).
      } else {
        __syncthreads();  // dS^T complete
        dq_step(h, m_block, 0);
      }
    }
    h_prev = h; m_block_prev = m_block;
    h = next.h; m_block = next.m_block;
  }
  if constexpr (Traits::kDeferDq) {
    if (with_dq && n_iter > 0) {
      __syncthreads();  // dS^T of the last iteration complete
      dq_step(h_prev, m_block_prev, (n_iter - 1) & 1);
    }
  }
  cp_async_wait<0>();

  // Epilogue: dK * scale and dV in the element type; rows < seqlen_k, cols < head_dim.
  T* dk_gmem = reinterpret_cast<T*>(params.dk) + seq.k_offset(params.dk_batch_stride, params.dk_row_stride) + hk * params.dk_head_stride;  // seqlen_k x head_dim
  T* dv_gmem = reinterpret_cast<T*>(params.dv) + seq.k_offset(params.dv_batch_stride, params.dv_row_stride) + hk * params.dv_head_stride;  // seqlen_k x head_dim
  const float scale = params.scale_softmax;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = n_block * kBlockN + 16 * wn + g + 8 * half;
    if (key >= seqlen_k) continue;
#pragma unroll
    for (int nt = 0; nt < kDW / 8; ++nt) {
      const int col = wd * kDW + nt * 8 + 2 * t;
      if (col < params.head_dim) {
        *reinterpret_cast<uint32_t*>(dk_gmem + (int64_t)key * params.dk_row_stride + col) =
            pack2<T>(acc_dk[nt][2 * half] * scale, acc_dk[nt][2 * half + 1] * scale);
        *reinterpret_cast<uint32_t*>(dv_gmem + (int64_t)key * params.dv_row_stride + col) =
            pack2<T>(acc_dv[nt][2 * half], acc_dv[nt][2 * half + 1]);
      }
    }
  }
}

// ==================================================================================================
// 3b. Deterministic dQ: one CTA per (query block of 64, head, batch), 4 warps of 16 query rows.
// Recomputes S = Q K^T, P, dP = dO V^T, dS and accumulates dQ = dS K in registers over the key
// blocks (K, V double-buffered). Grid: (ceil(seqlen_q / 64), nheads, batch).
template <int kHeadDim_, int kBlockN_>
struct DqTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 128;
  static constexpr int kStride = kHeadDim + 8;
  static constexpr int kSmemBytes = (2 * kBlockM * kStride + 4 * kBlockN * kStride) * 2;
};

template <typename Traits, typename T, bool IsCausal, bool IsLocal = false, bool Dropout = false>
__global__ void __launch_bounds__(Traits::kNThreads)
bwd_dq_kernel(const __grid_constant__ BwdParams params) {
  constexpr int kHeadDim = Traits::kHeadDim, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads, kStride = Traits::kStride;

  extern __shared__ __align__(16) char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);   // kBlockM x kStride
  T* do_smem = q_smem + kBlockM * kStride;       // kBlockM x kStride
  T* k_smem = do_smem + kBlockM * kStride;       // 2 stages x kBlockN x kStride
  T* v_smem = k_smem + 2 * kBlockN * kStride;    // 2 stages x kBlockN x kStride

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / params.h_h_k_ratio;
  const SeqInfoT<int, IsLocal> seq(params, b);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  if constexpr (IsLocal) {
    if (m_block * kBlockM >= seqlen_q) return;  // a query block past a shorter sequence's end (varlen)
  }
  using MaskT = Mask<IsCausal, IsLocal>;
  const MaskT mask(seqlen_q, seqlen_k, params);
  // The score modifiers: read (and their code run) only in the general path's instantiation.
  const ScoreMod mod = IsLocal ? ScoreMod(params, b, h, seqlen_q, seqlen_k) : ScoreMod();
  // Key blocks [n_block_min, n_block_max) (empty: dq = 0); the per-element mask where the block is at
  // or past n_block_unmasked_end or (a left bound only) below n_block_unmasked_begin.
  const int n_block_min = MaskT::kHasLeftBound ? mask.template n_block_min<kBlockM, kBlockN>(m_block) : 0;
  const int n_block_max = mask.template n_block_max<kBlockM, kBlockN>(m_block);
  const int n_block_unmasked_end = mask.template n_block_unmasked_end<kBlockM, kBlockN>(m_block);
  const int n_block_unmasked_begin =
      MaskT::kHasLeftBound ? mask.template n_block_unmasked_begin<kBlockM, kBlockN>(m_block) : 0;

  const T* q_gmem = reinterpret_cast<const T*>(params.q) + seq.q_offset(params.q_batch_stride, params.q_row_stride) +
                    h * params.q_head_stride;  // seqlen_q x head_dim
  const T* do_gmem = reinterpret_cast<const T*>(params.dout) +
                     seq.q_offset(params.do_batch_stride, params.do_row_stride) +
                     h * params.do_head_stride;  // seqlen_q x head_dim
  const T* k_gmem = reinterpret_cast<const T*>(params.k) + seq.k_offset(params.k_batch_stride, params.k_row_stride) +
                    hk * params.k_head_stride;  // seqlen_k x head_dim
  const T* v_gmem = reinterpret_cast<const T*>(params.v) + seq.k_offset(params.v_batch_stride, params.v_row_stride) +
                    hk * params.v_head_stride;  // seqlen_k x head_dim

  load_tile_async<kBlockM, kHeadDim, kStride, kNThreads>(q_smem, q_gmem, params.q_row_stride, m_block * kBlockM, seqlen_q, params.head_dim, tid);
  load_tile_async<kBlockM, kHeadDim, kStride, kNThreads>(do_smem, do_gmem, params.do_row_stride, m_block * kBlockM, seqlen_q, params.head_dim, tid);
  auto load_kv = [&](int n_block, int stage) {
    load_tile_async<kBlockN, kHeadDim, kStride, kNThreads>(k_smem + stage * kBlockN * kStride, k_gmem, params.k_row_stride, n_block * kBlockN, seqlen_k, params.head_dim, tid);
    load_tile_async<kBlockN, kHeadDim, kStride, kNThreads>(v_smem + stage * kBlockN * kStride, v_gmem, params.v_row_stride, n_block * kBlockN, seqlen_k, params.head_dim, tid);
  };
  if (n_block_max > n_block_min) load_kv(n_block_min, 0);
  cp_async_commit();

  // lse (log2 units, +inf where P must be 0) and D of this thread's rows 16 warp + g (+8).
  const int64_t lse_row0 = seq.lse_offset(h, params.nheads, seqlen_q);
  const int64_t dsum_row0 = seq.ws_offset(h, params.nheads, params.seqlen_q_rounded);
  float lse_r[2], dsum_r[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = m_block * kBlockM + 16 * warp + g + 8 * half;
    const float lse = row < seqlen_q ? params.lse[lse_row0 + row] : -INFINITY;
    lse_r[half] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    dsum_r[half] = params.dsoftmax_sum[dsum_row0 + row];
  }

  float acc_dq[kHeadDim / 8][4];
#pragma unroll
  for (int i = 0; i < kHeadDim / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[i][e] = 0.f;

  const uint32_t q_base = smem_u32(q_smem), do_base = smem_u32(do_smem);
  const uint32_t a_off = (16 * warp * kStride + lane_off_a<kStride>(lane)) * 2;
  const uint32_t b_off = lane_off_b_nk<kStride>(lane) * 2;
  const uint32_t bt_off = lane_off_b_kn<kStride>(lane) * 2;
  const float scale_log2 = params.scale_softmax_log2;

  for (int n_block = n_block_min; n_block < n_block_max; ++n_block) {
    const int stage = (n_block - n_block_min) & 1;
    if (n_block + 1 < n_block_max) load_kv(n_block + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t k_base = smem_u32(k_smem + stage * kBlockN * kStride);
    const uint32_t v_base = smem_u32(v_smem + stage * kBlockN * kStride);

    float acc_s[kBlockN / 8][4], acc_dp[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[i][e] = acc_dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a_q[4], a_do[4];
      ldmatrix_x4(a_q, q_base + a_off + ks * 32);
      ldmatrix_x4(a_do, do_base + a_off + ks * 32);
#pragma unroll
      for (int nt = 0; nt < kBlockN / 16; ++nt) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, k_base + b_off + (nt * 16 * kStride + ks * 16) * 2);
        ldmatrix_x4(bv, v_base + b_off + (nt * 16 * kStride + ks * 16) * 2);
        const uint32_t bk0[2] = {bk[0], bk[1]}, bk1[2] = {bk[2], bk[3]};
        const uint32_t bv0[2] = {bv[0], bv[1]}, bv1[2] = {bv[2], bv[3]};
        mma_16816<T>(acc_s[2 * nt], a_q, bk0);
        mma_16816<T>(acc_s[2 * nt + 1], a_q, bk1);
        mma_16816<T>(acc_dp[2 * nt], a_do, bv0);
        mma_16816<T>(acc_dp[2 * nt + 1], a_do, bv1);
      }
    }
    bool need_mask = n_block >= n_block_unmasked_end;
    if constexpr (MaskT::kHasLeftBound) need_mask = need_mask || n_block < n_block_unmasked_begin;
    // The score modifiers (general path): rows m_block kBlockM + 16 warp + g (+8), keys n_block kBlockN + 8j + 2t (+1).
    const float ip0 = IsLocal ? mod.row_pos(m_block * kBlockM + 16 * warp + g) : 0.f;
    const float col0 = IsLocal ? static_cast<float>(n_block * kBlockN + 2 * t) : 0.f;
    (void)ip0;
    (void)col0;
    if constexpr (IsLocal) {
      if (mod.has_softcap()) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[j][e] = mod.softcap(acc_s[j][e]);
      }
      if (mod.has_alibi()) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc_s[j][e] = mod.add_alibi(acc_s[j][e], ip0 + static_cast<float>(8 * (e >> 1)),
                                        col0 + static_cast<float>(8 * j + (e & 1)));
      }
      if (mod.has_bias()) {  // element (j, e): row 16 warp + g + 8 (e / 2), key 8j + 2t + e % 2 of the blocks
        add_bias<T>(flat(acc_s), mod, params, [&](int i, int& row, int& col) {
          row = m_block * kBlockM + 16 * warp + g + 8 * ((i % 4) / 2);
          col = n_block * kBlockN + 8 * (i / 4) + 2 * t + i % 2;
        });
      }
      if constexpr (Dropout) {  // dP o Z / (1 - p) (dropout.cuh); dS = P o (dP - D) below
        const DropoutDev drop(params, b, h);
        uint64_t keep[(kBlockN / 2 + 63) / 64];
        drop.template quad_keep<kBlockN / 2>(keep, [&](int j, int& row, int& col) {
          row = m_block * kBlockM + 16 * warp + g;
          col = n_block * kBlockN + 8 * j + 2 * t;
        });
        dropout_apply(flat(acc_dp), keep, drop.scale);
      }
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        float p = fast_exp2(fmaf(acc_s[j][e], scale_log2, -lse_r[half]));
        if (need_mask) {
          const int row = m_block * kBlockM + 16 * warp + g + 8 * half;
          const int col = n_block * kBlockN + 8 * j + 2 * t + (e & 1);
          mask.apply(p, col, MaskT::kHasLeftBound ? mask.col_min(row) : 0, mask.col_limit(row), 0.f);
        }
        acc_dp[j][e] = p * (acc_dp[j][e] - dsum_r[half]);
        if constexpr (IsLocal) {
          if (mod.has_softcap()) {  // through the softcap: dS o (1 - t^2), t from P (ScoreMod::dtanh_from_p)
            float add = mod.alibi_term(ip0 + static_cast<float>(8 * half), col0 + static_cast<float>(8 * j + (e & 1)));
            if (mod.has_bias()) {
              add += mod.bias_at<T>(mod.strides(params), m_block * kBlockM + 16 * warp + g + 8 * half,
                                    n_block * kBlockN + 8 * j + 2 * t + (e & 1));
            }
            acc_dp[j][e] *= mod.dtanh_from_p(p, lse_r[half], add);
          }
        }
      }
    }
    // dQ += dS K (k = key).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a_ds[4] = {pack2<T>(acc_dp[2 * kk][0], acc_dp[2 * kk][1]),
                                pack2<T>(acc_dp[2 * kk][2], acc_dp[2 * kk][3]),
                                pack2<T>(acc_dp[2 * kk + 1][0], acc_dp[2 * kk + 1][1]),
                                pack2<T>(acc_dp[2 * kk + 1][2], acc_dp[2 * kk + 1][3])};
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 16; ++nt) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, k_base + bt_off + (kk * 16 * kStride + nt * 16) * 2);
        const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
        mma_16816<T>(acc_dq[2 * nt], a_ds, b0);
        mma_16816<T>(acc_dq[2 * nt + 1], a_ds, b1);
      }
    }
    __syncthreads();  // done with this K/V stage before it is refilled
  }
  cp_async_wait<0>();

  T* dq_gmem = reinterpret_cast<T*>(params.dq) + seq.q_offset(params.dq_batch_stride, params.dq_row_stride) +
              h * params.dq_head_stride;  // seqlen_q x head_dim
  const float scale = params.scale_softmax;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = m_block * kBlockM + 16 * warp + g + 8 * half;
    if (row >= seqlen_q) continue;
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) {
      const int col = nt * 8 + 2 * t;
      if (col < params.head_dim)
        *reinterpret_cast<uint32_t*>(dq_gmem + (int64_t)row * params.dq_row_stride + col) =
            pack2<T>(acc_dq[nt][2 * half] * scale, acc_dq[nt][2 * half + 1] * scale);
    }
  }
}

}  // namespace bwd_sm80
}  // namespace flash_ext
