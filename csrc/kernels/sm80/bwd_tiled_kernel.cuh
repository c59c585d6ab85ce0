// FlashAttention backward, dK/dV kernel with 2-D warp tiling (sm80 family: mma.sync m16n8k16 +
// ldmatrix + cp.async). Torch-free. Launched by run_bwd_kernels (bwd_launch.cuh) in place of
// bwd_dkdv_kernel when the tile configuration is a BwdTiledTraits; the preprocess, dq convert and
// deterministic dQ kernels of bwd_kernel.cuh are shared.
//
// One CTA per (key block of kBlockN, K/V head, batch). K_j, V_j stay in shared memory; the CTA loops
// over the query heads of its GQA group and the query blocks (kBlockM rows) that can see the key
// block, Q_i, dO_i, lse, D double-buffered with cp.async. Per query block, each GEMM is tiled over
// all kNWarps warps in 2-D, so that no warp reads a whole operand tile (the 1-D layout of
// bwd_dkdv_kernel, where each warp owns 16 key rows, re-reads all of Q and dO in every warp: its
// ldmatrix traffic exceeded the mma time):
//   S  = Q K^T, dP = dO V^T   kBlockM x kBlockN, warps kAtomMSdP (queries) x kAtomNSdP (keys)
//   P = exp(S scale - lse), dS = P (dP - D)  -> shared memory (element type), once
//   dV += P^T dO, dK += dS^T Q   kBlockN x kHeadDim, warps kAtomNdKV (keys) x kAtomDdKV (head dim),
//                                 accumulated in registers over the whole loop (deterministic)
//   dQ_i = dS K                  kBlockM x kHeadDim, warps kAtomMdQ x kAtomDdQ, added into the fp32
//                                 dq_accum (atomic mode only): each warp stages its fp32 tile in shared
//                                 memory and adds whole 128-byte row segments with red.v4 (kDqStage 1/2;
//                                 H200, d128 16k: 282 -> 295 TFLOP/s against red.v2 from the fragments,
//                                 which touches 8 rows x 32 B per warp instruction).
// Two barriers per query block (operands ready / P, dS complete), three with kDqStage 2. Shared-memory
// rows are padded by 16 bytes (an odd number of 16-byte chunks): ldmatrix and cp.async conflict-free.
// Rows past seqlen_q (and rows that see no key: lse = -inf) get P = 0 through lse = +inf; keys past
// seqlen_k and (causal) keys right of the diagonal are masked to P = 0 in the blocks that need it.
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
#include "bwd_kernel.cuh"

namespace flash_ext {
namespace bwd_sm80 {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kAtomMSdP_, int kAtomNdKV_,
          int kAtomMdQ_, int kUnrollSdP_ = 0, int kUnrollDkv_ = 0, int kUnrollDq_ = 0, bool kPrefetchAfterS_ = true, int kDqStage_ = 0, bool kFuseSdP_ = false>
struct BwdTiledTraits {
  static constexpr bool kTiled = true;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per iteration
  static constexpr int kBlockN = kBlockN_;  // key rows per CTA
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Issue the next iteration's cp.async after the S GEMM rather than right after the barrier.
  static constexpr bool kPrefetchAfterS = kPrefetchAfterS_;
  // How dQ reaches dq_accum. 0: red.v2 straight from the mma fragments (8 rows x 32 B per warp
  // instruction). 1: each warp stages its fp32 tile in its own shared buffer and adds whole 128-byte
  // row segments with red.v4. 2: the same, staged in 32-column passes in the current Q / dO stage,
  // after an extra barrier (for head dims whose shared memory has no room for a buffer).
  static constexpr int kDqStage = kDqStage_;
  // S and dP GEMMs in one k loop (twice the independent mma per loaded k step).
  static constexpr bool kFuseSdP = kFuseSdP_;
  // S, dP warp tile.
  static constexpr int kAtomMSdP = kAtomMSdP_;
  static constexpr int kAtomNSdP = kNWarps / kAtomMSdP;
  static constexpr int kSdpWM = kBlockM / kAtomMSdP;
  static constexpr int kSdpWN = kBlockN / kAtomNSdP;
  // dK, dV warp tile.
  static constexpr int kAtomNdKV = kAtomNdKV_;
  static constexpr int kAtomDdKV = kNWarps / kAtomNdKV;
  static constexpr int kDkvWN = kBlockN / kAtomNdKV;
  static constexpr int kDkvWD = kHeadDim / kAtomDdKV;
  // dQ warp tile.
  static constexpr int kAtomMdQ = kAtomMdQ_;
  static constexpr int kAtomDdQ = kNWarps / kAtomMdQ;
  static constexpr int kDqWM = kBlockM / kAtomMdQ;
  static constexpr int kDqWD = kHeadDim / kAtomDdQ;
  static_assert(kNWarps % kAtomMSdP == 0 && kNWarps % kAtomNdKV == 0 && kNWarps % kAtomMdQ == 0, "");
  static_assert(kSdpWM % 16 == 0 && kSdpWN % 8 == 0, "S warp tile");
  static_assert(kDkvWN % 16 == 0 && kDkvWD % 8 == 0, "dK/dV warp tile");
  static_assert(kDqWM % 16 == 0 && kDqWD % 8 == 0, "dQ warp tile");
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0, "");
  static_assert(128 % kBlockM == 0, "query blocks must tile seqlen_q_rounded");

