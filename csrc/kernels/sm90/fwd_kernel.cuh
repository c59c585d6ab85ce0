// Hopper (sm_90a) FlashAttention forward: TMA loads into 128-byte-swizzled shared memory, an mbarrier
// pipeline of kStages K/V slots, warp specialization and wgmma.
//
// A tile is (m_block, head, batch): kBlockM = 64 * kNumWG query rows (kNumWG = 2 or 3 consumer warpgroups).
// Each CTA walks tiles in a static order (Scheduler, fwd_scheduler.cuh): zig-zag rounds, or for persistent causal
// launches pairs of query blocks (m, num_m_blocks - 1 - m) of one head back to back, so every CTA gets about the
// same number of key blocks; the launch picks one CTA per SM (persistent) or one per tile. kNWarps = 4 * (1 + kNumWG):
//   warpgroup 0  producer: one thread issues every TMA load (per tile: Q, then K and V block by block from
//                the last key block down to the first, so the masked blocks come first); it runs ahead into
//                the next tile while the consumers finish the current one. setmaxnreg lowers the warpgroup
//                to 24 registers.
//   warpgroups 1..kNumWG  consumers: each owns 64 query rows (one wgmma m64 row block); setmaxnreg raises
//                them to 240 registers (2 consumers) or 160 (3 consumers: head dim 64 only). Per key block:
//                S = Q K^T (wgmma, both operands from shared memory), mask, online softmax in registers
//                (exp2 with the scale folded), P packed to 16 bits in registers as the A operand of
//                O += P V (wgmma, V from shared memory read MN-major).
// Overlap: inside a warpgroup, S(n+1) = Q K(n+1)^T is issued together with O += P(n) V(n), so the
// softmax of block n+1 runs while the tensor cores do P(n) V(n). With PingPong, named barriers pass a
// token around the consumer warpgroups so they issue their GEMMs in turn: one's softmax runs during the
// others' GEMMs.
// Epilogue: O /= l, written through shared memory by a TMA store, which drops rows >= seqlen_q and
// columns >= head_dim; lse = m * scale + log(l) per row. Where shared memory allows (kHeadDim <= 128) O has
// its own buffer: Q is released (q_empty) as soon as the tile's last S GEMM is done, so the producer loads
// the next tile's Q during this tile's last P V and epilogue. Otherwise (kHeadDim = 256) O reuses the
// warpgroup's own Q rows and Q is released once the stores have read them.
// Variants measured and removed (software exp2 for part of P, the next tile's first S before this tile's
// epilogue): csrc/kernels/sm90/NOTES.md.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../mask.cuh"
#include "../score_mod.cuh"
#include "../params.h"
#include "../ptx.cuh"
#include "../seqinfo.cuh"
#include "../softmax.cuh"
#include "../dropout.cuh"
#include "entry.cuh"
#include "fwd_scheduler.cuh"
#include "pipeline.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash_ext {
namespace sm90 {

// The kernel's only parameter (passed as __grid_constant__ so TMA can read the maps from parameter space).
struct FwdTmaArgs {
  // Tensor maps over q, k, v and out, each (head_dim, seqlen, heads, batch); boxes: q 64 x kBlockM, k and v
  // 64 x kBlockN, out 64 x 64 (one consumer's rows).
  CUtensorMap q_map, k_map, v_map, o_map;
  FwdParams params;
  FwdSchedArgs sched;  // the tile order's launch-time shape (fwd_scheduler.cuh)
};

// ChainTiles (with PingPong): the scheduling token passes on across tile boundaries, so one consumer starts
// the next tile's first GEMM while the other still finishes its epilogue (otherwise the token restarts at
// consumer 0 on every tile, which waits for consumer 1's epilogue).
// WgSkip: each consumer warpgroup skips the key blocks its own 64 rows cannot see (causal: the blocks past its
// diagonal, which the tile's lower warpgroups do need; all of them when its rows are >= seqlen_q): it only frees
// their K / V slots and takes its ping-pong turns. Without it every warpgroup visits every key block of the tile.
template <typename T_, int kHeadDim_, int kBlockN_, int kStages_, bool IsCausal_, bool PingPong_, bool DoubleP_,
          bool ChainTiles_, int kNumWG_, bool WgSkip_, bool IsLocal_ = false, bool Dropout_ = false>
struct FwdKernel {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNumWG = kNumWG_;  // consumer warpgroups, 64 query rows each
  static_assert(kNumWG == 2 || kNumWG == 3, "2 or 3 consumer warpgroups");
  static constexpr int kBlockM = 64 * kNumWG;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr bool IsCausal = IsCausal_;
  static constexpr bool PingPong = PingPong_;
  static constexpr bool DoubleP = DoubleP_;
  static constexpr bool ChainTiles = ChainTiles_;
  static constexpr bool WgSkip = WgSkip_;
  static constexpr bool IsLocal = IsLocal_;
  static constexpr bool Dropout = IsLocal_ && Dropout_;  // (dropout.cuh; its own instantiation of the general path)
  using MaskT = Mask<IsCausal, IsLocal>;  // which keys a row sees; block ranges [n_block_min, n_block_max)
  using Scheduler = FwdStaticScheduler<kBlockM, IsCausal, IsLocal>;  // the CTA's tiles, their order (fwd_scheduler.cuh)
  using Tile = FwdWork;                                          // (m_block, head, batch)
  // The general path reads variable-length batches too (seqinfo.cuh); the plain and causal kernels dense ones only.
  using Seq = SeqInfoT<int, IsLocal>;
  // Partial accumulators per row in the softmax's row max and row sum (each a chain of kBlockN / 8 dependent
  // FMNMX / FADD otherwise; with one warpgroup in its softmax at a time there are few other warps to hide that
  // latency). 4 where registers allow, 2 with 3 consumer warpgroups (4 spilled 4-8 bytes at 160 registers), 1
  // (one chain, as before) for d256 causal, which measured 0.5-1% slower with 4. H200 harness dobench, seventh
  // session, two runs: d64 non-causal +1-2.4%, d64 causal 16k +3%, d128 -0.4..+2.6%, d256 non-causal 16k +3-4%.
  static constexpr int kRedAcc = kNumWG == 3 ? 2 : (kHeadDim == 256 && IsCausal ? 1 : 4);
  static_assert(kBlockN / 8 >= kRedAcc, "at least one n8 block per accumulator");
  static constexpr int kNWarps = 4 * (1 + kNumWG);
  static constexpr int kNThreads = kNWarps * 32;
  // 24*128 + 240*256 = 64512 <= 65536 registers per SM; with 3 consumers 24*128 + 160*384 = 64512.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kNumWG == 2 ? 240 : 160;
  static_assert(kHeadDim % 64 == 0, "SW128 chunks are 64 columns wide");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N / K constraints");
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQChunkBytes = kBlockM * 128;
  static constexpr int kKVChunkBytes = kBlockN * 128;
  // Layout of dynamic shared memory (offsets from a 1024-aligned base):
  static constexpr int kOffQ = 0;                                  // kChunks x kBlockM x 64, SW128
  static constexpr int kOffK = kOffQ + kQBytes;                    // kStages x kChunks x kBlockN x 64
  static constexpr int kOffV = kOffK + kStages * kKVBytes;         // kStages x kChunks x kBlockN x 64
  // O staging: own buffer (kBlockM x kHeadDim, SW128) when it fits in the 227 KiB, else the Q buffer.
  static constexpr int kOBytesIfSeparate = kQBytes;
  static constexpr bool SeparateO = kOffV + kStages * kKVBytes + kOBytesIfSeparate + 2048 <= 227 * 1024;
  static constexpr int kOffO = SeparateO ? kOffV + kStages * kKVBytes : kOffQ;
  static constexpr int kOffBar = kOffV + kStages * kKVBytes + (SeparateO ? kOBytesIfSeparate : 0);  // mbarriers
  static constexpr int kNumBars = 2 + 4 * kStages;
  static constexpr int kSmemBytes = kOffBar + kNumBars * 8 + 1024;  // + slack for aligning the base
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
  static constexpr int kConsumerWarps = 4 * kNumWG;  // arrivals that free a K or V slot, or Q (q_empty)
  // Named barriers (0 is __syncthreads): 1 + cw scheduling token of consumer cw; 1 + kNumWG + cw epilogue.
  static constexpr int kBarSched = 1;
  static constexpr int kBarEpi = 1 + kNumWG;

