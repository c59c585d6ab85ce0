// FlashAttention forward for the sm80 family (mma.sync m16n8k16, ldmatrix, cp.async; runs on sm_80+).
// One thread block per (query row block of kBlockM rows, head, batch). kNWarps warps; warp w owns
// rows [w * kMPerWarp, (w + 1) * kMPerWarp) of the block as kMTiles m-tiles of 16 rows.
// Shared memory: Q [kBlockM x kHeadDim], K [kBlockN x kHeadDim], V [kBlockN x kHeadDim], all swizzled
// (smem_layout.cuh). Pipeline per key block j (visited from the last block down, so the masked blocks
// come first and the unmasked ones run with no per-element test):
//   wait K_j | issue V_j | S = Q K_j^T | mask | wait V_j | issue K_{j-1} | online softmax | O += P V_j
// so V_j streams in under the QK^T gemm and K_{j-1} under softmax + PV (the prologue issues Q and K).
// Tried and dropped (H200, bf16, same-machine A/B, tools/harness + an A/B driver): issuing the first V
// in the prologue and loading K through the rows-first lane map on a base shared with V cost 3-7 %
// (d64 / d128, 128x64x4 warps); a single XOR-ed ldmatrix base register per tile plus K/V pointers
// rebuilt from params every block (fewer registers) cost another 0-7 %; double-buffering K and
// hand-pipelining the gemms changed nothing beyond noise.
// d128 tuning (H200, 2026-11-21, tools/harness/fwd_harness.cu variants): the lazy rescale below is worth
// 5-12 % on 128x64x4 warps; 8 warps (128x64 or 128x128, 16 rows per warp) were 5-20 % slower than 4
// (more ldmatrix per mma, 1 block per SM at 205-230 registers, or spills at a 2-block cap). The rolled
// QK^T loop is what keeps 128x64x4 warps + lazy rescale at 255 registers without spills (unrolled it
// spills 8-56 bytes whatever the address / pointer options); two k-steps per trip cost 0-2 % against the
// spilling unrolled form, one per trip 2-6 %.
// Epilogue: O /= l, O -> shared (reusing the Q tile) -> global with 16-byte stores; lse per row.
#pragma once
#include <cstdint>
#include <cmath>
#include <type_traits>
#include "../params.h"
#include "../ptx.cuh"
#include "../mask.cuh"
#include "../score_mod.cuh"
#include "../dropout.cuh"
#include "../seqinfo.cuh"
#include "../softmax.cuh"
#include "smem_layout.cuh"