  // k-loop unroll of the S/dP GEMMs, the dK/dV GEMMs and the dQ GEMM (register pressure).
  static constexpr int kUnrollSdP = kUnrollSdP_ > 0 ? kUnrollSdP_ : kHeadDim / 16;
  static constexpr int kUnrollDkv = kUnrollDkv_ > 0 ? kUnrollDkv_ : kBlockM / 16;
  static constexpr int kUnrollDq = kUnrollDq_ > 0 ? kUnrollDq_ : kBlockN / 16;
  static constexpr int kStride = kHeadDim + 8;  // padded smem row of Q, dO, K, V (odd # of 16 B chunks)
  static constexpr int kPStride = kBlockN + 8;  // padded smem row of P, dS (query x key)
  static constexpr int kTileN = kBlockN * kStride;
  static constexpr int kTileM = kBlockM * kStride;
  static constexpr int kTileP = kBlockM * kPStride;
  static constexpr int kSmemElems = 2 * kTileN + 4 * kTileM + 2 * kTileP;
  // dQ staging: columns per pass and the padded row (floats; = 8 or 24 mod 32: conflict-free float2 writes).
  static constexpr int kDqPassW = kDqStage == 2 ? 32 : kDqWD;
  static_assert(kDqWD % kDqPassW == 0 && kDqPassW % 8 == 0, "");
  static constexpr int kDqStageStride = kDqPassW % 32 == 8 || kDqPassW % 32 == 24 ? kDqPassW
                                        : kDqPassW % 32 < 8 ? kDqPassW - kDqPassW % 32 + 8
                                        : kDqPassW % 32 < 24 ? kDqPassW - kDqPassW % 32 + 24
                                                             : kDqPassW - kDqPassW % 32 + 40;
  static constexpr int kDqStageFloats = kDqWM * kDqStageStride;  // per warp
  static_assert(kDqStage != 2 || (kNWarps % 2 == 0 && (kNWarps / 2) * kDqStageFloats * 4 <= kTileM * 2),
                "dQ staging must fit in one Q (dO) stage");
  static constexpr int kSmemBytes = kSmemElems * 2 + 4 * kBlockM * (int)sizeof(float) +
                                    (kDqStage == 1 ? kNWarps * kDqStageFloats * 4 : 0);
};

// One warp: acc[MT][NT] (16 x 8 mma tiles) += A (MT*16 x KSteps*16) * B (KSteps*16 x NT*8), both in
// shared memory. a_addr / b_addr: shared byte address of tile (0, 0) plus this lane's ldmatrix offset.
//   ATrans = false: A stored [m][k] (row stride SA), lane offset lane_off_a<SA>;
//   ATrans = true:  A stored [k][m], ldmatrix .trans, lane offset lane_off_a_km<SA>.
//   BTrans = false: B stored [n][k] (row stride SB), lane offset lane_off_b_nk<SB>;
//   BTrans = true:  B stored [k][n], ldmatrix .trans, lane offset lane_off_b_kn<SB>.
// KUnroll: unroll factor of the k loop (full unrolling lets the compiler hoist every ldmatrix).
template <typename T, int MT, int NT, int KSteps, bool ATrans, bool BTrans, int SA, int SB, int KUnroll = KSteps>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[MT][NT][4], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll KUnroll
  for (int ks = 0; ks < KSteps; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      if constexpr (ATrans) ldmatrix_x4_trans(a[mi], a_addr + (ks * 16 * SA + mi * 16) * 2);
      else ldmatrix_x4(a[mi], a_addr + (mi * 16 * SA + ks * 16) * 2);
    }
#pragma unroll
    for (int nj = 0; nj < NT / 2; ++nj) {
      uint32_t b[4];
      if constexpr (BTrans) ldmatrix_x4_trans(b, b_addr + (ks * 16 * SB + nj * 16) * 2);
      else ldmatrix_x4(b, b_addr + (nj * 16 * SB + ks * 16) * 2);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(acc[mi][2 * nj], a[mi], b0);
        mma_16816<T>(acc[mi][2 * nj + 1], a[mi], b1);
      }
    }
    if constexpr (NT % 2 == 1) {
      uint32_t b[2];
      if constexpr (BTrans) ldmatrix_x2_trans(b, b_addr + (ks * 16 * SB + (NT - 1) * 8) * 2);
      else ldmatrix_x2(b, b_addr + ((NT - 1) * 8 * SB + ks * 16) * 2);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) mma_16816<T>(acc[mi][NT - 1], a[mi], b);
    }
  }
}