  __device__ static __forceinline__ uint32_t bar_q(uint32_t b) { return b; }
  // Q (and the O staging that reuses it) free again: both consumers' stores have read it.
  __device__ static __forceinline__ uint32_t bar_q_empty(uint32_t b) { return b + 8 * (1 + 4 * kStages); }
  __device__ static __forceinline__ uint32_t bar_k_full(uint32_t b, int s) { return b + 8 * (1 + s); }
  __device__ static __forceinline__ uint32_t bar_k_empty(uint32_t b, int s) { return b + 8 * (1 + kStages + s); }
  __device__ static __forceinline__ uint32_t bar_v_full(uint32_t b, int s) { return b + 8 * (1 + 2 * kStages + s); }
  __device__ static __forceinline__ uint32_t bar_v_empty(uint32_t b, int s) { return b + 8 * (1 + 3 * kStages + s); }

  // ------------------------------------------------------------------------------------------ consumer
  // S (64 x kBlockN) = Q (this warpgroup's 64 rows) K^T, kHeadDim/16 wgmma k-steps.
  // O * inv[h] (16-bit) into SW128 staging rows r0 + 8h of the tile at o_smem (r0 % 8 == g; o_smem, the row
  // offsets and the chunk offsets have bits 4..6 clear), so piece p of (row r0 + 8h, chunk c) is at
  // (row_base ^ (p << 4)) + 1024 h + c * kQChunkBytes: one XOR per piece, the rest an immediate offset.
  __device__ static __forceinline__ void stage_o(const float (&o_reg)[kHeadDim / 2], const float (&inv)[2],
                                                 uint32_t o_smem, int r0, int g, int t) {
    const uint32_t row_base = o_smem + r0 * 128 + (g << 4) + 4 * t;
#pragma unroll
    for (int piece = 0; piece < 8; ++piece) {
      const uint32_t base = row_base ^ (piece << 4);
#pragma unroll
      for (int chunk = 0; chunk < kChunks; ++chunk) {
        const int j = chunk * 8 + piece;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t val = pack2<T>(o_reg[4 * j + 2 * h] * inv[h], o_reg[4 * j + 2 * h + 1] * inv[h]);
          const uint32_t addr = base + h * 1024 + chunk * kQChunkBytes;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(val) : "memory");
        }
      }
    }
  }
  __device__ static __forceinline__ void issue_qk(float (&s_reg)[kBlockN / 2], uint32_t q_smem, uint32_t k_smem) {
    const uint64_t desc_q = make_desc_sw128(q_smem, 16, 1024);
    const uint64_t desc_k = make_desc_sw128(k_smem, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t off_q = (kk / 4) * kQChunkBytes + (kk % 4) * 32;
      const uint32_t off_k = (kk / 4) * kKVChunkBytes + (kk % 4) * 32;
      Wgmma<kBlockN, T>::template ss<0>(s_reg, desc_q + (off_q >> 4), desc_k + (off_k >> 4), kk > 0 ? 1 : 0);
    }
  }
  // O (64 x kHeadDim) += P (64 x kBlockN, registers) V (kBlockN x kHeadDim, MN-major B operand).
  __device__ static __forceinline__ void issue_pv(float (&o_reg)[kHeadDim / 2], const uint32_t (&p_reg)[kBlockN / 16][4],
                                                  uint32_t v_smem) {
    const uint64_t desc_v = make_desc_sw128(v_smem, kKVChunkBytes, 1024);
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      Wgmma<kHeadDim, T>::template rs<1>(o_reg, p_reg[kk], desc_v + ((kk * 16 * 128) >> 4), 1);
    }
  }

  __device__ static __forceinline__ void fence_p(uint32_t (&p_reg)[kBlockN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) fence_regs(p_reg[kk]);
  }
  __device__ static __forceinline__ void sched_wait(int cw) {
    if constexpr (PingPong) named_bar_sync(kBarSched + cw, 256);
  }
  __device__ static __forceinline__ void sched_pass(int cw, bool last) {
    if constexpr (PingPong) {
      const int next = kNumWG == 2 ? 1 - cw : (cw + 1) % kNumWG;
      if (ChainTiles || !(cw == kNumWG - 1 && last)) named_bar_arrive(kBarSched + next, 256);
    }
  }

  // Mask the key columns this thread's two rows may not see: outside [lo0, lim0) and [lo1, lim1) (the rows'
  // col_min / col_limit; the lower bounds are never compared by a policy without a left bound).
  __device__ static __forceinline__ void apply_mask(float (&s_reg)[kBlockN / 2], int n_block, int t, int lo0, int lim0,
                                                    int lo1, int lim1) {
    const int col0 = n_block * kBlockN + 2 * t;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + 8 * j + e;
        if (!MaskT::visible_in(c, lo0, lim0)) s_reg[4 * j + e] = -INFINITY;
        if (!MaskT::visible_in(c, lo1, lim1)) s_reg[4 * j + 2 + e] = -INFINITY;
      }
    }
  }

  // The score modifiers (general path only) on this thread's scores of key block n_block: rows row0 and row0 + 8
  // at positions ip0 and ip1 (ScoreMod::row_pos).
  __device__ static __forceinline__ void apply_score_mod(float (&s_reg)[kBlockN / 2], const ScoreMod& mod,
                                                         const FwdParams& p, int n_block, int t, int row0, float ip0,
                                                         float ip1) {
    if (mod.has_softcap()) {
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i) s_reg[i] = mod.softcap(s_reg[i]);
    }
    if (mod.has_alibi()) {
      const float col0 = static_cast<float>(n_block * kBlockN + 2 * t);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float c = col0 + static_cast<float>(8 * j + e);
          s_reg[4 * j + e] = mod.add_alibi(s_reg[4 * j + e], ip0, c);
          s_reg[4 * j + 2 + e] = mod.add_alibi(s_reg[4 * j + 2 + e], ip1, c);
        }
      }
    }
    if (mod.has_bias()) {
      const int col0 = n_block * kBlockN + 2 * t;
      add_bias<T>(s_reg, mod, p, [&](int i, int& row, int& col) {
        row = row0 + 8 * ((i % 4) / 2);
        col = col0 + 8 * (i / 4) + i % 2;
      });
    }
  }

  // Online softmax of one block for this thread's two rows (row g and g + 8 of its warp's 16): updates
  // the running max m (raw score units) and the thread-partial row sum l, turns s into P, returns the
  // factors that rescale O.
  __device__ static __forceinline__ void softmax_step(float (&s_reg)[kBlockN / 2], float (&m)[2], float (&l)[2],
                                                      float (&alpha)[2], float scale_log2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // kRedAcc independent partial maxima (and sums below): shorter dependency chains.
      float t[kRedAcc];
#pragma unroll
      for (int a = 0; a < kRedAcc; ++a) t[a] = a == 0 ? m[h] : -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
        t[j % kRedAcc] = fmaxf(t[j % kRedAcc], fmaxf(s_reg[4 * j + 2 * h], s_reg[4 * j + 2 * h + 1]));
      float mx = t[0];
#pragma unroll
      for (int a = 1; a < kRedAcc; ++a) mx = fmaxf(mx, t[a]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with every score so far at -inf keeps m = -inf; use 0 as its offset so exp2 gives 0, not NaN.
      const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
      alpha[h] = fast_exp2(m[h] * scale_log2 - m_scaled);  // m[h] = -inf -> 0
      m[h] = mx;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const float x0 = fmaf(s_reg[4 * j + 2 * h], scale_log2, -m_scaled);
        const float x1 = fmaf(s_reg[4 * j + 2 * h + 1], scale_log2, -m_scaled);
        s_reg[4 * j + 2 * h] = fast_exp2(x0);
        s_reg[4 * j + 2 * h + 1] = fast_exp2(x1);
      }
#pragma unroll
      for (int a = 0; a < kRedAcc; ++a) t[a] = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) t[j % kRedAcc] += s_reg[4 * j + 2 * h] + s_reg[4 * j + 2 * h + 1];
      float sum = t[0];
