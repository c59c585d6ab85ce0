// Hopper (sm_90a) FlashAttention backward main kernel for kHeadDim = 256 (runs head dims 129..256; columns past
// head_dim are zero-filled by TMA and never written). Preprocess (D = rowsum(dO o O), zero dq_accum) and the dq
// conversion are the d64 / d128 kernels of bwd_kernel.cuh, unchanged (dQ columns per consumer n_dq = 128).
//
// Why a separate kernel: the d64 / d128 kernel gives each consumer warpgroup its own 64 keys and keeps dK, dV for
// them in registers (64 keys x kHeadDim x 2 fp32 = 256 registers per thread at d256: impossible). Here the two
// consumer warpgroups share one key block and split the head-dim COLUMNS of dK, dV, dQ.
//
// One CTA per (64-key block, kv head, batch): K, V (64 x 256 each) loaded once by TMA; loop over the query heads
// of the GQA group and the 64-row query blocks that see the key block; Q (+ the lse_log2 / D rows: 1-D bulk
// copies) and dO (TMA) stream through mbarrier pipelines (2 slots each). kNWarps = 12:
//   warpgroup 0  producer: lane 0 of warp 0 issues the loads; setmaxnreg lowers the warpgroup to 24 registers.
//   warpgroups 1, 2  consumers (240 registers); consumer w per query block:
//     S^T_w  (64 keys x 32 queries) = K Q_w^T    SS wgmma, N = 32 (queries [32w, 32w + 32)), K-dim = 256
//     dP^T_w (64 x 32)              = V dO_w^T   SS wgmma
//     P^T_w = exp2(S^T scale_log2 - lse_log2), dS^T_w = P^T_w o (dP^T_w - D)          (registers)
//     P^T_w, dS^T_w (16-bit) -> shared memory (its 32 query columns of the 64 x 64 tiles); 256-thread barrier
//     dV[:, 128w : 128w + 128] += P^T dO[:, cols w]   SS wgmma, M = 64 keys, N = 128, K-dim = 64 queries
//     dK[:, 128w : 128w + 128] += dS^T Q[:, cols w]   SS wgmma
//     dQ[:, 128w : 128w + 128]  = dS K[:, cols w]      SS wgmma (dS^T read MN-major), then into dq_accum by
//        red.global.add.v4.f32 straight from registers (16 per thread; Det: ordered by key block, see Det; a bulk
//        reduce through shared memory measured no faster, H200, NOTES.md).
//     The three are issued as dV, dQ, dK, and dQ's adds run while dK is on the tensor cores.
//   dK, dV (64 + 64 registers) stay in registers for the whole CTA (fixed accumulation order: bitwise
//   reproducible). P^T / dS^T tiles are double-buffered (step parity) so a consumer may write step i + 1 while
//   the other still reads step i. The first k-step of S^T, dP^T and dQ uses ss_z (accumulators write-only), so
//   those accumulators are dead between steps: peak 192 accumulator registers, no spills.
//   Stagger: the query blocks are visited starting at n_block mod their count (neighbouring CTAs add into
//   different dq_accum blocks at a time). dK, dV leave through shared memory with 16-byte stores (4-byte pairs
//   straight from registers where dk / dv are not 16-byte aligned).
//
// Measured bottleneck (NOTES.md): the dq_accum reduction. Every CTA adds 64 x 256 fp32 (64 KiB) per step of
// 10.5 MFLOP, twice the traffic per FLOP of the d128 kernel (128-key CTAs); skipping it (a timing ablation, since
// removed) made the backward ~1.4-1.7x faster. Bigger key blocks per CTA (e.g. a 2-CTA cluster summing dQ in
// distributed shared memory first) are the next step.
//
// dq_accum layout: that of bwd_kernel.cuh with n_dq = 128 (dq_accum_index(row, col, 128)): per (batch, head,
// 64-row block) 64 x 256 floats; consumer w's part at w * 8192, register group j (n8 block) of thread tid at
// j * 512 + tid * 4: one 16-byte red per (thread, j), a warp's 32 reds cover 512 contiguous bytes.
//
// Shared memory: K 32 KiB, V 32 KiB, Q 2 x 32 KiB, dO 2 x 32 KiB, P^T 2 x 8 KiB, dS^T 2 x 8 KiB, lse / D 1 KiB, barriers: 225 KiB + 1 KiB alignment slack, of 227 KiB.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../mask.cuh"
#include "../params.h"
#include "../ptx.cuh"
#include "../seqinfo.cuh"
#include "bwd_kernel.cuh"
#include "bwd_scheduler.cuh"
#include "pipeline.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash_ext {
namespace sm90 {

// Vector reduce-add of 4 floats into global memory (sm_90, 16-byte aligned address).
__device__ __forceinline__ void red_add_v4_f32(float* dst, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

// ------------------------------------------------------------------------------------------ main kernel
template <typename T_, bool IsCausal_, bool Stagger_, bool Det_ = false, bool IsLocal_ = false, bool Dropout_ = false>
struct BwdKernelHd256 {
  using T = T_;
  static constexpr int kHeadDim = 256;
  static constexpr int kBlockM = 64;  // query rows per pipeline step
  static constexpr int kBlockN = 64;  // keys per CTA, shared by both consumers
  using Scheduler = BwdScheduler<kBlockN, false, false>;  // one CTA per tile (bwd_scheduler.cuh)
  static constexpr int kStages = 2;    // Q (+ lse, D) slots
  static constexpr int kDoStages = 2;  // dO slots
  static_assert(kDoStages == kStages && kStages == 2, "one ring position for Q, dO and the P^T / dS^T buffers");
  static constexpr bool IsCausal = IsCausal_;
  static constexpr bool IsLocal = IsLocal_;
  static constexpr bool Dropout = IsLocal_ && Dropout_;  // (dropout.cuh; its own instantiation of the general path)
  using MaskT = Mask<IsCausal, IsLocal>;  // which keys a row sees; block ranges on both sides (mask.cuh)
  // Stagger: the CTA of key block n_block visits its query blocks starting at (n_block mod their count) and wraps,
  // so that concurrently running CTAs (neighbouring key blocks) add into different dq_accum blocks instead of all
  // into the same one at the same time.
  static constexpr bool Stagger = Stagger_;
  // Deterministic (params.deterministic): the dQ adds into each dq_accum block happen in key-block order, through
  // the block's counter in params.dq_semaphore (zeroed by the preprocess kernel), as in the d64 / d128 kernel
  // (dq_writer in bwd_kernel.cuh): consumer w of key block n waits until the counter reaches 2 (n - n_block_min(m))
  // (both consumers of every lower contributing key block have added; their columns are disjoint), adds, and
  // increments it once.
  // The query blocks are visited in descending order with the heads inner (step_coords), so the key-block CTAs
  // of a (kv head, batch) run in lockstep; a CTA waits only for lower key blocks, launched no later (x is the
  // fastest grid dimension), so the chain cannot deadlock.
  static constexpr bool Det = Det_;
  static_assert(!Det || !Stagger, "deterministic: the descending lockstep order");
  static constexpr int kNWarps = 12;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kProducerRegs = 24;  // 24*128 + 240*256 = 64512 <= 65536
  static constexpr int kConsumerRegs = 240;
  static constexpr int kChunks = kHeadDim / 64;       // SW128 column chunks
  static constexpr int kNDq = kHeadDim / 2;           // dK / dV / dQ columns per consumer
  static constexpr int kQh = kBlockM / 2;             // S^T / dP^T query columns per consumer
  static constexpr int kChunkBytes = 64 * 128;        // one 64-row SW128 chunk (Q, dO, K, V alike)
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kPBytes = kBlockN * kBlockM * 2;  // one P^T or dS^T tile: 64 key rows x 64 queries, SW128
  static_assert(kBlockM == 64 && kBlockN == 64, "chunk arithmetic assumes 64-row tiles");
  // Shared memory (offsets from a 1024-aligned base).
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVBytes;
  static constexpr int kOffQ = kOffV + kKVBytes;               // kStages x (kChunks x 64 x 64) SW128
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;    // kDoStages slots
  static constexpr int kOffP = kOffDo + kDoStages * kQBytes;   // 2 buffers (step parity)
  static constexpr int kOffDs = kOffP + 2 * kPBytes;           // 2 buffers
  static constexpr int kOffLse = kOffDs + 2 * kPBytes;         // kStages x kBlockM floats (lse log2 e)
  static constexpr int kOffD = kOffLse + kStages * kBlockM * 4;
  static constexpr int kOffBar = kOffD + kStages * kBlockM * 4;
  static_assert(kOffLse % 16 == 0 && kOffD % 16 == 0, "bulk copy destinations are 16-byte aligned");
  static constexpr int kNumBars = 1 + 2 * kStages + 2 * kDoStages;
  static constexpr int kSmemBytes = kOffBar + kNumBars * 8 + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
  static constexpr int kBarPds = 1;  // named barrier: P^T / dS^T of both consumers written
  static constexpr int kBarDq = 2;   // 2, 3: consumer w's dQ adds (Det)

  // mbarriers: K / V; Q (+ lse, D) full / empty per Q slot; dO full / empty per dO slot.
  __device__ static __forceinline__ uint32_t bar_kv(uint32_t b) { return b; }
  __device__ static __forceinline__ uint32_t bar_full(uint32_t b, int s) { return b + 8 * (1 + s); }
  __device__ static __forceinline__ uint32_t bar_empty(uint32_t b, int s) { return b + 8 * (1 + kStages + s); }
  __device__ static __forceinline__ uint32_t bar_do_full(uint32_t b, int s) { return b + 8 * (1 + 2 * kStages + s); }
  __device__ static __forceinline__ uint32_t bar_do_empty(uint32_t b, int s) {
    return b + 8 * (1 + 2 * kStages + kDoStages + s);
  }

  // The end of key block n_block's query-block range [Mask::m_block_min, Mask::m_block_max): for the plain and
  // causal policies evaluated once by the launcher (args.num_m_blocks), as in bwd_kernel.cuh's
  // BwdKernel::m_block_max_of, which says why; the local policy's depends on n_block.
  __device__ static __forceinline__ int m_block_max_of(const BwdTmaArgs& args, const MaskT& mask, int n_block) {
    if constexpr (IsLocal) return mask.template m_block_max<kBlockM, kBlockN>(n_block);
    else { (void)mask; (void)n_block; return args.num_m_blocks; }
  }

  // ------------------------------------------------------------------------------------------ producer
  __device__ static void producer(const BwdTmaArgs& args, uint32_t smem, uint32_t bars, int n_block, int head_k,
                                  int batch) {
    const BwdParams& p = args.params;
    const int lane = threadIdx.x % 32;
    const SeqInfo seq(p, batch);
    MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
    const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
    if (lane == 0) {
      tma_prefetch_desc(&args.q_map);
      tma_prefetch_desc(&args.do_map);
      load_kv_block<kChunks, kChunkBytes, kBlockN, kKVBytes>(args, smem + kOffK, smem + kOffV, bar_kv(bars), n_block,
                                                             head_k, seq.b);
    }
    // A step loads Q (+ lse, D) and dO of (head, m_block) into the slots at `pipe` (one position for the Q and the
    // dO ring: kDoStages == kStages).
    auto load_step = [&](int head, int m_block, PipelineState<kStages> pipe) {
      const int64_t d_base = seq.row_offset(head, p.nheads, p.seqlen_q_rounded);
      const int stage = pipe.stage(), phase = pipe.phase();
      mbar_wait(bar_empty(bars, stage), phase ^ 1);
      if (lane == 0) {
        mbar_arrive_expect_tx(bar_full(bars, stage), kQBytes + 2 * kBlockM * 4);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          tma_load_4d(smem + kOffQ + stage * kQBytes + c * kChunkBytes, &args.q_map, bar_full(bars, stage), c * 64,
                      m_block * kBlockM, head, seq.b);
        }
        // lse_log2 (lse * log2 e; +inf for rows past seqlen_q and rows that see no key, so P = 0 there) and D.
        load_lse_d_rows<kBlockM>(p, smem + kOffLse + stage * kBlockM * 4, smem + kOffD + stage * kBlockM * 4,
                                 d_base + static_cast<int64_t>(m_block) * kBlockM, bar_full(bars, stage));
      }
      // dO: its slot frees after the dV products of the step kDoStages back.
      const int dstage = pipe.stage(), dphase = pipe.phase();
      mbar_wait(bar_do_empty(bars, dstage), dphase ^ 1);
      if (lane == 0) {
        mbar_arrive_expect_tx(bar_do_full(bars, dstage), kQBytes);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          tma_load_4d(smem + kOffDo + dstage * kQBytes + c * kChunkBytes, &args.do_map, bar_do_full(bars, dstage),
                      c * 64, m_block * kBlockM, head, seq.b);
        }
      }
    };
    PipelineState<kStages> pipe;  // this role's position on the rings, advanced once per step (below)
    if constexpr (Det) {
      // Query blocks descending from the last, heads inner (see Det).
      const int n_iters = (m_block_max_of(args, mask, n_block) - m_block_min) * p.h_h_k_ratio;
      for (; pipe.count < n_iters; pipe.advance()) {
        const int it = pipe.count;
        load_step(head_k * p.h_h_k_ratio + it % p.h_h_k_ratio,
                  m_block_max_of(args, mask, n_block) - 1 - it / p.h_h_k_ratio, pipe);
      }
    } else {
      for (int hh = 0; hh < p.h_h_k_ratio; ++hh) {
        const int head = head_k * p.h_h_k_ratio + hh;
        const int n_m = m_block_max_of(args, mask, n_block) - m_block_min;
        const int rot = Stagger && n_m > 0 ? n_block % n_m : 0;
        for (int i = 0; i < n_m; ++i, pipe.advance()) {
          load_step(head, m_block_min + (i + rot < n_m ? i + rot : i + rot - n_m), pipe);
        }
      }
    }
  }