namespace flash_ext {

// Optional kernel behaviours (FwdTraits kFlags, a bit set; 0 = the plain kernel).
// kFwdRolledQK: the k-loop of S = Q K^T runs as a rolled loop (one head-dim step of 16 per trip), so
//   ptxas cannot hoist a whole gemm's ldmatrix loads ahead of the mmas (its register peak).
// kFwdLazyRescale: the running row max (and so O and the row sums) is only moved when some row of the
//   warp sees its max grow by more than kLazyRescaleLog2 (log2 units, after scaling): P is then
//   exp2(s - m_stale) <= 2^kLazyRescaleLog2, exact in fp32 / bf16 range, and O, l, lse stay exact
//   because the same stale max is used for P, l and lse. Saves the O rescale (kDTiles * 4 FMULs per
//   row pair) on almost every key block.
constexpr int kFwdRolledQK = 1;
constexpr int kFwdLazyRescale = 2;
// kFwdKVPtrFromParams: the K / V block pointers are rebuilt from params (constant bank) for every block
//   instead of keeping two 64-bit base pointers and strides live through the main loop (registers).
constexpr int kFwdKVPtrFromParams = 4;
// kFwdRolledQK2: with kFwdRolledQK, two k-steps per trip (more ILP, still no whole-gemm hoisting).
constexpr int kFwdRolledQK2 = 8;
constexpr float kLazyRescaleLog2 = 8.f;

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_,
          bool kXorQAddr_ = false, bool kXorKVAddr_ = false, int kFlags_ = 0>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Single XOR-ed ldmatrix base register for the Q tile / the K and V tiles (LdsmAddr XorBase): a few
  // registers fewer, for the configs that spill otherwise.
  static constexpr bool kXorQAddr = kXorQAddr_;
  static constexpr bool kXorKVAddr = kXorKVAddr_;
  static constexpr bool kRolledQK = (kFlags_ & kFwdRolledQK) != 0;
  static constexpr bool kLazyRescale = (kFlags_ & kFwdLazyRescale) != 0;
  static constexpr bool kKVPtrFromParams = (kFlags_ & kFwdKVPtrFromParams) != 0;
  static constexpr bool kRolledQK2 = (kFlags_ & kFwdRolledQK2) != 0;
  static constexpr int kMPerWarp = kBlockM / kNWarps;
  static_assert(kBlockM % kNWarps == 0 && kMPerWarp % 16 == 0, "each warp owns whole 16-row m-tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 32 == 0, "tile shape");
  static constexpr int kMTiles = kMPerWarp / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;     // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of O per warp
  using QTile = SwizzledTile<kBlockM, kHeadDim>;
  using KVTile = SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = (QTile::kElems + 2 * KVTile::kElems) * 2;
};

// OnlineSoftmax::rescale with the kFwdLazyRescale policy (see above). Scope: one warp (the move
// decision is warp-uniform, so the O rescale is one branch for the whole warp).
template <int kMTiles, int kNTiles, int kDTiles>
__device__ __forceinline__ void softmax_rescale_lazy(OnlineSoftmax<kMTiles>& sm, float (&s)[kMTiles][kNTiles][4],
                                                     float (&o)[kMTiles][kDTiles][4], float scale_log2) {
  float m_blk[2 * kMTiles];  // max of this block's raw scores per row (-inf: all masked)
  bool move = false;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(s[mt][nt][2 * i], s[mt][nt][2 * i + 1]));
      m = quad_allreduce_max(m);
      m_blk[mt * 2 + i] = m;
      // True on a row's first visible key (old max -inf), never for an all-masked block.
      move |= m * scale_log2 > fmaf(sm.row_max_reg[mt * 2 + i], scale_log2, kLazyRescaleLog2);
    }
  if (__any_sync(0xffffffffu, move)) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = mt * 2 + i;
        const float m = fmaxf(sm.row_max_reg[r], m_blk[r]);
        const float m_scaled = (m == -INFINITY) ? 0.f : m * scale_log2;
        const float factor = fast_exp2(sm.row_max_reg[r] * scale_log2 - m_scaled);  // old -inf -> 0
        sm.row_max_reg[r] = m;
        sm.row_sum_reg[r] *= factor;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * i] *= factor;
          o[mt][dt][2 * i + 1] *= factor;
        }
      }
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = mt * 2 + i;
      const float m_scaled = (sm.row_max_reg[r] == -INFINITY) ? 0.f : sm.row_max_reg[r] * scale_log2;
      sm.row_sum_reg[r] = exp2_row(s[mt], i, scale_log2, m_scaled, sm.row_sum_reg[r]);
    }
}