// Two independent GEMMs with the same shapes (S = Q K^T and dP = dO V^T) in one k loop; A stored [m][k],
// B stored [n][k] (no transposes).
template <typename T, int MT, int NT, int KSteps, int SA, int SB, int KUnroll = KSteps>
__device__ __forceinline__ void warp_gemm_ss_x2(float (&acc0)[MT][NT][4], float (&acc1)[MT][NT][4], uint32_t a0_addr,
                                                uint32_t b0_addr, uint32_t a1_addr, uint32_t b1_addr) {
  static_assert(NT % 2 == 0, "");
#pragma unroll KUnroll
  for (int ks = 0; ks < KSteps; ++ks) {
    uint32_t a0[MT][4], a1[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      ldmatrix_x4(a0[mi], a0_addr + (mi * 16 * SA + ks * 16) * 2);
      ldmatrix_x4(a1[mi], a1_addr + (mi * 16 * SA + ks * 16) * 2);
    }
#pragma unroll
    for (int nj = 0; nj < NT / 2; ++nj) {
      uint32_t b0[4], b1[4];
      ldmatrix_x4(b0, b0_addr + (nj * 16 * SB + ks * 16) * 2);
      ldmatrix_x4(b1, b1_addr + (nj * 16 * SB + ks * 16) * 2);
      const uint32_t b00[2] = {b0[0], b0[1]}, b01[2] = {b0[2], b0[3]};
      const uint32_t b10[2] = {b1[0], b1[1]}, b11[2] = {b1[2], b1[3]};
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(acc0[mi][2 * nj], a0[mi], b00);
        mma_16816<T>(acc0[mi][2 * nj + 1], a0[mi], b01);
        mma_16816<T>(acc1[mi][2 * nj], a1[mi], b10);
        mma_16816<T>(acc1[mi][2 * nj + 1], a1[mi], b11);
      }
    }
  }
}

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// 4-byte asynchronous copy global -> shared (zero-fill when !pred; src must stay a valid address).
__device__ __forceinline__ void cp_async_4(uint32_t dst_smem, const void* src_gmem, bool pred) {
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_smem), "l"(src_gmem), "r"(src_bytes));
}

// Asynchronously copy rows [0, kRows) x cols [0, kHeadDim) of a global tile whose row 0 is row0_gmem
// into shared memory (row stride kStride); rows >= nrows_valid and cols >= head_dim are zero-filled.
// Executed by all kNThreads threads. The chunk -> (row, col) map is written so that each thread keeps
// one column and steps rows by a constant: a few integer ops per 16-byte copy (the generic
// `c += kNThreads` loop compiled to a remainder loop with ~25 instructions per copy, issued right
// after the iteration barrier).
template <int kRows, int kHeadDim, int kStride, int kNThreads, typename T>
__device__ __forceinline__ void load_rows_async(uint32_t tile_smem, const T* row0_gmem, int64_t row_stride,
                                                int nrows_valid, int head_dim, int tid) {
  constexpr int kCPR = kHeadDim / 8;  // 16-byte chunks per row
  // Threads per row: kCPR rounded up to a power of two (d96/160/192/224 leave some threads idle), so
  // that each thread keeps one column and steps rows by a constant: loop-invariant addresses stay
  // two registers (a per-copy (row, col) map made the compiler keep every copy's offset live).
  constexpr int kTPR = kCPR <= 4 ? 4 : kCPR <= 8 ? 8 : kCPR <= 16 ? 16 : 32;
  static_assert(kNThreads % kTPR == 0, "");
  constexpr int kRowStep = kNThreads / kTPR;
  constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  const int r0 = tid / kTPR, cc = tid % kTPR;
  if (kCPR != kTPR && cc >= kCPR) return;
  const bool col_ok = cc * 8 < head_dim;
  const T* src0 = row0_gmem + (int64_t)r0 * row_stride + cc * 8;
  const uint32_t dst0 = tile_smem + (r0 * kStride + cc * 8) * 2;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    if (kRows % kRowStep != 0 && r0 + i * kRowStep >= kRows) break;
    const bool valid = col_ok && r0 + i * kRowStep < nrows_valid;
    cp_async_16(dst0 + i * kRowStep * kStride * 2, valid ? src0 + i * kRowStep * row_stride : row0_gmem, valid);
  }
}

// dst[0..3] += v in global memory (fp32 reduction; dst 16-byte aligned). One instruction on sm_90.
__device__ __forceinline__ void red_add_f32x4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w)
               : "memory");
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
  atomicAdd(dst + 2, v.z);
  atomicAdd(dst + 3, v.w);
#endif
}

// One warp: add columns [NT0 * 8, NT0 * 8 + kPassW) of its fp32 tile acc (MT*16 rows, mma fragment
// layout) into global memory (row pitch kGStride floats) through the warp's shared buffer stage_smem
// (MT*16 x kSStride floats): fragments -> shared (float2), __syncwarp, rows of float4 -> red.v4, so that
// each warp instruction covers whole 128-byte line segments instead of 8 rows x 32 bytes.
template <int NT0, int kPassW, int kSStride, int kGStride, int MT, int NT>
__device__ __forceinline__ void red_tile_staged(const float (&acc)[MT][NT][4], float* stage_smem, float* dst_gmem,
                                                int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kPassW / 8; ++ni) {
      float* p = stage_smem + (mi * 16 + g) * kSStride + ni * 8 + 2 * t;
      *reinterpret_cast<float2*>(p) = make_float2(acc[mi][NT0 + ni][0], acc[mi][NT0 + ni][1]);
      *reinterpret_cast<float2*>(p + 8 * kSStride) = make_float2(acc[mi][NT0 + ni][2], acc[mi][NT0 + ni][3]);
    }
  }
  __syncwarp();
  constexpr int kCPR = kPassW / 4;  // float4 chunks per row
  constexpr int kChunks = MT * 16 * kCPR;
  static_assert(kChunks % 32 == 0, "");
  if constexpr (32 % kCPR == 0) {  // each lane keeps one column; rows step by 32 / kCPR
    constexpr int kRowStep = 32 / kCPR;
    const float* src = stage_smem + (lane / kCPR) * kSStride + (lane % kCPR) * 4;
    float* dst = dst_gmem + (lane / kCPR) * kGStride + (lane % kCPR) * 4;
#pragma unroll 2  // registers: full unrolling hoists every shared load
    for (int i = 0; i < kChunks / 32; ++i) {
      const float4 v = *reinterpret_cast<const float4*>(src + i * kRowStep * kSStride);
      red_add_f32x4(dst + i * kRowStep * kGStride, v);
    }
  } else {
#pragma unroll 2
    for (int i = 0; i < kChunks / 32; ++i) {
      const int c = lane + 32 * i;
      const int r = c / kCPR, cc = c % kCPR;
      const float4 v = *reinterpret_cast<const float4*>(stage_smem + r * kSStride + cc * 4);
      red_add_f32x4(dst_gmem + r * kGStride + cc * 4, v);
    }
  }
  __syncwarp();  // the buffer may be rewritten next
}