#pragma unroll
      for (int a = 1; a < kRedAcc; ++a) sum += t[a];
      l[h] = l[h] * alpha[h] + sum;
    }
  }

  // Accumulator of block n8 j (cols 16kk..16kk+15 are blocks 2kk, 2kk+1) -> A fragment of k-step kk.
  __device__ static __forceinline__ void convert_p(const float (&s_reg)[kBlockN / 2], uint32_t (&p_reg)[kBlockN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) p_reg[kk][r] = pack2<T>(s_reg[8 * kk + 2 * r], s_reg[8 * kk + 2 * r + 1]);
    }
  }

  // Dropout (general path): this thread's dropped probabilities of key block n_block -> 0 (dropout.cuh); rows row0,
  // row0 + 8, keys n_block kBlockN + 8 j + 2 t (+1).
  __device__ static __forceinline__ void drop_p(float (&s_reg)[kBlockN / 2], const FwdParams& p, int b, int head,
                                                int row0, int n_block, int t) {
    const DropoutDev drop(p, b, head);
    uint64_t keep[(kBlockN / 2 + 63) / 64];
    drop.template quad_keep<kBlockN / 2>(keep, [&](int j, int& row, int& col) {
      row = row0;
      col = n_block * kBlockN + 8 * j + 2 * t;
    });
    dropout_zero(s_reg, keep);
  }

  __device__ static __forceinline__ void rescale_o(float (&o_reg)[kHeadDim / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      o_reg[4 * j + 0] *= alpha[0];
      o_reg[4 * j + 1] *= alpha[0];
      o_reg[4 * j + 2] *= alpha[1];
      o_reg[4 * j + 3] *= alpha[1];
    }
  }

  // Zeroes rows [first_row, kBlockN) of the V slot at v_smem (every chunk) once its load has landed, for the
  // warpgroup's own wgmma (the async proxy) to read: each thread's stores, a proxy fence, a warpgroup barrier.
  __device__ static __forceinline__ void zero_v_tail(uint32_t v_smem, uint32_t full, int phase, int first_row, int tid,
                                                     int cw) {
    mbar_wait(full, phase);
    const int rows = kBlockN - max(first_row, 0);
    for (int i = tid; i < rows * kChunks * 8; i += 128) {  // 16-byte pieces; the swizzle only permutes a row's pieces
      const int row = kBlockN - rows + i / (kChunks * 8), chunk = (i / 8) % kChunks, piece = i % 8;
      const uint32_t addr = v_smem + chunk * kKVChunkBytes + row * 128 + piece * 16;
      asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
    }
    fence_proxy_async_smem();
    named_bar_sync(kBarEpi + cw, 128);
  }

  // One tile (m_block, head, batch) for consumer warpgroup cw. kv: the K / V ring's state at this tile's first key
  // block (the slots this CTA consumed before); q_pipe: the Q buffer's (one use per tile).
  __device__ static __forceinline__ void consumer_tile(const FwdTmaArgs& args, uint32_t smem, uint32_t bars, int cw,
                                                       const Tile& tile, PipelineState<kStages> kv,
                                                       const PipelineState<1> q_pipe) {
    const FwdParams& p = args.params;
    const int tid = threadIdx.x - 128 * (cw + 1);  // 0..127 inside the warpgroup
    const int warp_in_wg = tid / 32;
    const int lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int m_block = tile.m_block;
    const Seq seq(p, tile.batch);
    const MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
    // The tile's key blocks (what the producer loads): [n_block_min, n_tile_max), n_tile of them, from the last
    // one down. WgSkip: this warpgroup's rows see only [n_block_min, n_block_max) of them (its 64-row block of the
    // query blocks at kBlockM 64); it skips the first n_tile_max - n_block_max slots. (With a left bound it still
    // visits the tile's lowest blocks, masked, rather than skipping slots at both ends.)
    const int n_tile_max = mask.template n_block_max<kBlockM, kBlockN>(m_block);
    int n_block_max = n_tile_max;
    int n_unmasked_end = mask.template n_block_unmasked_end<kBlockM, kBlockN>(m_block);
    const int n_block_min = mask.template n_block_min<kBlockM, kBlockN>(m_block);
    const int n_tile = n_tile_max - n_block_min;
    int n_unmasked_begin = mask.template n_block_unmasked_begin<kBlockM, kBlockN>(m_block);
    if constexpr (WgSkip) {
      const int mb64 = m_block * kNumWG + cw;
      n_block_max = mb64 * 64 >= seq.seqlen_q ? 0 : mask.template n_block_max<64, kBlockN>(mb64);
      n_unmasked_end = mask.template n_block_unmasked_end<64, kBlockN>(mb64);
      // cw comes from threadIdx.x: broadcast lane 0's values so ptxas sees warp-uniform loop bounds (otherwise
      // it cannot prove the softmax shuffles converged and adds divergent copies of the softmax).
      n_block_max = __shfl_sync(0xffffffffu, n_block_max, 0);
      n_unmasked_end = __shfl_sync(0xffffffffu, n_unmasked_end, 0);
      if constexpr (MaskT::kHasLeftBound) {
        n_block_max = max(n_block_max, n_block_min);  // nothing visible: an empty range, not a negative one
        n_unmasked_begin = __shfl_sync(0xffffffffu, mask.template n_block_unmasked_begin<64, kBlockN>(mb64), 0);
      }
    }
    const int n_skip = n_tile_max - n_block_max;
    const int row0 = m_block * kBlockM + cw * 64 + warp_in_wg * 16 + g;  // this thread's rows: row0, row0 + 8
    const int lim0 = mask.col_limit(row0), lim1 = mask.col_limit(row0 + 8);
    // The rows' first visible keys. The mask calls below pass them only where the policy has a left bound (a
    // literal 0 otherwise): the step lambda would capture them, and one more capture changed ptxas's code.
    const int lo0 = mask.col_min(row0), lo1 = mask.col_min(row0 + 8);
    (void)lo0;
    (void)lo1;
    // The score modifiers: read (and their loops run) only in the general path's instantiation.
    const ScoreMod mod = IsLocal ? ScoreMod(p, seq.b, tile.head, seq.seqlen_q, seq.seqlen_k) : ScoreMod();
    const float ip0 = IsLocal ? mod.row_pos(row0) : 0.f, ip1 = IsLocal ? mod.row_pos(row0 + 8) : 0.f;
    (void)ip0;
    (void)ip1;

    const float scale_log2 = p.scale_softmax_log2;
    const uint32_t q_smem = smem + kOffQ + cw * 64 * 128;  // this warpgroup's 64 rows in each chunk

    float o_reg[kHeadDim / 2];
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) o_reg[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2];
    float s_reg[kBlockN / 2];
    // P of the block whose P V is in flight, and (DoubleP) a second buffer for the next block's P, so the
    // conversion needs no wait on that P V (with one buffer ptxas pulls the P V wait up in front of the
    // softmax to write the converted P into the registers the running wgmma reads).
    uint32_t p_a[kBlockN / 16][4];
    uint32_t p_b[kBlockN / 16][4];

    mbar_wait(bar_q(bars), q_pipe.phase());
    // This warpgroup's key blocks, n_block_max - n_block_min (spelled so without a left bound: the subtraction of
    // the literal 0, folded or not, changed ptxas's code of the d128 non-causal kernels).
    const int n_iters = MaskT::kHasLeftBound ? n_block_max - n_block_min : n_block_max;
    if constexpr (WgSkip) {
      if (PingPong && !ChainTiles && n_tile > 0 && cw == kNumWG - 1) named_bar_arrive(kBarSched + 0, 256);
      // Skipped slots: free the K / V slots once loaded (a release before the load would count towards the
      // slot's previous use) and pass the ping-pong turn, so the turns stay n_tile + 1 per tile for everyone.
#pragma unroll 1
      for (int i = 0; i < n_skip; ++i) {
        const PipelineState<kStages> pipe = kv.advanced(i);  // skipped slot i
        const int stage = pipe.stage(), phase = pipe.phase();
        mbar_wait(bar_k_full(bars, stage), phase);
        if (lane == 0) mbar_arrive(bar_k_empty(bars, stage));
        mbar_wait(bar_v_full(bars, stage), phase);
        if (lane == 0) mbar_arrive(bar_v_empty(bars, stage));
        sched_wait(cw);
        sched_pass(cw, false);
      }
      if (n_tile > 0 && n_iters == 0) {  // the turn of the last P V
        sched_wait(cw);
        sched_pass(cw, true);
      }
      kv.advance(n_skip);  // the first slot this warpgroup computes on
    }
    if (n_iters > 0) {
      if (PingPong && !ChainTiles && !WgSkip && cw == kNumWG - 1) named_bar_arrive(kBarSched + 0, 256);  // 0 first
      // Block n_block_max - 1 (slot 0): S only.
      {
        const int stage = kv.stage(), phase = kv.phase();
        mbar_wait(bar_k_full(bars, stage), phase);
        sched_wait(cw);
        fence_regs(s_reg);
        wgmma_fence();
        issue_qk(s_reg, q_smem, smem + kOffK + stage * kKVBytes);
        wgmma_commit();
        sched_pass(cw, false);
        wgmma_wait<0>();
        fence_regs(s_reg);
        if (lane == 0) mbar_arrive(bar_k_empty(bars, stage));
        if (SeparateO && n_iters == 1 && lane == 0) mbar_arrive(bar_q_empty(bars));  // last S done: Q free
        if constexpr (IsLocal) {
          // Varlen: the last key block of a sequence holds the next sequence's rows (or rows of no sequence) past
          // seqlen_k, where a dense map reads zeros. Their P is 0, but 0 * V is NaN where V is not finite, so this
          // warpgroup zeroes those V rows before its first P V reads them (every warpgroup writes the same zeros).
          if (seq.packed() && n_block_max * kBlockN > seq.seqlen_k) {
            zero_v_tail(smem + kOffV + stage * kKVBytes, bar_v_full(bars, stage), phase,
                        seq.seqlen_k - (n_block_max - 1) * kBlockN, tid, cw);
          }
          if (mod.active()) apply_score_mod(s_reg, mod, p, n_block_max - 1, t, row0, ip0, ip1);
        }
        if (n_block_max - 1 >= n_unmasked_end || (MaskT::kHasLeftBound && n_block_max - 1 < n_unmasked_begin)) {
          if constexpr (MaskT::kHasLeftBound) apply_mask(s_reg, n_block_max - 1, t, lo0, lim0, lo1, lim1);
          else apply_mask(s_reg, n_block_max - 1, t, 0, lim0, 0, lim1);
        }
        softmax_step(s_reg, m, l, alpha, scale_log2);
        if constexpr (Dropout) drop_p(s_reg, p, seq.b, tile.head, row0, n_block_max - 1, t);
        convert_p(s_reg, p_a);
      }
      // Slot i: S(i) = Q K(i)^T and O += P(i-1) V(i-1) together, then the softmax of S(i) while P V runs.
      auto step = [&](const int i, uint32_t(&p_cur)[kBlockN / 16][4], uint32_t(&p_nxt)[kBlockN / 16][4]) {
        const int n_block = n_block_max - 1 - i;
        const PipelineState<kStages> pipe = kv.advanced(i);  // S(i)'s K slot
        const PipelineState<kStages> prev = pipe.advanced(-1);  // P(i-1) V(i-1)'s V slot
        const int stage = pipe.stage(), phase = pipe.phase();
        const int pstage = prev.stage(), pphase = prev.phase();
        mbar_wait(bar_k_full(bars, stage), phase);
        mbar_wait(bar_v_full(bars, pstage), pphase);
        sched_wait(cw);
        fence_regs(s_reg);
        fence_regs(o_reg);
        fence_p(p_cur);
        wgmma_fence();
        issue_qk(s_reg, q_smem, smem + kOffK + stage * kKVBytes);
        wgmma_commit();
        issue_pv(o_reg, p_cur, smem + kOffV + pstage * kKVBytes);
        wgmma_commit();
        sched_pass(cw, false);
        wgmma_wait<1>();  // S of block n_block is ready; P(n_block + 1) V still runs
        fence_regs(s_reg);
        if (lane == 0) mbar_arrive(bar_k_empty(bars, stage));
        if (SeparateO && i == n_iters - 1 && lane == 0) mbar_arrive(bar_q_empty(bars));  // last S done
        // The softmax sits in its own branches: ptxas hoists a wgmma wait above the instructions of its basic
        // block, which would make the softmax wait for P V; a branch join keeps the wait below the softmax.
        if constexpr (IsLocal) {
          if (mod.active()) apply_score_mod(s_reg, mod, p, n_block, t, row0, ip0, ip1);
        }
        bool masked = n_block >= n_unmasked_end;
        if constexpr (MaskT::kHasLeftBound) masked = masked || n_block < n_unmasked_begin;  // left edge
        if (masked) {
          if constexpr (MaskT::kHasLeftBound) apply_mask(s_reg, n_block, t, lo0, lim0, lo1, lim1);
          else apply_mask(s_reg, n_block, t, 0, lim0, 0, lim1);
          softmax_step(s_reg, m, l, alpha, scale_log2);
        } else {
          softmax_step(s_reg, m, l, alpha, scale_log2);
        }
        if constexpr (Dropout) drop_p(s_reg, p, seq.b, tile.head, row0, n_block, t);
        if constexpr (DoubleP) {
          convert_p(s_reg, p_nxt);
          fence_p(p_nxt);
        }
        fence_regs(s_reg);
        fence_regs(alpha);
        wgmma_wait<0>();
        fence_regs(o_reg);
        fence_p(p_cur);
        if (lane == 0) mbar_arrive(bar_v_empty(bars, pstage));
        rescale_o(o_reg, alpha);
        if constexpr (!DoubleP) convert_p(s_reg, p_nxt);
      };
      // Last slot: O += P V of the final block.
      auto last_pv = [&](uint32_t(&p_cur)[kBlockN / 16][4]) {
        // (the slot before kv + n_iters, spelled so: kv.advanced(n_iters - 1) associates the adds the other way and
        // changed ptxas's code of the WgSkip kernels)
        const PipelineState<kStages> prev = kv.advanced(n_iters).advanced(-1);
        const int pstage = prev.stage(), pphase = prev.phase();
        mbar_wait(bar_v_full(bars, pstage), pphase);
        sched_wait(cw);
        fence_regs(o_reg);
        fence_p(p_cur);
        wgmma_fence();
        issue_pv(o_reg, p_cur, smem + kOffV + pstage * kKVBytes);
        wgmma_commit();
        sched_pass(cw, true);
        wgmma_wait<0>();
        fence_regs(o_reg);
        if (lane == 0) mbar_arrive(bar_v_empty(bars, pstage));
      };
      if constexpr (DoubleP) {
        int i = 1;
        for (; i + 1 < n_iters; i += 2) {
          step(i, p_a, p_b);
          step(i + 1, p_b, p_a);
        }
        if (i < n_iters) {
          step(i, p_a, p_b);
          last_pv(p_b);
        } else {
          last_pv(p_a);
        }
      } else {
        for (int i = 1; i < n_iters; ++i) step(i, p_a, p_a);
        last_pv(p_a);
      }
    }

    if (SeparateO && n_iters == 0 && lane == 0) mbar_arrive(bar_q_empty(bars));

    // ---------------------------------------------------------------- epilogue
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[h] = sum > 0.f ? 1.f / sum : 0.f;
      lse[h] = sum > 0.f ? m[h] * p.scale_softmax + logf(sum) : -INFINITY;
      if constexpr (IsLocal) {  // an attention sink joins the denominator (softmax.cuh)
        if (p.sinks != nullptr) finalize_row_with_sink(m[h], sum, scale_log2, __ldg(p.sinks + tile.head), inv[h], lse[h]);
        if constexpr (Dropout) inv[h] *= p.dropout_scale;  // the kept probabilities' 1 / (1 - p)
      }
    }
    // O (16-bit) into this warpgroup's 64 staging rows, SW128 layout: 16-byte piece (col % 64) / 8 of row r
    // sits at piece ((col % 64) / 8) ^ (r % 8). Rows g..g+7 of a warp hit 8 different pieces: no bank
    // conflicts.
    const uint32_t o_smem = smem + kOffO + cw * 64 * 128;
    if constexpr (SeparateO) {
      // The previous tile's store must have read the staging rows before they are overwritten.
      if (tid == 0) tma_store_wait_read();
      named_bar_sync(kBarEpi + cw, 128);
    }
    const int r0 = warp_in_wg * 16 + g;  // row inside this warpgroup's 64
    if constexpr (kNumWG == 2) {
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        const int chunk = j / 8, piece = j % 8;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 8 * h;
          const uint32_t addr = o_smem + chunk * kQChunkBytes + r * 128 + ((piece ^ (r % 8)) << 4) + 4 * t;
          const uint32_t val = pack2<T>(o_reg[4 * j + 2 * h] * inv[h], o_reg[4 * j + 2 * h + 1] * inv[h]);
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(val) : "memory");
        }
      }
    } else {
      // Same addresses, fewer live registers (stage_o; ptxas keeps precomputed addresses live across the main
      // loop, and with 160 registers they spilled). (Kept to 3 warpgroups so the 2-warpgroup
      // kernels stay SASS-identical to the measured ones: with this form d128 / d256 1k read 7-11% slower once,
      // but identical code read 9% slower in a later run, so that was probably noise.)
      stage_o(o_reg, inv, o_smem, r0, g, t);
    }
    fence_proxy_async_smem();
    named_bar_sync(kBarEpi + cw, 128);
    if (t == 0) {
      const Seq seq_o(p, tile.batch);  // re-read here, not kept live across the tile
      const int64_t lse_base = seq_o.lse_offset(tile.head, p.nheads, seq_o.seqlen_q);
      if (row0 < seq_o.seqlen_q) p.lse[lse_base + row0] = lse[0];
      if (row0 + 8 < seq_o.seqlen_q) p.lse[lse_base + row0 + 8] = lse[1];
    }
    // Varlen (general path): a warpgroup whose 64 rows run past its sequence's end stores its rows < seqlen_q itself
    // (a TMA box would overwrite the next sequence's rows).
    // (o_row, o_batch: the TMA box coordinates of the warpgroup's rows.)
    bool rows_store = false;
    int o_row = m_block * kBlockM + cw * 64, o_batch = 0;
    if constexpr (IsLocal) {
      const Seq seq_e(p, tile.batch);  // re-read here, not kept live across the tile
      rows_store = seq_e.packed() && o_row + 64 > seq_e.seqlen_q;
      if (rows_store) store_o_rows(p, o_smem, seq_e, tile.head, o_row, seq_e.seqlen_q - o_row, tid);
      o_batch = seq_e.tma_batch();
      o_row = seq_e.tma_q_row(o_row);
    }
    (void)o_batch;
    if (tid == 0 && !rows_store) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if constexpr (IsLocal) {
          tma_store_4d(&args.o_map, o_smem + c * kQChunkBytes, c * 64, o_row, tile.head, o_batch);
        } else {
          tma_store_4d(&args.o_map, o_smem + c * kQChunkBytes, c * 64, m_block * kBlockM + cw * 64, tile.head, seq.b);
        }
      }
      tma_store_commit();
      if constexpr (!SeparateO) {
        tma_store_wait_read();
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], 4;\n" ::"r"(bar_q_empty(bars)) : "memory");
      }
    }
    if constexpr (IsLocal && !SeparateO) {
      if (rows_store) {
        named_bar_sync(kBarEpi + cw, 128);  // every staged row read before Q (the staging) is free again
        if (tid == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], 4;\n" ::"r"(bar_q_empty(bars)) : "memory");
      }
    }
  }

  // Rows [0, rows) of the warpgroup's 64 staged O rows (SW128, as stage_o writes them) to out rows first.. of
  // (seq, head), columns < head_dim, 16 bytes per store: thread tid takes piece tid % kPieces of every
  // (128 / kPieces)-th row.
  __device__ static __forceinline__ void store_o_rows(const FwdParams& p, uint32_t o_smem, const Seq& seq, int head,
                                                      int first, int rows, int tid) {
    constexpr int kPieces = kHeadDim / 8, kRowStep = 128 / kPieces;
    const int col = (tid % kPieces) * 8;
    if (col >= p.head_dim) return;
    T* out = reinterpret_cast<T*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride) +
             int64_t(head) * p.o_head_stride + int64_t(first) * p.o_row_stride + col;
    const uint32_t src = o_smem + (col / 64) * kQChunkBytes;