  // ------------------------------------------------------------------------------------------ consumer
  __device__ static void consumer(const BwdTmaArgs& args, uint32_t smem, uint32_t bars, int cw, int n_block,
                                  int head_k, int batch) {
    const BwdParams& p = args.params;
    const int tid = threadIdx.x - 128 * (cw + 1);  // 0..127 inside the warpgroup
    const int warp_in_wg = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const SeqInfo seq(p, batch);
    MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
    const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
    const int n_m = m_block_max_of(args, mask, n_block) - m_block_min;  // query blocks per head
    const int rot = Stagger && n_m > 0 ? n_block % n_m : 0;  // see Stagger
    // Step it -> query block and head of the GQA group. Default: heads outer, query blocks ascending from
    // m_block_min (rotated by Stagger). Det: query blocks descending from the last, heads inner.
    auto m_block_of = [&](int it) {
      if constexpr (Det) return m_block_max_of(args, mask, n_block) - 1 - it / p.h_h_k_ratio;
      const int i = it % n_m + rot;
      return m_block_min + (i < n_m ? i : i - n_m);
    };
    auto hh_of = [&](int it) { return Det ? it % p.h_h_k_ratio : it / n_m; };
    const int n_iters = n_m * p.h_h_k_ratio;          // pipeline steps: (head of the group, query block)
    const float scale_log2 = p.scale_softmax_log2;
    // This thread's key rows: local row r0 = 16 warp + g and r0 + 8; global key0, key0 + 8.
    const int r0 = warp_in_wg * 16 + g;
    const int key0 = n_block * kBlockN + r0;
    // The score modifiers: read (and their code run) only in the general path's instantiation.
    ScoreMod mod = IsLocal ? ScoreMod(p, batch, head_k * p.h_h_k_ratio, seq.seqlen_q, seq.seqlen_k) : ScoreMod();

    float dv_reg[kNDq / 2], dk_reg[kNDq / 2];
#pragma unroll
    for (int i = 0; i < kNDq / 2; ++i) dv_reg[i] = dk_reg[i] = 0.f;
    float s_reg[kQh / 2], dp_reg[kQh / 2], dq_reg[kNDq / 2];

    // The step's position on the Q (+ lse, D) ring, the dO ring (kDoStages == kStages) and the P^T / dS^T buffers
    // (kStages == 2: step parity, so a consumer may write step i + 1 while the other reads step i); advanced once,
    // at the end of the step loop.
    PipelineState<kStages> pipe;
    auto q_stage = [&](int) { return smem + kOffQ + pipe.stage() * kQBytes; };
    auto do_stage = [&](int) { return smem + kOffDo + pipe.stage() * kQBytes; };

    // ---- S^T_w = K Q_w^T, dP^T_w = V dO_w^T (one commit group each, S^T first; B = this consumer's 32 query
    // rows, K-major). No fence_regs before them: the first k-step (ss_z) only writes s_reg / dp_reg, so their
    // old values are dead between steps (keeping them live costs the registers that the dQ accumulators need).
    auto issue_s = [&](int it) {
      const uint32_t q_w = q_stage(it) + cw * kQh * 128;
      wgmma_fence();
      const uint64_t desc_k = make_desc_sw128(smem + kOffK, 16, 1024), desc_q = make_desc_sw128(q_w, 16, 1024);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t off = (kk / 4) * kChunkBytes + (kk % 4) * 32;
        if (kk == 0) {
          Wgmma<kQh, T>::template ss_z<0, 0>(s_reg, desc_k, desc_q);
        } else {
          Wgmma<kQh, T>::template ss<0>(s_reg, desc_k + (off >> 4), desc_q + (off >> 4), 1);
        }
      }
      wgmma_commit();
    };
    auto issue_dp = [&](int it) {
      const uint32_t do_w = do_stage(it) + cw * kQh * 128;
      wgmma_fence();
      const uint64_t desc_v = make_desc_sw128(smem + kOffV, 16, 1024), desc_do = make_desc_sw128(do_w, 16, 1024);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t off = (kk / 4) * kChunkBytes + (kk % 4) * 32;
        if (kk == 0) {
          Wgmma<kQh, T>::template ss_z<0, 0>(dp_reg, desc_v, desc_do);
        } else {
          Wgmma<kQh, T>::template ss<0>(dp_reg, desc_v + (off >> 4), desc_do + (off >> 4), 1);
        }
      }
      wgmma_commit();
    };

    // ---- wait for S^T / dP^T (no other wgmma group in flight); P^T, dS^T (fp32, in s_reg / dp_reg).
    // Accumulator n8 block j holds queries 32w + 8j + 2t, +1 of key rows r0 (regs 4j, 4j+1) and r0 + 8 (4j+2, 4j+3).
    auto softmax = [&](int it) {
      const int stage = pipe.stage();
      const int m_block = m_block_of(it);
      if constexpr (IsLocal) {
        if (p.h_h_k_ratio > 1) mod.set_head(p, batch, head_k * p.h_h_k_ratio + hh_of(it));  // this step's query head
      }
      wgmma_wait<1>();
      fence_regs(s_reg);
      if constexpr (IsLocal) {
        if (mod.active()) score_mod_st<T>(s_reg, mod, p, m_block * kBlockM + cw * kQh, key0, t);
      }
      bool need_mask = n_block >= mask.template n_block_unmasked_end<kBlockM, kBlockN>(m_block);
      if constexpr (MaskT::kHasLeftBound) {
        need_mask = need_mask || n_block < mask.template n_block_unmasked_begin<kBlockM, kBlockN>(m_block);
      }
#pragma unroll
      for (int j = 0; j < kQh / 8; ++j) {
        float2 l2;
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                     : "=f"(l2.x), "=f"(l2.y)
                     : "r"(smem + kOffLse + (stage * kBlockM + cw * kQh + 8 * j + 2 * t) * 4));
        s_reg[4 * j + 0] = fast_exp2(fmaf(s_reg[4 * j + 0], scale_log2, -l2.x));
        s_reg[4 * j + 1] = fast_exp2(fmaf(s_reg[4 * j + 1], scale_log2, -l2.y));
        s_reg[4 * j + 2] = fast_exp2(fmaf(s_reg[4 * j + 2], scale_log2, -l2.x));
        s_reg[4 * j + 3] = fast_exp2(fmaf(s_reg[4 * j + 3], scale_log2, -l2.y));
      }
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < kQh / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int row = m_block * kBlockM + cw * kQh + 8 * j + 2 * t + e;
            const int lo = mask.col_min(row), hi = mask.col_limit(row);
            if (!MaskT::visible_in(key0, lo, hi)) s_reg[4 * j + e] = 0.f;
            if (!MaskT::visible_in(key0 + 8, lo, hi)) s_reg[4 * j + 2 + e] = 0.f;
          }
        }
      }
      wgmma_wait<0>();
      fence_regs(dp_reg);
      // Dropout (dropout.cuh): dP^T o Z / (1 - p) here; P^T o Z / (1 - p) for dV below, after its last use as P.
      uint64_t keep[(kQh / 2 + 63) / 64];
      if constexpr (Dropout) {
        const DropoutDev drop(p, batch, head_k * p.h_h_k_ratio + hh_of(it));
        drop.template oct_keep<kQh / 2>(keep, m_block * kBlockM + cw * kQh, key0, t);
        dropout_apply(dp_reg, keep, drop.scale);
      }
      (void)keep;
      if constexpr (IsLocal) {
        if (p.dsink_accum != nullptr) {  // the sinks' gradient terms, from P^T and dP^T (params.h)
          const int h = head_k * p.h_h_k_ratio + hh_of(it);
          add_dsink_terms(p, batch, h, dsink_slot<kBlockN, 8>(n_block, cw * 4 + warp_in_wg),
                          sink_terms_pt(s_reg, dp_reg, smem + kOffLse, stage * kBlockM + cw * kQh, t,
                                        sink_log2_of(p, h)));
        }
      }