// Grid: (ceil(seqlen_k / kBlockN), nheads_k, batch). Block: kNThreads. Dynamic smem: kSmemBytes.
template <typename Traits, typename T, bool IsCausal, bool IsLocal = false, bool Dropout = false>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
bwd_dkdv_tiled_kernel(const __grid_constant__ BwdParams params) {
  constexpr int kHeadDim = Traits::kHeadDim, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads, kStride = Traits::kStride, kPStride = Traits::kPStride;
  constexpr int kSdpMT = Traits::kSdpWM / 16, kSdpNT = Traits::kSdpWN / 8;
  constexpr int kDkvMT = Traits::kDkvWN / 16, kDkvNT = Traits::kDkvWD / 8;
  constexpr int kDqMT = Traits::kDqWM / 16, kDqNT = Traits::kDqWD / 8;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // Configs that need more shared memory than any sm_8x chip has (A100: 163 KB) never run as sm_8x
  // machine code (the launcher falls back to bwd_dkdv_kernel there); a shorter dK/dV unroll and the
  // unfused S/dP loop only keep that build spill-free (d256: 8 bytes, fused d64: 4 bytes otherwise).
  constexpr bool kSm8xOnly = Traits::kSmemBytes > 163 * 1024;
  constexpr int kUnrollDkv = kSm8xOnly ? 2 : Traits::kUnrollDkv;
  constexpr bool kFuseSdP = Traits::kFuseSdP && !kSm8xOnly;
#else
  constexpr int kUnrollDkv = Traits::kUnrollDkv;
  constexpr bool kFuseSdP = Traits::kFuseSdP;
#endif

  extern __shared__ __align__(16) char smem_raw[];
  T* k_smem = reinterpret_cast<T*>(smem_raw);      // kBlockN x kStride
  T* v_smem = k_smem + Traits::kTileN;             // kBlockN x kStride
  T* q_smem = v_smem + Traits::kTileN;             // 2 stages x kBlockM x kStride
  T* do_smem = q_smem + 2 * Traits::kTileM;        // 2 stages x kBlockM x kStride
  T* p_smem = do_smem + 2 * Traits::kTileM;        // kBlockM x kPStride (query x key)
  T* ds_smem = p_smem + Traits::kTileP;            // kBlockM x kPStride (query x key)
  float* lse_smem = reinterpret_cast<float*>(ds_smem + Traits::kTileP);  // 2 x kBlockM, lse (raw)
  float* dsum_smem = lse_smem + 2 * kBlockM;       // 2 x kBlockM, D = rowsum(dO * O)

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  // The general path reads variable-length batches (seqinfo.cuh); the plain and causal kernels dense ones only.
  const SeqInfoT<int, IsLocal> seq(params, b);
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  const bool with_dq = !params.deterministic;
  if constexpr (IsLocal) {
    if (n_block * kBlockN >= seqlen_k) return;  // a key block past a shorter sequence's end (varlen)
  }

  using MaskT = Mask<IsCausal, IsLocal>;
  const MaskT mask(seqlen_q, seqlen_k, params);
  const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
  // The plain / causal policy's m_block_max is this same expression; calling it (and seq.k_offset for K / V
  // below) changes the machine code of the kDqStage 2 configs (d128, d256): sm80/NOTES.md.
  const int m_block_max =
      IsLocal ? mask.template m_block_max<kBlockM, kBlockN>(n_block) : (seqlen_q + kBlockM - 1) / kBlockM;
  const int n_m = m_block_max > m_block_min ? m_block_max - m_block_min : 0;
  const int n_iter = n_m * params.h_h_k_ratio;  // (query head of the group, query block) pairs

  // TODO(seqinfo.cuh): seq.k_offset (same arithmetic) changes the d128 / d256 machine code, see above.
  // (The general path's instantiation takes them from seq.k_offset: varlen.)
  const T* k_gmem = reinterpret_cast<const T*>(params.k) +
                    (IsLocal ? seq.k_offset(params.k_batch_stride, params.k_row_stride) : b * params.k_batch_stride) +
                    hk * params.k_head_stride;  // seqlen_k x head_dim
  const T* v_gmem = reinterpret_cast<const T*>(params.v) +
                    (IsLocal ? seq.k_offset(params.v_batch_stride, params.v_row_stride) : b * params.v_batch_stride) +
                    hk * params.v_head_stride;  // seqlen_k x head_dim

  // Issue the loads of one iteration into `stage`: Q_i, dO_i, and the raw lse and D rows (cp.async,
  // so that no thread waits on a global load; lse is turned into log2 units where it is read).
  auto load_iter = [&](int h, int m_block, int stage) {
    const int row0 = m_block * kBlockM;
    const T* q_gmem = reinterpret_cast<const T*>(params.q) + seq.q_offset(params.q_batch_stride, params.q_row_stride) +
                      h * params.q_head_stride + (int64_t)row0 * params.q_row_stride;  // kBlockM x head_dim
    const T* do_gmem = reinterpret_cast<const T*>(params.dout) + seq.q_offset(params.do_batch_stride, params.do_row_stride) +
                       h * params.do_head_stride + (int64_t)row0 * params.do_row_stride;  // kBlockM x head_dim
    load_rows_async<kBlockM, kHeadDim, kStride, kNThreads>(smem_u32(q_smem + stage * Traits::kTileM), q_gmem,
                                                          params.q_row_stride, seqlen_q - row0, params.head_dim, tid);
    load_rows_async<kBlockM, kHeadDim, kStride, kNThreads>(smem_u32(do_smem + stage * Traits::kTileM), do_gmem,
                                                          params.do_row_stride, seqlen_q - row0, params.head_dim, tid);
    const int64_t bh = seq.head_index(h, params.nheads);
    static_assert(2 * kBlockM <= kNThreads, "one lse or D element per thread");
    if (tid < kBlockM) {
      const int row = row0 + tid;
      // lse row (batch x nheads x seqlen_q; the general path: SeqInfo::lse_offset, varlen)
      const float* src = params.lse + (IsLocal ? seq.lse_offset(h, params.nheads, seqlen_q) : bh * seqlen_q) + row;
      cp_async_4(smem_u32(lse_smem + stage * kBlockM + tid), row < seqlen_q ? src : params.lse, row < seqlen_q);
    } else if (tid < 2 * kBlockM) {
      const int i = tid - kBlockM;  // rows < the entry's workspace rows: always inside dsoftmax_sum
      const int64_t ws_row0 = IsLocal ? seq.ws_offset(h, params.nheads, params.seqlen_q_rounded)
                                      : bh * params.seqlen_q_rounded;
      cp_async_4(smem_u32(dsum_smem + stage * kBlockM + i), params.dsoftmax_sum + ws_row0 + row0 + i, true);
    }
  };

  load_rows_async<kBlockN, kHeadDim, kStride, kNThreads>(smem_u32(k_smem), k_gmem + (int64_t)n_block * kBlockN * params.k_row_stride,
                                                        params.k_row_stride, seqlen_k - n_block * kBlockN, params.head_dim, tid);
  load_rows_async<kBlockN, kHeadDim, kStride, kNThreads>(smem_u32(v_smem), v_gmem + (int64_t)n_block * kBlockN * params.v_row_stride,
                                                        params.v_row_stride, seqlen_k - n_block * kBlockN, params.head_dim, tid);
  if (n_iter > 0) load_iter(hk * params.h_h_k_ratio, m_block_min, 0);
  cp_async_commit();

  // Warp coordinates in each GEMM.
  const int sdp_wm = warp % Traits::kAtomMSdP, sdp_wn = warp / Traits::kAtomMSdP;
  const int dkv_wn = warp % Traits::kAtomNdKV, dkv_wd = warp / Traits::kAtomNdKV;
  const int dq_wm = warp % Traits::kAtomMdQ, dq_wd = warp / Traits::kAtomMdQ;
  // Per-lane byte offsets of the operand tiles.
  const uint32_t sdp_a_off = (sdp_wm * Traits::kSdpWM * kStride + lane_off_a<kStride>(lane)) * 2;     // Q, dO [query][d]
  const uint32_t sdp_b_off = (sdp_wn * Traits::kSdpWN * kStride + lane_off_b_nk<kStride>(lane)) * 2;  // K, V [key][d]
  const uint32_t dkv_a_off = (dkv_wn * Traits::kDkvWN + lane_off_a_km<kPStride>(lane)) * 2;        // P, dS [query][key] as A^T
  const uint32_t dkv_b_off = (dkv_wd * Traits::kDkvWD + lane_off_b_kn<kStride>(lane)) * 2;         // dO, Q [query][d]
  const uint32_t dq_a_off = (dq_wm * Traits::kDqWM * kPStride + lane_off_a<kPStride>(lane)) * 2;     // dS [query][key]
  const uint32_t dq_b_off = (dq_wd * Traits::kDqWD + lane_off_b_kn<kStride>(lane)) * 2;            // K [key][d]
  const uint32_t k_base = smem_u32(k_smem), v_base = smem_u32(v_smem);
  const uint32_t p_base = smem_u32(p_smem), ds_base = smem_u32(ds_smem);

  float acc_dv[kDkvMT][kDkvNT][4];  // kDkvWN keys x kDkvWD of dV
  float acc_dk[kDkvMT][kDkvNT][4];
  zero_acc(acc_dv);
  zero_acc(acc_dk);

  const float scale_log2 = params.scale_softmax_log2;
  int h = hk * params.h_h_k_ratio, m_block = m_block_min;
  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    const HeadBlock next = next_head_block(h, m_block, m_block_min, m_block_max);  // iteration it + 1
    // After this barrier: stage `stage` (and K, V) is visible; every warp is done with iteration it-1,
    // so stage^1, P and dS may be overwritten.
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (!Traits::kPrefetchAfterS) {
      if (it + 1 < n_iter) load_iter(next.h, next.m_block, stage ^ 1);
      cp_async_commit();
    }

    const uint32_t q_base = smem_u32(q_smem + stage * Traits::kTileM);
    const uint32_t do_base = smem_u32(do_smem + stage * Traits::kTileM);
    const float* lse_s = lse_smem + stage * kBlockM;
    const float* dsum_s = dsum_smem + stage * kBlockM;

    // S = Q K^T (warp tile kSdpWM x kSdpWN).
    float acc_s[kSdpMT][kSdpNT][4];
    float acc_dp[kSdpMT][kSdpNT][4];
    zero_acc(acc_s);
    if constexpr (kFuseSdP) {  // and dP = dO V^T
      zero_acc(acc_dp);
      warp_gemm_ss_x2<T, kSdpMT, kSdpNT, kHeadDim / 16, kStride, kStride, Traits::kUnrollSdP>(
          acc_s, acc_dp, q_base + sdp_a_off, k_base + sdp_b_off, do_base + sdp_a_off, v_base + sdp_b_off);
    } else {
      warp_gemm_ss<T, kSdpMT, kSdpNT, kHeadDim / 16, false, false, kStride, kStride, Traits::kUnrollSdP>(acc_s, q_base + sdp_a_off,
                                                                                     k_base + sdp_b_off);
    }
    if constexpr (Traits::kPrefetchAfterS) {  // the S mma start right after the barrier
      if (it + 1 < n_iter) load_iter(next.h, next.m_block, stage ^ 1);
      cp_async_commit();
    }
    // The score modifiers of query head h (general path only; a default ScoreMod, never read, in the plain and causal
    // instantiations): queries m_block kBlockM + row_l, keys n_block kBlockN + col_l (as below).
    const ScoreMod mod = IsLocal ? ScoreMod(params, b, h, seqlen_q, seqlen_k) : ScoreMod();
    if constexpr (IsLocal) {
      const float ip_blk = mod.row_pos(m_block * kBlockM), key_blk = static_cast<float>(n_block * kBlockN);
      if (mod.has_softcap()) {
#pragma unroll
        for (int mi = 0; mi < kSdpMT; ++mi)
#pragma unroll
          for (int ni = 0; ni < kSdpNT; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mi][ni][e] = mod.softcap(acc_s[mi][ni][e]);
      }
      if (mod.has_alibi()) {
#pragma unroll
        for (int mi = 0; mi < kSdpMT; ++mi)
#pragma unroll
          for (int ni = 0; ni < kSdpNT; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row_l = sdp_wm * Traits::kSdpWM + mi * 16 + g + 8 * (e >> 1);
              const int col_l = sdp_wn * Traits::kSdpWN + ni * 8 + 2 * t + (e & 1);
              acc_s[mi][ni][e] = mod.add_alibi(acc_s[mi][ni][e], ip_blk + static_cast<float>(row_l),
                                               key_blk + static_cast<float>(col_l));
            }
      }
      if (mod.has_bias()) {  // element (mi, ni, e): row g + 8 (e / 2) of m-tile mi, key 2t + e % 2 of n-tile ni
        add_bias<T>(flat(acc_s), mod, params, [&](int i, int& row, int& col) {
          row = m_block * kBlockM + sdp_wm * Traits::kSdpWM + (i / (4 * kSdpNT)) * 16 + g + 8 * ((i % 4) / 2);
          col = n_block * kBlockN + sdp_wn * Traits::kSdpWN + ((i / 4) % kSdpNT) * 8 + 2 * t + i % 2;
        });
      }
    }
    // P = exp2(S scale_log2 - lse_log2), masked.
    {
      const bool need_mask = IsLocal ? mask.template block_needs_mask<kBlockM, kBlockN>(m_block, n_block)
                                     : (n_block + 1) * kBlockN > seqlen_k ||
                                           (IsCausal && (n_block + 1) * kBlockN - 1 > m_block * kBlockM + seqlen_k - seqlen_q);
#pragma unroll
      for (int mi = 0; mi < kSdpMT; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row_l = sdp_wm * Traits::kSdpWM + mi * 16 + g + 8 * half;  // query within the block
          // +inf makes P = exp2(s - inf) = 0: rows that see no key (lse = -inf) and rows past seqlen_q.
          const float lse_raw = lse_s[row_l];
          const float lse_r = (m_block * kBlockM + row_l < seqlen_q && lse_raw != -INFINITY) ? lse_raw * kLog2e : INFINITY;
          const int col_lim = mask.col_limit(m_block * kBlockM + row_l) - n_block * kBlockN;
          // The left bound (local policy only; the plain / causal policy has none).
          const int col_lo = IsLocal ? mask.col_min(m_block * kBlockM + row_l) - n_block * kBlockN : 0;
#pragma unroll
          for (int ni = 0; ni < kSdpNT; ++ni) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float p = fast_exp2(fmaf(acc_s[mi][ni][2 * half + e], scale_log2, -lse_r));
              if constexpr (IsLocal) {
                const int col = sdp_wn * Traits::kSdpWN + ni * 8 + 2 * t + e;
                if (need_mask && (col >= col_lim || col < col_lo)) p = 0.f;
              } else {
                if (need_mask && sdp_wn * Traits::kSdpWN + ni * 8 + 2 * t + e >= col_lim) p = 0.f;
              }
              acc_s[mi][ni][2 * half + e] = p;
            }
          }
        }
      }
    }
    // dP = dO V^T.
    if constexpr (!kFuseSdP) {
      zero_acc(acc_dp);
      warp_gemm_ss<T, kSdpMT, kSdpNT, kHeadDim / 16, false, false, kStride, kStride, Traits::kUnrollSdP>(acc_dp, do_base + sdp_a_off,
                                                                                     v_base + sdp_b_off);
    }
    // Dropout (dropout.cuh): dP o Z / (1 - p) here; the P that dV += P^T dO reads is P o Z / (1 - p) (below).
    constexpr int kSdpElems = kSdpMT * kSdpNT * 4;
    uint64_t keep[(kSdpElems + 63) / 64];
    if constexpr (Dropout) {
      const DropoutDev drop(params, b, h);
      drop.template quad_keep<kSdpElems>(keep, [&](int q, int& row, int& col) {  // quad q: acc_s[q / NT][q % NT]
        row = m_block * kBlockM + sdp_wm * Traits::kSdpWM + (q / kSdpNT) * 16 + g;
        col = n_block * kBlockN + sdp_wn * Traits::kSdpWN + (q % kSdpNT) * 8 + 2 * t;
      });
      dropout_apply(flat(acc_dp), keep, drop.scale);
    }
    (void)keep;
    if constexpr (IsLocal) {
      if (params.dsink_accum != nullptr) {  // the sinks' gradient terms exp(sink - lse) P dP (params.h)
        const float sink_log2 = sink_log2_of(params, h);
        float terms = 0.f;
#pragma unroll
        for (int mi = 0; mi < kSdpMT; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row_l = sdp_wm * Traits::kSdpWM + mi * 16 + g + 8 * half;
            const float lse_raw = lse_s[row_l];  // +inf (P = 0, share 0) past seqlen_q and where no key is seen
            const float lse_r = (m_block * kBlockM + row_l < seqlen_q && lse_raw != -INFINITY) ? lse_raw * kLog2e : INFINITY;
            float row_terms = 0.f;
#pragma unroll
            for (int ni = 0; ni < kSdpNT; ++ni) {
              row_terms = fmaf(acc_s[mi][ni][2 * half], acc_dp[mi][ni][2 * half], row_terms);
              row_terms = fmaf(acc_s[mi][ni][2 * half + 1], acc_dp[mi][ni][2 * half + 1], row_terms);
            }
            terms = fmaf(sink_share(sink_log2, lse_r), row_terms, terms);
          }
        }
        add_dsink_terms(params, b, h, dsink_slot<kBlockN, Traits::kNWarps>(n_block, warp), terms);
      }
    }
    // dS = P (dP - D); P and dS -> shared memory (element type).