#pragma unroll 1
    for (int r = tid / kPieces; r < rows; r += kRowStep) {
      const uint32_t addr = src + r * 128 + ((((col % 64) / 8) ^ (r % 8)) << 4);
      uint32_t v0, v1, v2, v3;
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v0), "=r"(v1), "=r"(v2), "=r"(v3) : "r"(addr));
      *reinterpret_cast<uint4*>(out + int64_t(r) * p.o_row_stride) = make_uint4(v0, v1, v2, v3);
    }
  }

  __device__ static void consumer(const FwdTmaArgs& args, uint32_t smem, uint32_t bars, int cw) {
    // The key blocks each tile consumed (what consumer_tile derives from its SeqInfo). TODO(varlen): per tile from
    // SeqInfo(params, tile.batch); a Mask built in the loop reorders ptxas's code of the loop-invariant dense bound
    // (see csrc/kernels/sm90/NOTES.md, eighth session), so the dense case keeps it hoisted.
    const MaskT mask(args.params.seqlen_q, args.params.seqlen_k, args.params);
    PipelineState<kStages> kv;  // the K / V ring: the next tile's first slot
    int tile_iter = 0;
    // ChainTiles: consumer 0 issues first; the token then alternates over all GEMM issues of all tiles (both
    // consumers see the same tiles and key blocks), and consumer 0 takes consumer 1's last pass at the end.
    if (PingPong && ChainTiles && cw == kNumWG - 1) named_bar_arrive(kBarSched + 0, 256);
    int q_uses = 0;  // (the general path) tiles run: the Q buffer's uses
    for (int t = Scheduler::first_tile(args.sched); Scheduler::valid(args.sched, t);
         t = Scheduler::next_tile(args.sched, t, ++tile_iter)) {
      const Tile tile = Scheduler::tile_coord(args.sched, args.params, t);
      if constexpr (IsLocal) {
        // The tile's own sequence (varlen: its lengths; a tile past its end is not run, by any role).
        const Seq seq(args.params, tile.batch);
        if (tile.m_block * kBlockM >= seq.seqlen_q) continue;
        const MaskT tmask(seq.seqlen_q, seq.seqlen_k, args.params);
        consumer_tile(args, smem, bars, cw, tile, kv, PipelineState<1>(q_uses++));
        kv.advance(tmask.template n_block_max<kBlockM, kBlockN>(tile.m_block) -
                   tmask.template n_block_min<kBlockM, kBlockN>(tile.m_block));
      } else {
        consumer_tile(args, smem, bars, cw, tile, kv, PipelineState<1>(tile_iter));
        kv.advance(mask.template n_block_max<kBlockM, kBlockN>(tile.m_block) -
                   mask.template n_block_min<kBlockM, kBlockN>(tile.m_block));
      }
    }
    if (PingPong && ChainTiles && cw == 0) named_bar_sync(kBarSched + 0, 256);
    // Shared memory must stay valid until the last store has read it.
    if (threadIdx.x % 128 == 0) tma_store_wait_read();
  }

  // ------------------------------------------------------------------------------------------ producer
  __device__ static __forceinline__ void load_kv(const CUtensorMap* map, uint32_t dst, uint32_t full, uint32_t empty,
                                                 int phase, int n_block, int head_k, int batch, int row0) {
    mbar_wait(empty, phase ^ 1);
    mbar_arrive_expect_tx(full, kKVBytes);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      tma_load_4d(dst + c * kKVChunkBytes, map, full, c * 64, IsLocal ? row0 + n_block * kBlockN : n_block * kBlockN,
                  head_k, batch);
    }
  }

  // One thread: every TMA load of the CTA's tiles, in the order the consumers use them.
  __device__ static void producer(const FwdTmaArgs& args, uint32_t smem, uint32_t bars) {
    const FwdParams& p = args.params;
    // Key blocks per tile: as in consumer(), hoisted for the dense case. TODO(varlen): from the tile's SeqInfo.
    const MaskT mask(p.seqlen_q, p.seqlen_k, p);
    tma_prefetch_desc(&args.q_map);
    tma_prefetch_desc(&args.k_map);
    tma_prefetch_desc(&args.v_map);
    tma_prefetch_desc(&args.o_map);
    PipelineState<kStages> kv;  // the K / V ring: the next tile's first slot
    int tile_iter = 0;
    int q_uses = 0;  // (the general path) tiles run: the Q buffer's uses
    for (int t = Scheduler::first_tile(args.sched); Scheduler::valid(args.sched, t);
         t = Scheduler::next_tile(args.sched, t, ++tile_iter)) {
      const Tile tile = Scheduler::tile_coord(args.sched, p, t);
      const Seq seq(p, tile.batch);
      if constexpr (IsLocal) {
        if (tile.m_block * kBlockM >= seq.seqlen_q) continue;  // past its sequence's end (varlen): not run
      }
      const PipelineState<1> q_pipe(IsLocal ? q_uses++ : tile_iter);  // the Q buffer: one slot, one use per tile
      const int head_k = tile.head / p.h_h_k_ratio;
      // Key blocks [n_block_min, n_block_max), from the last one down (the order the consumers use them); the
      // general path's from the tile's own sequence.
      const MaskT tmask = IsLocal ? MaskT(seq.seqlen_q, seq.seqlen_k, p) : mask;
      const int n_block_min = tmask.template n_block_min<kBlockM, kBlockN>(tile.m_block);
      const int n_block_max = tmask.template n_block_max<kBlockM, kBlockN>(tile.m_block);
      const int n_blocks = n_block_max - n_block_min;
      // TMA coordinates (the general path: seqinfo.cuh's, varlen rows in one packed entry).
      const int q_row = IsLocal ? seq.tma_q_row(tile.m_block * kBlockM) : tile.m_block * kBlockM;
      const int k_row0 = IsLocal ? seq.tma_k_row(0) : 0;
      const int map_b = IsLocal ? seq.tma_batch() : seq.b;
      for (int i = 0; i < n_blocks; ++i) {
        const int n_block = n_block_max - 1 - i;
        const PipelineState<kStages> pipe = kv.advanced(i);  // block i's slot and parity
        const int stage = pipe.stage(), phase = pipe.phase();
        load_kv(&args.k_map, smem + kOffK + stage * kKVBytes, bar_k_full(bars, stage), bar_k_empty(bars, stage), phase,
                n_block, head_k, map_b, k_row0);
        if (i == 0) {
          // Q after the first K block: K may stream in while the previous tile's epilogue still holds Q.
          mbar_wait(bar_q_empty(bars), q_pipe.phase() ^ 1);
          mbar_arrive_expect_tx(bar_q(bars), kQBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            tma_load_4d(smem + kOffQ + c * kQChunkBytes, &args.q_map, bar_q(bars), c * 64, q_row, tile.head, map_b);
          }
        }
        load_kv(&args.v_map, smem + kOffV + stage * kKVBytes, bar_v_full(bars, stage), bar_v_empty(bars, stage), phase,
                n_block, head_k, map_b, k_row0);
      }
      if (n_blocks == 0) {
        // Nothing visible: no Q needed, but keep the Q barrier phases in step with the consumers.
        mbar_wait(bar_q_empty(bars), q_pipe.phase() ^ 1);
        mbar_arrive(bar_q(bars));
      }
      kv.advance(n_blocks);
    }
  }

  __device__ static __forceinline__ void run(const FwdTmaArgs& args) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t bars = smem + kOffBar;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x == 0) {
      mbar_init(bar_q(bars), 1);
      mbar_init(bar_q_empty(bars), kConsumerWarps);
      for (int s = 0; s < kStages; ++s) {
        mbar_init(bar_k_full(bars, s), 1);
        mbar_init(bar_v_full(bars, s), 1);
        mbar_init(bar_k_empty(bars, s), kConsumerWarps);
        mbar_init(bar_v_empty(bars, s), kConsumerWarps);
      }
      fence_mbar_init();
    }
    __syncthreads();
    if (warp < 4) {
      setmaxnreg_dec<kProducerRegs>();
      if (threadIdx.x == 0) producer(args, smem, bars);
    } else {
      setmaxnreg_inc<kConsumerRegs>();
      consumer(args, smem, bars, warp / 4 - 1);
    }
  }
};

}  // namespace sm90
}  // namespace flash_ext