#pragma unroll
      for (int j = 0; j < kQh / 8; ++j) {
        float2 d2;
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                     : "=f"(d2.x), "=f"(d2.y)
                     : "r"(smem + kOffD + (stage * kBlockM + cw * kQh + 8 * j + 2 * t) * 4));
        dp_reg[4 * j + 0] = s_reg[4 * j + 0] * (dp_reg[4 * j + 0] - d2.x);
        dp_reg[4 * j + 1] = s_reg[4 * j + 1] * (dp_reg[4 * j + 1] - d2.y);
        dp_reg[4 * j + 2] = s_reg[4 * j + 2] * (dp_reg[4 * j + 2] - d2.x);
        dp_reg[4 * j + 3] = s_reg[4 * j + 3] * (dp_reg[4 * j + 3] - d2.y);
      }
      if constexpr (IsLocal) {
        if (p.dbias_accum != nullptr) {
          float* dbias_bh = p.dbias_accum + (int64_t(batch) * p.nheads + head_k * p.h_h_k_ratio + hh_of(it)) *
                                                int64_t(seq.seqlen_q) * seq.seqlen_k;
          store_dbias_st(dp_reg, mod, p, dbias_bh, m_block * kBlockM + cw * kQh, key0, t);
        }
        if (mod.has_softcap()) {
          softcap_grad_st<T>(dp_reg, s_reg, smem + kOffLse, stage * kBlockM + cw * kQh, mod, p,
                             m_block * kBlockM + cw * kQh, key0, t);
        }
        if constexpr (Dropout) dropout_apply(s_reg, keep, p.dropout_scale);
      }
    };

    // ---- P^T, dS^T (16-bit) -> shared memory, SW128 tiles of 64 key rows x 64 queries (128 bytes per row; this
    // consumer writes the 16-byte pieces 4w..4w+3 of each row); then the barrier that makes both halves visible
    // to both consumers' wgmmas. Conflict-free: the 8 rows g of a store land in 8 different 16-byte pieces.
    auto store_pds = [&](int it) {
      const uint32_t p_s = smem + kOffP + pipe.stage() * kPBytes, ds_s = smem + kOffDs + pipe.stage() * kPBytes;
#pragma unroll
      for (int j = 0; j < kQh / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = r0 + 8 * h;
          const int col8 = cw * (kQh / 8) + j;  // queries 8 col8 .. + 7
          const uint32_t off = row * 128 + ((col8 ^ (row % 8)) << 4) + 4 * t;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(p_s + off),
                       "r"(pack2<T>(s_reg[4 * j + 2 * h], s_reg[4 * j + 2 * h + 1]))
                       : "memory");
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_s + off),
                       "r"(pack2<T>(dp_reg[4 * j + 2 * h], dp_reg[4 * j + 2 * h + 1]))
                       : "memory");
        }
      }
      fence_proxy_async_smem();
      named_bar_sync(kBarPds, 256);
    };

    // ---- dV_w += P^T dO[:, cols w], dK_w += dS^T Q[:, cols w] (a group each): A = P^T / dS^T (K-major, K-dim =
    // queries), B = dO / Q columns [128w, 128w + 128) (MN-major: K-dim = query rows, 2 chunks LBO apart). The dV
    // group's completion frees the dO slot.
    auto issue_dv = [&](int it) {
      fence_regs(dv_reg);
      wgmma_fence();
      const uint64_t desc_p = make_desc_sw128(smem + kOffP + pipe.stage() * kPBytes, 16, 1024);
      const uint64_t desc_do = make_desc_sw128(do_stage(it) + cw * 2 * kChunkBytes, kChunkBytes, 1024);
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        Wgmma<kNDq, T>::template ss<1>(dv_reg, desc_p + ((kk * 32) >> 4), desc_do + ((kk * 16 * 128) >> 4), 1);
      }
      wgmma_commit();
    };
    auto issue_dk = [&](int it) {
      fence_regs(dk_reg);
      wgmma_fence();
      const uint64_t desc_ds = make_desc_sw128(smem + kOffDs + pipe.stage() * kPBytes, 16, 1024);
      const uint64_t desc_q = make_desc_sw128(q_stage(it) + cw * 2 * kChunkBytes, kChunkBytes, 1024);
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        Wgmma<kNDq, T>::template ss<1>(dk_reg, desc_ds + ((kk * 32) >> 4), desc_q + ((kk * 16 * 128) >> 4), 1);
      }
      wgmma_commit();
    };
    // ---- dQ_w = dS K[:, cols w] (one group): A = dS (M = 64 queries, K-dim = keys) read MN-major from the dS^T
    // tile (16 keys = 16 rows = 2048 bytes per k-step), B = K columns [128w, +128) (MN-major, K-dim = key rows).
    auto issue_dq = [&](int it) {
      const uint32_t ds_s = smem + kOffDs + pipe.stage() * kPBytes;
      wgmma_fence();
      const uint64_t desc_ds = make_desc_sw128(ds_s, kPBytes, 1024);
      const uint64_t desc_k = make_desc_sw128(smem + kOffK + cw * 2 * kChunkBytes, kChunkBytes, 1024);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        if (kk == 0) {
          Wgmma<kNDq, T>::template ss_z<1, 1>(dq_reg, desc_ds, desc_k);
        } else {
          Wgmma<kNDq, T>::template ss_t<1, 1>(dq_reg, desc_ds + ((kk * 2048) >> 4), desc_k + ((kk * 2048) >> 4), 1);
        }
      }
      wgmma_commit();
    };
    // After the dV group: dO of this step is consumed; after the dK group: Q, lse, D (lse / D read in softmax).
    auto release_do = [&](int it) {
      fence_regs(dv_reg);
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_do_empty(bars, pipe.stage()));
    };
    auto release_q = [&](int it) {
      fence_regs(dk_reg);
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty(bars, pipe.stage()));
    };
    // ---- dQ_w -> dq_accum, in register order (see the header): 16 red.global.add.v4.f32 per thread.
    auto store_dq = [&](int it) {
      fence_regs(dq_reg);
      const int head = head_k * p.h_h_k_ratio + hh_of(it);
      const int m_block = m_block_of(it);
      const int64_t row = seq.row_offset(head, p.nheads, p.seqlen_q_rounded) + m_block * kBlockM;
      float* dst = p.dq_accum + row * kHeadDim + cw * (64 * kNDq);
      // Det: wait for the lower key blocks' adds into this block (tid 0 acquires, the barrier passes it on to
      // the warpgroup), add, then (barrier: every thread's adds are issued before it) tid 0 release-increments.
      int* sem = nullptr;
      if constexpr (Det) {
        sem = p.dq_semaphore + seq.row_offset(head, p.nheads, p.seqlen_q_rounded / 64) + m_block;
        // Key blocks [n_block_min, n_block) of this query block add first: two increments each.
        if (tid == 0) wait_counter_geq(sem, 2 * (n_block - mask.template n_block_min<kBlockM, kBlockN>(m_block)));
        named_bar_sync(kBarDq + cw, 128);
      }
#pragma unroll
      for (int j = 0; j < kNDq / 8; ++j) {
        red_add_v4_f32(dst + j * 512 + tid * 4, dq_reg[4 * j], dq_reg[4 * j + 1], dq_reg[4 * j + 2],
                       dq_reg[4 * j + 3]);
      }
      if constexpr (Det) {
        named_bar_sync(kBarDq + cw, 128);
        if (tid == 0) red_release_gpu_add(sem, 1);  // (the last key block's increment has no waiter)
      }
    };
    auto wait_full = [&](int) { mbar_wait(bar_full(bars, pipe.stage()), pipe.phase()); };
    auto wait_do = [&](int) { mbar_wait(bar_do_full(bars, pipe.stage()), pipe.phase()); };

    mbar_wait(bar_kv(bars), PipelineState<1>().phase());  // (the K / V buffer: used once)
    for (int it = 0; it < n_iters; ++it) {
      wait_full(it);
      issue_s(it);
      wait_do(it);  // (S^T runs while dO may still be loading)
      issue_dp(it);
      softmax(it);  // waits for S^T, then dP^T: no other group is in flight
      store_pds(it);
      issue_dv(it);
      issue_dq(it);
      issue_dk(it);
      wgmma_wait<2>();
      release_do(it);
      wgmma_wait<1>();
      fence_regs(dq_reg);
      store_dq(it);
      wgmma_wait<0>();
      release_q(it);
      pipe.advance();
    }

    // ---- epilogue: dV, dK (scaled) from registers to global; rows < seqlen_k, cols < head_dim.
    T* dk_ptr = static_cast<T*>(p.dk);  // batch x seqlen_k x nheads_k x head_dim
    T* dv_ptr = static_cast<T*>(p.dv);  // batch x seqlen_k x nheads_k x head_dim
    const float scale = p.scale_softmax;
    // Through shared memory (the Q stages: free once both consumers' wgmmas are done), then 16-byte stores, a
    // warp per 512-byte row. Staging layout: row = key (512 bytes), 16-byte chunk index XOR (row % 8).
    const bool vec_ok = ((reinterpret_cast<uintptr_t>(dk_ptr) | reinterpret_cast<uintptr_t>(dv_ptr)) % 16 == 0) &&
                        ((p.dk_batch_stride | p.dk_row_stride | p.dk_head_stride | p.dv_batch_stride |
                          p.dv_row_stride | p.dv_head_stride) % 8 == 0);
    if (vec_ok) {
      const uint32_t st_k = smem + kOffQ, st_v = smem + kOffQ + kQBytes;
      named_bar_sync(kBarPds, 256);  // the other consumer's wgmmas no longer read the Q stages
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r0 + 8 * h;
#pragma unroll
        for (int j = 0; j < kNDq / 8; ++j) {
          const int chunk = cw * (kNDq / 8) + j;
          const uint32_t off = row * 512 + ((chunk ^ (row % 8)) << 4) + 4 * t;
          st_shared_dkdv_pair<T>(st_k, st_v, off, dk_reg[4 * j + 2 * h], dk_reg[4 * j + 2 * h + 1],
                                 dv_reg[4 * j + 2 * h], dv_reg[4 * j + 2 * h + 1], scale);
        }
      }
      named_bar_sync(kBarPds, 256);
      const int tid2 = threadIdx.x - 128;  // 0..255 over both consumers