#pragma unroll
    for (int mi = 0; mi < kSdpMT; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row_l = sdp_wm * Traits::kSdpWM + mi * 16 + g + 8 * half;
        const float dsum = dsum_s[row_l];
#pragma unroll
        for (int ni = 0; ni < kSdpNT; ++ni) {
          const int col_l = sdp_wn * Traits::kSdpWN + ni * 8 + 2 * t;
          const float p0 = acc_s[mi][ni][2 * half], p1 = acc_s[mi][ni][2 * half + 1];
          float ds0 = p0 * (acc_dp[mi][ni][2 * half] - dsum);
          float ds1 = p1 * (acc_dp[mi][ni][2 * half + 1] - dsum);
          if constexpr (IsLocal) {
            const int row = m_block * kBlockM + row_l, col = n_block * kBlockN + col_l;
            if (params.dbias_accum != nullptr) {  // dbias = dS (before the softcap's factor)
              float* dbias_bh = params.dbias_accum + (int64_t(b) * params.nheads + h) * int64_t(seqlen_q) * seqlen_k;
              const ScoreMod::Strides st = mod.strides(params);
              mod.store_dbias(dbias_bh, st, row, col, ds0);
              mod.store_dbias(dbias_bh, st, row, col + 1, ds1);
            }
            if (mod.has_softcap()) {  // through the softcap: dS o (1 - t^2), t from P (ScoreMod::dtanh_from_p)
              const float ip_blk = mod.row_pos(m_block * kBlockM), key_blk = static_cast<float>(n_block * kBlockN);
              const float lse_raw = lse_s[row_l];
              const float lse_r = lse_raw * kLog2e;  // (P = 0 where it was +inf: dtanh_from_p gives 0 there)
              const float ip = ip_blk + static_cast<float>(row_l), key = key_blk + static_cast<float>(col_l);
              float add0 = mod.alibi_term(ip, key), add1 = mod.alibi_term(ip, key + 1.f);
              if (mod.has_bias()) {
                const ScoreMod::Strides st = mod.strides(params);
                add0 += mod.bias_at<T>(st, row, col);
                add1 += mod.bias_at<T>(st, row, col + 1);
              }
              ds0 *= mod.dtanh_from_p(p0, lse_r, add0);
              ds1 *= mod.dtanh_from_p(p1, lse_r, add1);
            }
          }
          float pv0 = p0, pv1 = p1;  // the P of dV += P^T dO
          if constexpr (Dropout) {
            const int i = (mi * kSdpNT + ni) * 4 + 2 * half;  // flat index of acc_s[mi][ni][2 half]
            pv0 = dropout_kept(keep, i) ? p0 * params.dropout_scale : 0.f;
            pv1 = dropout_kept(keep, i + 1) ? p1 * params.dropout_scale : 0.f;
          }
          *reinterpret_cast<uint32_t*>(p_smem + row_l * kPStride + col_l) = pack2<T>(pv0, pv1);
          *reinterpret_cast<uint32_t*>(ds_smem + row_l * kPStride + col_l) = pack2<T>(ds0, ds1);
        }
      }
    }
    __syncthreads();  // P, dS complete

    auto dq_step = [&]() {
      // dQ_i += dS K (k = key), fp32 reductions into dq_accum.
      if (with_dq) {
        float acc_dq[kDqMT][kDqNT][4];
        zero_acc(acc_dq);
        warp_gemm_ss<T, kDqMT, kDqNT, kBlockN / 16, false, true, kPStride, kStride, Traits::kUnrollDq>(acc_dq, ds_base + dq_a_off,
                                                                                    k_base + dq_b_off);
        const int64_t ws_row0 = IsLocal ? seq.ws_offset(h, params.nheads, params.seqlen_q_rounded)
                                        : seq.head_index(h, params.nheads) * params.seqlen_q_rounded;
        float* dqa_gmem = params.dq_accum +
                          (ws_row0 + m_block * kBlockM) * kHeadDim;  // kBlockM x kHeadDim (fp32, the entry's rows)
        if constexpr (Traits::kDqStage == 0) {
#pragma unroll
          for (int mi = 0; mi < kDqMT; ++mi) {
#pragma unroll
            for (int ni = 0; ni < kDqNT; ++ni) {
              float* p0 = dqa_gmem + (dq_wm * Traits::kDqWM + mi * 16 + g) * kHeadDim +
                          dq_wd * Traits::kDqWD + ni * 8 + 2 * t;
              red_add_f32x2(p0, acc_dq[mi][ni][0], acc_dq[mi][ni][1]);
              red_add_f32x2(p0 + 8 * kHeadDim, acc_dq[mi][ni][2], acc_dq[mi][ni][3]);
            }
          }
        } else {
          float* stage_buf;
          if constexpr (Traits::kDqStage == 1) {
            stage_buf = dsum_smem + 2 * kBlockM + warp * Traits::kDqStageFloats;
          } else {
            __syncthreads();  // every warp is done with Q and dO of this stage (dK, dV GEMMs)
            constexpr int kHalf = Traits::kNWarps / 2;
            stage_buf = reinterpret_cast<float*>(warp < kHalf ? q_smem + stage * Traits::kTileM
                                                              : do_smem + stage * Traits::kTileM) +
                        (warp % kHalf) * Traits::kDqStageFloats;
          }
          float* dst = dqa_gmem + dq_wm * Traits::kDqWM * kHeadDim + dq_wd * Traits::kDqWD;
          red_tile_staged<0, Traits::kDqPassW, Traits::kDqStageStride, kHeadDim>(acc_dq, stage_buf, dst, lane);
          if constexpr (Traits::kDqWD / Traits::kDqPassW >= 2)
            red_tile_staged<Traits::kDqPassW / 8, Traits::kDqPassW, Traits::kDqStageStride, kHeadDim>(
                acc_dq, stage_buf, dst + Traits::kDqPassW, lane);
          static_assert(Traits::kDqWD / Traits::kDqPassW <= 2, "");
        }
      }
    };
    // dV += P^T dO, dK += dS^T Q (k = query).
    warp_gemm_ss<T, kDkvMT, kDkvNT, kBlockM / 16, true, true, kPStride, kStride, kUnrollDkv>(acc_dv, p_base + dkv_a_off,
                                                                                 do_base + dkv_b_off);
    warp_gemm_ss<T, kDkvMT, kDkvNT, kBlockM / 16, true, true, kPStride, kStride, kUnrollDkv>(acc_dk, ds_base + dkv_a_off,
                                                                                 q_base + dkv_b_off);
    dq_step();
    h = next.h; m_block = next.m_block;
  }
  cp_async_wait<0>();

  // Epilogue: dK * scale and dV in the element type; rows < seqlen_k, cols < head_dim.
  T* dk_gmem = reinterpret_cast<T*>(params.dk) + seq.k_offset(params.dk_batch_stride, params.dk_row_stride) + hk * params.dk_head_stride;  // seqlen_k x head_dim
  T* dv_gmem = reinterpret_cast<T*>(params.dv) + seq.k_offset(params.dv_batch_stride, params.dv_row_stride) + hk * params.dv_head_stride;  // seqlen_k x head_dim
  const float scale = params.scale_softmax;
#pragma unroll
  for (int mi = 0; mi < kDkvMT; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = n_block * kBlockN + dkv_wn * Traits::kDkvWN + mi * 16 + g + 8 * half;
      if (key >= seqlen_k) continue;
#pragma unroll
      for (int ni = 0; ni < kDkvNT; ++ni) {
        const int col = dkv_wd * Traits::kDkvWD + ni * 8 + 2 * t;
        if (col < params.head_dim) {
          *reinterpret_cast<uint32_t*>(dk_gmem + (int64_t)key * params.dk_row_stride + col) =
              pack2<T>(acc_dk[mi][ni][2 * half] * scale, acc_dk[mi][ni][2 * half + 1] * scale);
          *reinterpret_cast<uint32_t*>(dv_gmem + (int64_t)key * params.dv_row_stride + col) =
              pack2<T>(acc_dv[mi][ni][2 * half], acc_dv[mi][ni][2 * half + 1]);
        }
      }
    }
  }
}

}  // namespace bwd_sm80
}  // namespace flash_ext