template <typename Traits, bool IsCausal, bool IsLocal = false, bool Dropout = false>
__global__ void __launch_bounds__(Traits::kNThreads, 1)  // a 3-block cap made d256 64x64 spill 650 bytes (sm_90a)
    fwd_kernel(const __grid_constant__ FwdParams params) {
  using T = typename Traits::T;
  constexpr int kHeadDim = Traits::kHeadDim, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads, kMPerWarp = Traits::kMPerWarp;
  constexpr int kMTiles = Traits::kMTiles, kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);  // kBlockM x kHeadDim (swizzled); O staging at the end
  const uint32_t q_smem_u32 = smem_u32(q_smem);
  const uint32_t k_smem_u32 = q_smem_u32 + QTile::kElems * 2;   // kBlockN x kHeadDim (swizzled)
  const uint32_t v_smem_u32 = k_smem_u32 + KVTile::kElems * 2;  // kBlockN x kHeadDim (swizzled)

  // Heavy (late, causal) row blocks first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int head_dim = params.head_dim;

  using MaskT = Mask<IsCausal, IsLocal>;
  // The general path reads variable-length batches (seqinfo.cuh); the plain and causal kernels dense ones only.
  using Seq = SeqInfoT<int, IsLocal>;
  using SeqU = SeqInfoT<unsigned, IsLocal>;
  const Seq seq(params, blockIdx.z);
  const MaskT mask(seq.seqlen_q, seq.seqlen_k, params);
  // Key blocks [n_block_min, n_block_max); [n_block_unmasked_end, n_block_max) and (a left bound only)
  // [n_block_min, n_block_unmasked_begin) need the per-element mask. Without a left bound both lower
  // bounds are the constant 0 the policy returns, spelled as a constant so that the compiler sees it
  // as early as it saw the literal 0 of the code before the policy (same branch layout).
  const int n_block_min = MaskT::kHasLeftBound ? mask.template n_block_min<kBlockM, kBlockN>(m_block) : 0;
  const int n_block_max = mask.template n_block_max<kBlockM, kBlockN>(m_block);
  const int n_block_unmasked_end = mask.template n_block_unmasked_end<kBlockM, kBlockN>(m_block);
  const int n_block_unmasked_begin =
      MaskT::kHasLeftBound ? mask.template n_block_unmasked_begin<kBlockM, kBlockN>(m_block) : 0;

  const int row_base = m_block * kBlockM;           // first query row of the block
  // The score modifiers: read (and their loops run) only in the general path's instantiation.
  const ScoreMod mod = IsLocal ? ScoreMod(params, b, h, seq.seqlen_q, seq.seqlen_k) : ScoreMod();
  // Re-read where the code before SeqInfo read it; the batch index comes from the register b where
  // K / V keep their base pointers, else from blockIdx.z (where the index is read shapes the register
  // allocation; both are the same entry).
  const int rows_valid_q =
      Seq(params, Traits::kKVPtrFromParams ? static_cast<int>(blockIdx.z) : b).seqlen_q - row_base;
  // Output pointers are rebuilt from params (constant bank) where they are used, so that nothing of
  // the epilogue stays live in registers across the main loop.
  // These rebuilt offsets (and the K / V ones of kFwdKVPtrFromParams below) take the entry index as the
  // unsigned blockIdx.z (SeqInfoT<unsigned>: zero extension, as before SeqInfo; the int SeqInfo's sign
  // extension changes the machine code of every forward kernel).
  auto out_block_ptr = [&]() {  // kBlockM rows x head_dim, row stride o_row_stride
    return reinterpret_cast<T*>(params.out) +
           SeqU(params, blockIdx.z).q_offset(params.o_batch_stride, params.o_row_stride) +
           int64_t(blockIdx.y) * params.o_head_stride +
           int64_t(gridDim.x - 1 - blockIdx.x) * kBlockM * params.o_row_stride;
  };
  auto lse_block_ptr = [&]() {  // kBlockM rows
    return params.lse + SeqU(params, blockIdx.z).lse_offset(blockIdx.y, params.nheads, params.seqlen_q) +
           int64_t(gridDim.x - 1 - blockIdx.x) * kBlockM;
  };

  if constexpr (IsLocal) {
    if (row_base >= seq.seqlen_q) return;  // a query block past a shorter sequence's end (varlen)
  }
  if (n_block_max <= n_block_min) {
    T* o_ptr = out_block_ptr();
    float* lse_ptr = lse_block_ptr();
    // The block sees no key (causal with seqlen_q > seqlen_k; an empty range): out = 0, lse = -inf (or the sink).
    constexpr int kChunksPerRow = kHeadDim / 8;
    for (int idx = tid; idx < kBlockM * kChunksPerRow; idx += kNThreads) {
      const int row = idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * 8;
      if (row < rows_valid_q && col < head_dim)
        *reinterpret_cast<uint4*>(o_ptr + row * params.o_row_stride + col) = make_uint4(0, 0, 0, 0);
    }
    if constexpr (IsLocal) {  // with sinks, lse = the sink (softmax.cuh, finalize_row_with_sink)
      const float empty_lse = params.sinks != nullptr ? __ldg(params.sinks + h) : -INFINITY;
      for (int row = tid; row < kBlockM; row += kNThreads)
        if (row < rows_valid_q) lse_ptr[row] = empty_lse;
    } else {
      for (int row = tid; row < kBlockM; row += kNThreads)
        if (row < rows_valid_q) lse_ptr[row] = -INFINITY;
    }
    return;
  }

  const int h_k = h / params.h_h_k_ratio;
  const Seq rows(params, b);  // built here, not above: keeps the block index read where it was
  const T* q_ptr = reinterpret_cast<const T*>(params.q) + rows.q_offset(params.q_batch_stride, params.q_row_stride) +
                   h * params.q_head_stride + int64_t(row_base) * params.q_row_stride;  // kBlockM rows x head_dim
  const T* k_ptr = reinterpret_cast<const T*>(params.k) + rows.k_offset(params.k_batch_stride, params.k_row_stride) +
                   h_k * params.k_head_stride;  // seqlen_k x head_dim
  const T* v_ptr = reinterpret_cast<const T*>(params.v) + rows.k_offset(params.v_batch_stride, params.v_row_stride) +
                   h_k * params.v_head_stride;  // seqlen_k x head_dim
  const int64_t k_row_stride = params.k_row_stride;
  const int64_t v_row_stride = params.v_row_stride;
  // Key block n of K / V: kBlockN rows x head_dim.
  auto k_block_ptr = [&](const int n) {
    if constexpr (Traits::kKVPtrFromParams)
      return reinterpret_cast<const T*>(params.k) +
             SeqU(params, blockIdx.z).k_offset(params.k_batch_stride, params.k_row_stride) +
             int64_t(h_k) * params.k_head_stride + int64_t(n) * kBlockN * params.k_row_stride;
    else
      return k_ptr + int64_t(n) * kBlockN * k_row_stride;
  };
  auto v_block_ptr = [&](const int n) {
    if constexpr (Traits::kKVPtrFromParams)
      return reinterpret_cast<const T*>(params.v) +
             SeqU(params, blockIdx.z).k_offset(params.v_batch_stride, params.v_row_stride) +
             int64_t(h_k) * params.v_head_stride + int64_t(n) * kBlockN * params.v_row_stride;
    else
      return v_ptr + int64_t(n) * kBlockN * v_row_stride;
  };
  const int seqlen_k = Seq(params, blockIdx.z).seqlen_k;  // re-read after the branch above, as before SeqInfo

  // Prologue: Q, then the last K block.
  load_tile_async<QTile, kNThreads>(q_smem_u32, q_ptr, params.q_row_stride, rows_valid_q, head_dim, tid);
  cp_async_commit();
  {
    const int n = n_block_max - 1;
    load_tile_async<KVTile, kNThreads>(k_smem_u32, k_block_ptr(n), k_row_stride,
                                       seqlen_k - n * kBlockN, head_dim, tid);
    cp_async_commit();
  }

  float acc_o[kMTiles][kDTiles][4];  // O rows of this warp, m16n8 accumulator layout
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;

  OnlineSoftmax<kMTiles> softmax;
  const float scale_log2 = params.scale_softmax_log2;
  const int warp_row0 = warp * kMPerWarp;  // first row of this warp within the block
  const int g = lane >> 2;                 // accumulator row within an m-tile (and +8)
  const int t = lane & 3;                  // accumulator column pair within an n-tile
  const LdsmAddr<QTile, true, Traits::kXorQAddr> q_ldsm(q_smem_u32, warp_row0, lane);  // A of S = Q K^T
  const LdsmAddr<KVTile, false, Traits::kXorKVAddr> k_ldsm(k_smem_u32, 0, lane);  // B of S = Q K^T (cols-first x4)
  // V (B of O += P V, .trans x4, rows-first): addresses are the rows-first lane bases of the K tile
  // plus the K tile's size (an immediate).
  const LdsmAddr<KVTile, true, Traits::kXorKVAddr> kv_ldsm(k_smem_u32, 0, lane);
  constexpr uint32_t kVOffsetBytes = KVTile::kElems * 2;  // v_smem_u32 - k_smem_u32

  auto iteration = [&](const int n_block, auto is_masked_tag) {
    constexpr bool kIsMasked = decltype(is_masked_tag)::value;
    // Dropout (dropout.cuh): this block's keep bits, computed before S exists (fewer live registers; the Philox
    // calls overlap the K load in flight), applied to P before P V.
    uint64_t keep[(kMTiles * kNTiles * 4 + 63) / 64];
    if constexpr (Dropout) {  // quad q: acc_s[q / kNTiles][q % kNTiles]
      const DropoutDev drop(params, b, h);
      drop.template quad_keep<kMTiles * kNTiles * 4>(keep, [&](int q, int& row, int& col) {
        row = row_base + warp_row0 + (q / kNTiles) * 16 + g;
        col = n_block * kBlockN + (q % kNTiles) * 8 + 2 * t;
      });
    }
    (void)keep;
    float acc_s[kMTiles][kNTiles][4];  // S = Q K^T of this warp's rows, m16n8 accumulator layout
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;

    cp_async_wait<0>();  // K_j (and Q, on the first block) landed
    __syncthreads();     // ... for every thread; and everyone finished reading V_{j+1}
    {
      load_tile_async<KVTile, kNThreads>(v_smem_u32, v_block_ptr(n_block), v_row_stride,
                                         seqlen_k - n_block * kBlockN, head_dim, tid);
      cp_async_commit();
    }

    // S = Q K^T: k-steps of 16 along the head dim.
    auto qk_step = [&](const int kk, auto q_addr, auto k_addr) {
      uint32_t a_reg[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        ldmatrix_x4(a_reg[mt], q_addr(mt * 16, kk));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b_reg[4];
        // Rows-first order over K rows (keys) x head-dim cols: r[0] / r[2] = b of n-tile 2np,
        // r[1] / r[3] = b of n-tile 2np + 1.
        ldmatrix_x4(b_reg, k_addr(np * 16, kk));
        const uint32_t b0[2] = {b_reg[0], b_reg[1]};
        const uint32_t b1[2] = {b_reg[2], b_reg[3]};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc_s[mt][2 * np], a_reg[mt], b0);
          mma_16816<T>(acc_s[mt][2 * np + 1], a_reg[mt], b1);
        }
      }
    };
    if constexpr (Traits::kRolledQK) {
      // Run-time k-step: column pair (kk % 4) of swizzle atom kk / 4 is the base XOR-ed with (kk % 4) << 5
      // (LdsmAddr: the swizzle only touches address bits 4..6) plus the atom's offset.
      constexpr int kPairs = QTile::kSubCols / 16;
      auto rolled_step = [&](const int kk) {
        const uint32_t x = static_cast<uint32_t>(kk % kPairs) << 5;
        const uint32_t q_base = (q_ldsm.base[0] ^ x) + (kk / kPairs) * (QTile::kRows * QTile::kSubCols * 2);
        const uint32_t k_base = (k_ldsm.base[0] ^ x) + (kk / kPairs) * (KVTile::kRows * KVTile::kSubCols * 2);
        qk_step(
            kk, [&](int row0, int) { return q_base + static_cast<uint32_t>(row0 * QTile::kSubCols * 2); },
            [&](int row0, int) { return k_base + static_cast<uint32_t>(row0 * KVTile::kSubCols * 2); });
      };
      if constexpr (Traits::kRolledQK2) {
#pragma unroll 1
        for (int kk = 0; kk < kHeadDim / 16; kk += 2) {
          rolled_step(kk);
          rolled_step(kk + 1);
        }
      } else {
#pragma unroll 1
        for (int kk = 0; kk < kHeadDim / 16; ++kk) rolled_step(kk);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)
        qk_step(
            kk, [&](int row0, int k) { return q_ldsm(row0, k * 16); },
            [&](int row0, int k) { return k_ldsm(row0, k * 16); });
    }

    if constexpr (IsLocal) {
      if (mod.has_softcap()) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = mod.softcap(acc_s[mt][nt][e]);
      }
      if (mod.has_alibi()) {
        const float col0 = static_cast<float>(n_block * kBlockN + 2 * t);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float ip = mod.row_pos(row_base + warp_row0 + mt * 16 + g + 8 * i);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                acc_s[mt][nt][2 * i + e] =
                    mod.add_alibi(acc_s[mt][nt][2 * i + e], ip, col0 + static_cast<float>(nt * 8 + e));
              }
            }
          }
        }
      }
      if (mod.has_bias()) {  // element (mt, nt, e) of acc_s: row g + 8 (e / 2) of m-tile mt, key 2t + e % 2 of n-tile nt
        add_bias<T>(flat(acc_s), mod, params, [&](int i, int& row, int& col) {
          row = row_base + warp_row0 + (i / (4 * kNTiles)) * 16 + g + 8 * ((i % 4) / 2);
          col = n_block * kBlockN + ((i / 4) % kNTiles) * 8 + 2 * t + i % 2;
        });
      }
    }
    if constexpr (kIsMasked) {
      // Keys the policy hides from the row (past seqlen_k; causal: past the diagonal) -> -inf.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int row = row_base + warp_row0 + mt * 16 + g + 8 * i;
          // The row's visible columns of this block: [lo, hi) (lo only compared with a left bound).
          const int lo = MaskT::kHasLeftBound ? mask.col_min(row) - n_block * kBlockN : 0;
          const int hi = mask.col_limit(row) - n_block * kBlockN;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
            const int col = nt * 8 + 2 * t;
            mask.apply(acc_s[mt][nt][2 * i], col, lo, hi, -INFINITY);
            mask.apply(acc_s[mt][nt][2 * i + 1], col + 1, lo, hi, -INFINITY);
          }
        }
      }
    }

    cp_async_wait<0>();  // V_j landed
    __syncthreads();     // ... for every thread; and everyone finished reading K_j
    if (n_block > n_block_min) {
      const int n = n_block - 1;
      load_tile_async<KVTile, kNThreads>(k_smem_u32, k_block_ptr(n), k_row_stride,
                                         seqlen_k - n * kBlockN, head_dim, tid);
      cp_async_commit();
    }

    if constexpr (Traits::kLazyRescale) {
      softmax_rescale_lazy(softmax, acc_s, acc_o, scale_log2);
    } else {
      softmax.rescale(acc_s, acc_o, scale_log2);
    }
    if constexpr (Dropout) dropout_zero(flat(acc_s), keep);  // dropped P -> 0 in P V (the row sums keep it)

    // O += P V: the accumulators of n-tiles 2kk and 2kk+1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a_reg[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a_reg[mt][0] = pack2<T>(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
        a_reg[mt][1] = pack2<T>(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
        a_reg[mt][2] = pack2<T>(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
        a_reg[mt][3] = pack2<T>(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t b_reg[4];
        ldmatrix_x4_trans(b_reg, kv_ldsm(kk * 16, dp * 16) + kVOffsetBytes);
        const uint32_t b0[2] = {b_reg[0], b_reg[1]};
        const uint32_t b1[2] = {b_reg[2], b_reg[3]};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], a_reg[mt], b0);
          mma_16816<T>(acc_o[mt][2 * dp + 1], a_reg[mt], b1);
        }
      }
    }
  };

  // Masked blocks on the right (the diagonal, the seqlen_k tail), the unmasked ones, then (a left
  // bound only) the masked blocks on the left.
  int n_block = n_block_max - 1;
  int n_block_masked_right_end = n_block_unmasked_end;
  if constexpr (MaskT::kHasLeftBound)
    n_block_masked_right_end = n_block_unmasked_end > n_block_min ? n_block_unmasked_end : n_block_min;
  for (; n_block >= n_block_masked_right_end; --n_block) iteration(n_block, std::true_type{});
  for (; n_block >= n_block_unmasked_begin; --n_block) iteration(n_block, std::false_type{});
  if constexpr (MaskT::kHasLeftBound) {
    for (; n_block >= n_block_min; --n_block) iteration(n_block, std::true_type{});
  }

  // Epilogue.
  float lse[2 * kMTiles];
  if constexpr (IsLocal) {
    if (params.sinks != nullptr) {
      softmax.finalize_with_sink(acc_o, scale_log2, __ldg(params.sinks + h), lse);
    } else {
      softmax.finalize(acc_o, params.scale_softmax, lse);
    }
  } else {
    softmax.finalize(acc_o, params.scale_softmax, lse);
  }
  if constexpr (Dropout) {  // the kept probabilities' 1 / (1 - p)
    const float scale = params.dropout_scale;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= scale;
  }

  // O -> shared, into this warp's own rows of the Q tile (only this warp read them).
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = warp_row0 + mt * 16 + g + 8 * i;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const uint32_t packed = pack2<T>(acc_o[mt][dt][2 * i], acc_o[mt][dt][2 * i + 1]);
        *reinterpret_cast<uint32_t*>(q_smem + QTile::offset(row, dt * 8 + 2 * t)) = packed;
      }
    }
  if (t == 0) {
    float* lse_ptr = lse_block_ptr();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = warp_row0 + mt * 16 + g + 8 * i;
        if (row < rows_valid_q) lse_ptr[row] = lse[mt * 2 + i];
      }
  }
  __syncthreads();
  // Shared -> global, 16 bytes per thread, only rows < seqlen_q and columns < head_dim.
  {
    T* o_ptr = out_block_ptr();
    constexpr int kChunksPerRow = kHeadDim / 8;
    constexpr int kTotal = kBlockM * kChunksPerRow;
#pragma unroll
    for (int i = 0; i < (kTotal + kNThreads - 1) / kNThreads; ++i) {
      const int idx = tid + i * kNThreads;
      if (kTotal % kNThreads == 0 || idx < kTotal) {
        const int row = idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * 8;
        if (row < rows_valid_q && col < head_dim)
          *reinterpret_cast<uint4*>(o_ptr + row * params.o_row_stride + col) =
              *reinterpret_cast<const uint4*>(q_smem + QTile::chunk_offset(row, col));
      }
    }
  }
}

}  // namespace flash_ext