#pragma unroll
      for (int i = 0; i < 64 * 32 / 256; ++i) {
        const int idx = i * 256 + tid2, row = idx / 32, chunk = idx % 32;
        const int key = n_block * kBlockN + row, c = chunk * 8;
        if (key < seq.seqlen_k && c < p.head_dim) {
          const uint32_t off = row * 512 + ((chunk ^ (row % 8)) << 4);
          uint4 vk, vv;
          asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(vk.x), "=r"(vk.y), "=r"(vk.z), "=r"(vk.w) : "r"(st_k + off));
          asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(vv.x), "=r"(vv.y), "=r"(vv.z), "=r"(vv.w) : "r"(st_v + off));
          *reinterpret_cast<uint4*>(dk_ptr + seq.k_offset(p.dk_batch_stride, p.dk_row_stride) +
                                    key * p.dk_row_stride + head_k * p.dk_head_stride + c) = vk;
          *reinterpret_cast<uint4*>(dv_ptr + seq.k_offset(p.dv_batch_stride, p.dv_row_stride) +
                                    key * p.dv_row_stride + head_k * p.dv_head_stride + c) = vv;
        }
      }
      return;
    }
    store_dkdv_pairs<T, kNDq>(p, dk_reg, dv_reg, key0, cw * kNDq, t, seq, head_k);
  }

  __device__ static __forceinline__ void run(const BwdTmaArgs& args) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t bars = smem + kOffBar;
    const int warp = threadIdx.x / 32;
    int n_block, head_k, batch;
    Scheduler::cta_tile(n_block, head_k, batch);
    if (threadIdx.x == 0) {
      mbar_init(bar_kv(bars), 1);
      for (int s = 0; s < kStages; ++s) {
        mbar_init(bar_full(bars, s), 1);       // lane 0's expect_tx arrival (Q, lse_log2, D bytes)
        mbar_init(bar_empty(bars, s), 8);      // one arrival per consumer warp
      }
      for (int s = 0; s < kDoStages; ++s) {
        mbar_init(bar_do_full(bars, s), 1);   // lane 0's expect_tx arrival
        mbar_init(bar_do_empty(bars, s), 8);  // one arrival per consumer warp
      }
      fence_mbar_init();
    }
    __syncthreads();
    if (warp < 4) {
      setmaxnreg_dec<kProducerRegs>();
      if (warp == 0) producer(args, smem, bars, n_block, head_k, batch);
    } else {
      setmaxnreg_inc<kConsumerRegs>();
      consumer(args, smem, bars, warp / 4 - 1, n_block, head_k, batch);
    }
  }
};

}  // namespace sm90
}  // namespace flash_ext
