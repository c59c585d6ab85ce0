// Hopper (sm_90a) FlashAttention backward: three kernels.
//   1. bwd_preprocess_sm90: D = rowsum(dO * O) per query row (0 for rows >= seqlen_q, up to seqlen_q_rounded)
//      into dsoftmax_sum, lse * log2 e into lse_log2 (+inf for rows >= seqlen_q and rows that see no key, so
//      P = 0 there without a test), and zero the dq_accum rows of the same block.
//   2. sm90_kernel<BwdKernel> (entry.cuh): one CTA per (n_block, kv head, batch) tile, or (Persistent) one CTA per SM
//      looping over those tiles; kBlockN = 128 keys resident in shared memory (K and V, loaded once per tile by TMA). It loops over the query heads of the GQA group and the query
//      blocks (kBlockM = 64 or 128 rows) that see the key block; Q, dO (TMA tensor loads) and the lse_log2 / D
//      rows (1-D bulk copies) stream through a kStages-slot mbarrier pipeline. kNWarps = 12:
//        warpgroup 0  producer: lane 0 of warp 0 issues the loads; setmaxnreg lowers the warpgroup to 24
//                     registers (40 with the dQ writer). Deterministic: warp 1 is the dQ writer
//                     (dq_writer: issues the dQ reduce-adds and the counter wait / release).
//        warpgroups 1, 2  consumers (240 registers, 232 with the dQ writer): consumer w owns keys [64w, 64w + 64)
//                     of the block. Per query
//                     block, with the products transposed so the key dimension is the wgmma M dimension:
//                       S^T  (64 x kBlockM) = K_w Q^T           (SS wgmma)
//                       dP^T (64 x kBlockM) = V_w dO^T          (SS wgmma)
//                       P^T = exp2(S^T * scale_log2 - lse_log2), dS^T = P^T o (dP^T - D)    (registers)
//                       dV_w += P^T dO,  dK_w += dS^T Q          (RS wgmma: P^T, dS^T straight from registers)
//                       dQ (kBlockM x d) += dS K                 (SS wgmma, dS^T read MN-major from shared memory)
//                     dK, dV stay in registers for the whole tile, then leave through shared memory and TMA
//                     stores (4-byte pair stores where TMA cannot describe dk / dv); dQ goes through shared memory and a bulk
//                     reduce-add (cp.reduce.async.bulk .add.f32) into dq_accum, issued by the consumer's tid 0
//                     (default) or by the writer warp (deterministic: bar_dq_full / bar_dq_empty hand-off; two
//                     staging buffers per consumer where shared memory allows: d128, d64 is one).
//      dQ split (DqSplitKeys): false: both consumers' dS^T go to shared memory, a 256-thread barrier, and
//      consumer w computes columns [w d/2, w d/2 + d/2) over all kBlockN keys (N = d/2); true: consumer w
//      computes all d columns over its own 64 keys only (no cross-warpgroup barrier, twice the reduce traffic).
//      Step order (BwdKernel's DkLast; the wgmma groups after the softmax, and what the warpgroup waits for
//      before it stages dQ):
//        plain:   dV + dK (one group) | dS^T store, barrier | dQ | wait for all | dQ out.
//        DkLast:  dV | dS^T store, barrier | dQ | dK | wait for dV, dQ | dQ out while dK runs | wait for dK.
//   3. bwd_convert_dq_sm90: dq = dq_accum * scale -> element type (un-permuting the accumulation layout).
//      (Converting each block in the main kernel, by the writer of its last contributing key block, measured
//      13-31% slower, 2026-11-21: removed; see NOTES.md.)
// The consumers issue the dQ reduces in the default mode (the writer warp measured within noise there); the
// deterministic mode uses the writer warp (+14..46% over a consumer-side wait; NOTES.md).
// Deterministic mode (Deterministic, params.deterministic): the reduce-adds into each dq_accum block are
// ordered by key block through an int32 counter per (batch, head, query block) in params.dq_semaphore (zeroed by
// the preprocess kernel), and the query blocks are visited in descending order so the CTAs run in lockstep:
// see step_coords and dq_writer (one increment per CTA per step).
//
// dq_accum layout (workspace, private to these kernels): per (batch, head, m_block) a contiguous block of
// kBlockM x kHeadDim floats, in the consumers' register order so that the shared-memory staging is
// conflict-free and the reduce is one bulk copy: see dq_accum_index.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../dropout.cuh"
#include "../mask.cuh"
#include "../params.h"
#include "../ptx.cuh"
#include "../seqinfo.cuh"
#include "bwd_scheduler.cuh"
#include "entry.cuh"
#include "bwd_softmax.cuh"
#include "pipeline.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash_ext {
namespace sm90 {

struct BwdTmaArgs {
  CUtensorMap q_map;   // over q: (head_dim, seqlen_q, nheads, batch), box 64 x kBlockM
  CUtensorMap do_map;  // over dout: (head_dim, seqlen_q, nheads, batch), box 64 x kBlockM
  CUtensorMap k_map;   // over k: (head_dim, seqlen_k, nheads_k, batch), box 64 x kBlockN
  CUtensorMap v_map;   // over v: (head_dim, seqlen_k, nheads_k, batch), box 64 x kBlockN
  CUtensorMap dk_map;  // over dk: (head_dim, seqlen_k, nheads_k, batch), box 64 x 64 (one consumer's keys)
  CUtensorMap dv_map;  // over dv, the same
  BwdParams params;
  int num_m_blocks;  // ceil(seqlen_q / kBlockM)
  int dkdv_tma;      // 1: dK / dV leave through shared memory and TMA stores (dk_map / dv_map valid), 0: pairs
};

// Index of dQ element (row, col) of one 64-row x kHeadDim block inside its dq_accum block (a kBlockM = 128 step
// covers two such blocks).
// n_dq: dQ columns per consumer (kHeadDim / 2 when split by columns, kHeadDim when split by keys).
// Consumer part wp = col / n_dq; inside it, register i = 4 (c / 8) + 2 ((row % 16) / 8) + c % 2 of thread
// tid = 32 (row / 16) + 4 (row % 8) + (c % 8) / 2 (c = col % n_dq): stored at (i / 4) * 512 + tid * 4 + i % 4.
__host__ __device__ __forceinline__ int dq_accum_index(int row, int col, int n_dq) {
  const int wp = col / n_dq, c = col - wp * n_dq;
  const int i = 4 * (c / 8) + 2 * ((row % 16) / 8) + (c % 2);
  const int tid = 32 * (row / 16) + 4 * (row % 8) + (c % 8) / 2;
  return wp * (64 * n_dq) + (i / 4) * 512 + tid * 4 + (i % 4);
}

// dK (times scale_softmax) and dV of this thread's key rows key0 and key0 + 8, kNCols accumulator columns starting
// at col0 (wgmma accumulator order: register 4j + 2h + e is column col0 + 8j + 2t + e of row key0 + 8h), written
// straight from registers to global as 4-byte pairs; rows >= seqlen_k and columns >= head_dim are skipped.
// Producer loads shared by the backward kernels (this file's and bwd_kernel_hd256.cuh's), issued by one lane.
// Key block n_block's K and V, kChunks boxes of 64 columns each (kChunkBytes apart), into k_dst / v_dst; bar
// expects their kKVBytes bytes each.
// (row0: the sequence's first key row in a varlen map, SeqInfoT::tma_k_row; 0 dense.)
template <int kChunks, int kChunkBytes, int kBlockN, int kKVBytes, bool MayVarlen = false>
__device__ __forceinline__ void load_kv_block(const BwdTmaArgs& args, uint32_t k_dst, uint32_t v_dst, uint32_t bar,
                                              int n_block, int head_k, int batch, int row0 = 0) {
  mbar_arrive_expect_tx(bar, 2 * kKVBytes);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if constexpr (MayVarlen) {
      tma_load_4d(k_dst + c * kChunkBytes, &args.k_map, bar, c * 64, row0 + n_block * kBlockN, head_k, batch);
      tma_load_4d(v_dst + c * kChunkBytes, &args.v_map, bar, c * 64, row0 + n_block * kBlockN, head_k, batch);
    } else {
      tma_load_4d(k_dst + c * kChunkBytes, &args.k_map, bar, c * 64, n_block * kBlockN, head_k, batch);
      tma_load_4d(v_dst + c * kChunkBytes, &args.v_map, bar, c * 64, n_block * kBlockN, head_k, batch);
    }
  }
}
// Varlen: zeroes rows [first_row, rows) of a SW128 tile of kChunks chunks (chunk_bytes apart, 128-byte rows) in
// shared memory, 16 bytes per store by the 128 threads of a warpgroup, then makes the stores visible to the
// warpgroup's wgmma (proxy fence, barrier `bar`). A sequence's last block holds the next sequence's rows (or rows
// of no sequence) where a dense map reads zeros; they are masked (P = 0) but 0 * a non-finite value is NaN, so
// they must be finite: every warpgroup that reads the tile writes the same zeros before its first wgmma on it.
template <int kChunks, int kChunkBytes, int kRows>
__device__ __forceinline__ void zero_tile_rows(uint32_t tile, int first_row, int tid) {
  const int first = max(first_row, 0);
  for (int i = tid; i < (kRows - first) * kChunks * 8; i += 128) {
    const int row = first + i / (kChunks * 8), chunk = (i / 8) % kChunks, piece = i % 8;
    asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(tile + chunk * kChunkBytes + row * 128 + piece * 16),
                 "r"(0)
                 : "memory");
  }
}
// The lse_log2 and D rows [row0, row0 + kBlockM) of a step into lse_dst / d_dst, completing on bar (rows up to
// seqlen_q_rounded exist: the preprocess kernel writes them).
template <int kBlockM>
__device__ __forceinline__ void load_lse_d_rows(const BwdParams& p, uint32_t lse_dst, uint32_t d_dst, int64_t row0,
                                                uint32_t bar) {
  bulk_load(lse_dst, p.lse_log2 + row0, kBlockM * 4, bar);
  bulk_load(d_dst, p.dsoftmax_sum + row0, kBlockM * 4, bar);
}

template <typename T, int kNCols, typename Seq>
__device__ __forceinline__ void store_dkdv_pairs(const BwdParams& p, const float (&dk_reg)[kNCols / 2],
                                                 const float (&dv_reg)[kNCols / 2], int key0, int col0, int t,
                                                 const Seq& seq, int head_k) {
  T* dk_ptr = static_cast<T*>(p.dk);  // batch x seqlen_k x nheads_k x head_dim
  T* dv_ptr = static_cast<T*>(p.dv);  // batch x seqlen_k x nheads_k x head_dim
  const float scale = p.scale_softmax;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = key0 + 8 * h;
    if (key >= seq.seqlen_k) continue;
    const int64_t ok = seq.k_offset(p.dk_batch_stride, p.dk_row_stride) + key * p.dk_row_stride +
                       head_k * p.dk_head_stride;
    const int64_t ov = seq.k_offset(p.dv_batch_stride, p.dv_row_stride) + key * p.dv_row_stride +
                       head_k * p.dv_head_stride;
#pragma unroll
    for (int j = 0; j < kNCols / 8; ++j) {
      const int c = col0 + 8 * j + 2 * t;
      if (c < p.head_dim) {
        *reinterpret_cast<uint32_t*>(dk_ptr + ok + c) =
            pack2<T>(dk_reg[4 * j + 2 * h] * scale, dk_reg[4 * j + 2 * h + 1] * scale);
        *reinterpret_cast<uint32_t*>(dv_ptr + ov + c) = pack2<T>(dv_reg[4 * j + 2 * h], dv_reg[4 * j + 2 * h + 1]);
      }
    }
  }
}

// One accumulator pair of dK (times scale) and of dV, packed to T, into the dK / dV staging tiles at byte offset off
// (the staged epilogues of both backward kernels).
template <typename T>
__device__ __forceinline__ void st_shared_dkdv_pair(uint32_t st_k, uint32_t st_v, uint32_t off, float dk0, float dk1,
                                                    float dv0, float dv1, float scale) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(st_k + off), "r"(pack2<T>(dk0 * scale, dk1 * scale)) : "memory");
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(st_v + off), "r"(pack2<T>(dv0, dv1)) : "memory");
}

// ------------------------------------------------------------------------------------------ preprocess
// a.x * b.x + a.y * b.y of two packed pairs of T.
template <typename T>
__device__ __forceinline__ float dot2(uint32_t a, uint32_t b) {
  const float2 x = unpack2<T>(a), y = unpack2<T>(b);
  return x.x * y.x + x.y * y.y;
}

// grid (seqlen_q_rounded / 64, nheads, batch), 256 threads. Each row of O and dO is read by kHeadDim / 8 threads,
// 16 bytes each (out and dout: 16-byte aligned, strides multiples of 8 elements: sm90_bwd_supported), the loads
// of up to 4 passes of 256 / (kHeadDim / 8) rows issued before their sums; the partial sums of a row meet by
// shuffles inside its group of lanes. H200, bf16, 16k tokens x 2048 hidden (torch.profiler): d64 95 -> 73 us
// against the first version (a warp per row, 4-byte loads), d128 88 -> 86 us, but d256 75 -> 88 us (with all 8
// passes in flight, 128 registers: 100 us). Zeroing dq_accum by cudaMemsetAsync instead cost more in total (30 us
// memset + 55 / 79 / 63 us). cuDNN's dO.O kernel takes 67-72 us for the same rows (without zeroing).
// MayVarlen (the general path's launches): the rows of SeqInfoT::ws_offset; blocks past the sequence's own rows return.
template <typename T, int kHeadDim, bool MayVarlen = false>
__global__ void __launch_bounds__(256) bwd_preprocess_sm90(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // launched on compute capability 9.0 only
  const int m_block = blockIdx.x, h = blockIdx.y;
  using SeqInfo = SeqInfoT<int, MayVarlen>;
  const SeqInfo seq(p, blockIdx.z);
  if constexpr (MayVarlen) {
    if (m_block * 64 >= seq.ws_rows_of_entry(p.seqlen_q_rounded)) return;
  }
  const int64_t row_base = (MayVarlen ? seq.ws_offset(h, p.nheads, p.seqlen_q_rounded)
                                      : seq.row_offset(h, p.nheads, p.seqlen_q_rounded)) + m_block * 64;
  // Zero this block's dq_accum rows (64 x kHeadDim floats, contiguous).
  float4* acc = reinterpret_cast<float4*>(p.dq_accum + row_base * kHeadDim);
  for (int i = threadIdx.x; i < 64 * kHeadDim / 4; i += 256) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  // Deterministic mode: zero this block's dQ counter (one per 64 rows; the main kernel, later on the same
  // stream, indexes them per kBlockM rows, which is at most as many).
  if (p.dq_semaphore != nullptr && threadIdx.x == 0) {
    p.dq_semaphore[(MayVarlen ? seq.ws_offset(h, p.nheads, p.seqlen_q_rounded) / 64
                              : seq.row_offset(h, p.nheads, p.seqlen_q_rounded / 64)) + m_block] = 0;
  }
  constexpr int kTPR = kHeadDim / 8;            // threads per row (8 columns each): 8, 16, 32
  constexpr int kRowsPerPass = 256 / kTPR;      // 32, 16, 8
  constexpr int kPasses = 64 / kRowsPerPass;    // 2, 4, 8
  const T* o_ptr = static_cast<const T*>(p.out);      // batch x seqlen_q x nheads x head_dim
  const T* do_ptr = static_cast<const T*>(p.dout);    // batch x seqlen_q x nheads x head_dim
  constexpr int kGroup = kPasses < 4 ? kPasses : 4;  // passes whose loads are in flight together
  const int r_in = threadIdx.x / kTPR, c = (threadIdx.x % kTPR) * 8;
#pragma unroll
  for (int i0 = 0; i0 < kPasses; i0 += kGroup) {
    uint4 ov[kGroup], dv[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int row = m_block * 64 + (i0 + i) * kRowsPerPass + r_in;
      ov[i] = dv[i] = make_uint4(0u, 0u, 0u, 0u);
      const SeqInfo seq_row(p, seq.b);  // (built here: a bound hoisted to the top costs registers)
      if (row < seq_row.seqlen_q && c < p.head_dim) {
        ov[i] = __ldg(reinterpret_cast<const uint4*>(o_ptr + seq.q_offset(p.o_batch_stride, p.o_row_stride) +
                                                     row * p.o_row_stride + h * p.o_head_stride + c));
        dv[i] = __ldg(reinterpret_cast<const uint4*>(do_ptr + seq.q_offset(p.do_batch_stride, p.do_row_stride) +
                                                     row * p.do_row_stride + h * p.do_head_stride + c));
      }
    }
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      float sum = dot2<T>(ov[i].x, dv[i].x) + dot2<T>(ov[i].y, dv[i].y) + dot2<T>(ov[i].z, dv[i].z) +
                  dot2<T>(ov[i].w, dv[i].w);
#pragma unroll
      for (int s = kTPR / 2; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
      if (threadIdx.x % kTPR == 0) {
        const int r = (i0 + i) * kRowsPerPass + r_in, row = m_block * 64 + r;
        p.dsoftmax_sum[row_base + r] = sum;
        const SeqInfo seq_row(p, seq.b);
        float l = row < seq_row.seqlen_q ? p.lse[seq.lse_offset(h, p.nheads, p.seqlen_q) + row] : INFINITY;
        p.lse_log2[row_base + r] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
      }
    }
  }
  // The persistent causal kernel's tile counter (DynamicSched), read by the main kernel later on the stream. (Here,
  // after the loads: at the top, ptxas spilled 4 bytes in the bf16 d256 instance.)
  if (threadIdx.x == 0 && (m_block | h | seq.b) == 0 && p.tile_counter != nullptr) *p.tile_counter = 0;
#endif
}

// ------------------------------------------------------------------------------------------ convert dq
// grid (ceil(seqlen_q / 16), nheads, batch), 128 threads: one 16-row stripe w of a 64-row dq_accum block. The
// stripe's values are those of consumer threads 32w .. 32w + 31 (see dq_accum_index), i.e. kHeadDim / 8 runs of
// 128 contiguous floats (run (wp, j) at wp * 64 * kNDq + j * 512 + w * 128): one 16-byte load per lane per run,
// un-permuted into a row-major shared tile (row stride kHeadDim + 8 floats: the float2 stores of a half-warp hit
// 32 different banks), then each thread scales, rounds and writes 4 columns (8 bytes) of a row, so a warp
// writes whole rows (dq: 16-byte aligned, strides multiples of 8 elements: sm90_bwd_supported). (The first
// version wrote 4-byte pairs straight from the permuted order: 16-byte pieces of 8 rows per warp store.)
template <typename T, int kHeadDim, int kNDq, bool MayVarlen = false>
__global__ void __launch_bounds__(128) bwd_convert_dq_sm90(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kRuns = kHeadDim / 8;
  constexpr int kStride = kHeadDim + 8;
  __shared__ __align__(16) float tile[16 * kStride];
  const int h = blockIdx.y;
  const SeqInfoT<int, MayVarlen> seq(p, blockIdx.z);
  const int m_block = blockIdx.x / 4, w = blockIdx.x % 4;
  if constexpr (MayVarlen) {
    if (m_block * 64 + w * 16 >= seq.seqlen_q) return;  // past the sequence's rows (varlen)
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_base = (MayVarlen ? seq.ws_offset(h, p.nheads, p.seqlen_q_rounded)
                                      : seq.row_offset(h, p.nheads, p.seqlen_q_rounded)) + m_block * 64;
  const float4* acc = reinterpret_cast<const float4*>(p.dq_accum + row_base * kHeadDim);  // 64 x kHeadDim floats
  float4 a[kRuns / 4];
#pragma unroll
  for (int i = 0; i < kRuns / 4; ++i) {
    const int run = warp + 4 * i, wp = run / (kNDq / 8), j = run % (kNDq / 8);
    a[i] = acc[(wp * 64 * kNDq + j * 512 + w * 128) / 4 + lane];
  }
#pragma unroll
  for (int i = 0; i < kRuns / 4; ++i) {
    const int run = warp + 4 * i, wp = run / (kNDq / 8), j = run % (kNDq / 8);
    const int r = lane / 4, c = wp * kNDq + 8 * j + 2 * (lane % 4);
    *reinterpret_cast<float2*>(&tile[r * kStride + c]) = make_float2(a[i].x, a[i].y);
    *reinterpret_cast<float2*>(&tile[(r + 8) * kStride + c]) = make_float2(a[i].z, a[i].w);
  }
  __syncthreads();
  constexpr int kTPR = kHeadDim / 4;        // threads per row: 16, 32, 64
  constexpr int kRowsPerPass = 128 / kTPR;  // 8, 4, 2
  const int c = (threadIdx.x % kTPR) * 4;
  const float scale = p.scale_softmax;
  T* dq = static_cast<T*>(p.dq);  // batch x seqlen_q x nheads x head_dim
#pragma unroll
  for (int r = threadIdx.x / kTPR; r < 16; r += kRowsPerPass) {
    const int row = m_block * 64 + w * 16 + r;
    if (row < seq.seqlen_q && c < p.head_dim) {
      const float4 x = *reinterpret_cast<const float4*>(&tile[r * kStride + c]);
      uint2 o;
      o.x = pack2<T>(x.x * scale, x.y * scale);
      o.y = pack2<T>(x.z * scale, x.w * scale);
      *reinterpret_cast<uint2*>(dq + seq.q_offset(p.dq_batch_stride, p.dq_row_stride) + row * p.dq_row_stride +
                                h * p.dq_head_stride + c) = o;
    }
  }
#endif
}

// Launch geometry of the two kernels above (the d64 / d128 and d256 launchers and the harness use these).
template <typename T, int kHeadDim, bool MayVarlen = false>
inline void launch_bwd_preprocess(const BwdParams& p, cudaStream_t stream) {
  bwd_preprocess_sm90<T, kHeadDim, MayVarlen><<<dim3(p.seqlen_q_rounded / 64, p.nheads, p.batch), 256, 0, stream>>>(p);
}
template <typename T, int kHeadDim, int kNDq, bool MayVarlen = false>
inline void launch_bwd_convert_dq(const BwdParams& p, cudaStream_t stream) {
  bwd_convert_dq_sm90<T, kHeadDim, kNDq, MayVarlen>
      <<<dim3((p.seqlen_q + 15) / 16, p.nheads, p.batch), 128, 0, stream>>>(p);
}

// ------------------------------------------------------------------------------------------ main kernel
// DkLast: the step order of the header (else plain). Deterministic: dQ reduce-adds ordered by key block, issued by
// the dQ-writer warp (else by the consumers, in arrival order).
template <typename T_, int kHeadDim_, int kBlockM_, int kStages_, bool IsCausal_, bool DqSplitKeys_, bool DkLast_,
          bool Deterministic_ = false, bool Persistent_ = false, bool IsLocal_ = false, bool Dropout_ = false>
struct BwdKernel {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per pipeline step: 64 or 128 (kMTiles wgmma M tiles of dQ)
  static constexpr int kMTiles = kBlockM / 64;
  static constexpr int kBlockN = 128;  // two consumer warpgroups x 64 keys
  static constexpr int kStages = kStages_;
  static constexpr bool IsCausal = IsCausal_;
  static constexpr bool IsLocal = IsLocal_;
  static constexpr bool Dropout = IsLocal_ && Dropout_;  // (dropout.cuh; its own instantiation of the general path)
  using MaskT = Mask<IsCausal, IsLocal>;  // which keys a row sees; block ranges on both sides (mask.cuh)
  // The general path reads variable-length batches too (seqinfo.cuh); the plain and causal kernels dense ones only.
  using Seq = SeqInfoT<int, IsLocal>;
  static constexpr bool DqSplitKeys = DqSplitKeys_;
  static constexpr bool DkLast = DkLast_;
  static constexpr bool Deterministic = Deterministic_;
  static constexpr bool DqWriter = Deterministic;  // warp 1 issues the dQ reduce-adds
  // (The writer orders the two consumers' parts by columns: split by keys they would add into the same elements.)
  static_assert(!(Deterministic && DqSplitKeys), "deterministic mode is implemented for the dQ split by columns");
  // Persistent: gridDim.x CTAs loop over the (n_block, kv head, batch) tiles in Scheduler's order; the pipeline
  // position runs on across tiles, and the next tile's K / V (and first Q / dO) load while the consumers store this
  // tile's dK / dV (bar_kv_empty frees K / V after the last wgmma). Non-causal tiles are equal: the static order.
  // Causal tiles shrink with the key block: DynamicSched, the producer takes each next tile from Scheduler's
  // counter and passes it to the consumers in shared memory, published by its bar_kv arrival (a tile index >= the
  // number of tiles: no more work).
  static constexpr bool Persistent = Persistent_;
  static constexpr bool DynamicSched = Persistent && IsCausal;
  using Scheduler = BwdScheduler<kBlockN, Persistent, DynamicSched>;  // the tiles' order (bwd_scheduler.cuh)
  static_assert(!Persistent || !Deterministic, "the persistent loop is implemented for the default kernel");
  static constexpr int kNWarps = 12;
  static constexpr int kNThreads = kNWarps * 32;
  // Register budget: the kernel starts at 168 per thread (384 x 168 = 64512); 24*128 + 240*256 = 64512, and
  // with the writer warp 40*128 + 232*256 = 64512 (the split its measurements used).
  // (A d64 causal persistent kernel spilled 8 bytes at 24 / 240; it ran at 40 / 232 in its measurement, NOTES.md.)
  static constexpr int kProducerRegs = DqWriter ? 40 : 24;
  static constexpr int kConsumerRegs = DqWriter ? 232 : 240;
  static_assert(kHeadDim % 64 == 0, "SW128 chunks are 64 columns wide");
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kNDq = DqSplitKeys ? kHeadDim : kHeadDim / 2;  // dQ columns per consumer
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;                // one Q (or dO) stage
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQChunkBytes = kBlockM * 128;
  static constexpr int kKVChunkBytes = kBlockN * 128;
  static_assert(kBlockM == 64 || kBlockM == 128, "kBlockM");
  // dS^T: kBlockN key rows x kBlockM queries, SW128 chunks of 64 queries (chunk c at c * kBlockN * 128).
  static constexpr int kDsBytes = kBlockN * kBlockM * 2;
  // Split by keys, each consumer reads back only its own dS^T rows after its own previous dQ wgmma: one
  // buffer; split by columns, the other consumer may still read the previous step's: two (step parity).
  static constexpr int kDsBufs = DqSplitKeys ? 1 : 2;
  static constexpr int kDqTileBytes = 64 * kNDq * 4;                   // one 64-row tile of one consumer's dQ
  static constexpr int kDqPartBytes = kMTiles * kDqTileBytes;          // one consumer's dQ staging
  // dQ staging buffers per consumer: with the writer warp two where shared memory allows (the consumer
  // stages step it + 1 while the writer still works on step it), else one.
  static constexpr int kSmemFixed = 2 * kKVBytes + 2 * kStages * kQBytes + kDsBufs * kDsBytes +
                                    2 * kStages * kBlockM * 4 + (1 + 2 * kStages + 9) * 8 + 1024;
  static constexpr int kDqBufs = DqWriter && kSmemFixed + 4 * kDqPartBytes <= 227 * 1024 ? 2 : 1;
  // Shared memory (offsets from a 1024-aligned base).
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVBytes;
  static constexpr int kOffQ = kOffV + kKVBytes;                      // kStages x (kChunks x 64 x 64) SW128
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;           // kDsBufs buffers
  static constexpr int kOffDq = kOffDs + kDsBufs * kDsBytes;          // kDqBufs x 2 consumers x kDqPartBytes
  static constexpr int kOffLse = kOffDq + kDqBufs * 2 * kDqPartBytes; // kStages x kBlockM floats (lse * log2 e)
  static constexpr int kOffD = kOffLse + kStages * kBlockM * 4;       // kStages x kBlockM floats
  static constexpr int kOffBar = kOffD + kStages * kBlockM * 4;
  static_assert(kOffLse % 16 == 0 && kOffD % 16 == 0, "bulk copy destinations are 16-byte aligned");
  static constexpr int kNumBars = 1 + 2 * kStages + (DqWriter ? 4 * kDqBufs : 0) + (Persistent ? 1 : 0);
  static constexpr int kOffTile = kOffBar + kNumBars * 8;  // DynamicSched: the current tile's index (int32)
  static constexpr int kSmemBytes = kOffTile + 16 + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
  // TMA epilogue (args.dkdv_tma): consumer w stages its dK rows, then its dV rows (64 keys each, kChunks SW128
  // boxes of 64 x 64) at kOffDs + w kKVBytes, over the dS buffers and the dQ staging (free after the tile's last
  // step; see the epilogue in consumer).
  static_assert(kDsBufs * kDsBytes + kDqBufs * 2 * kDqPartBytes >= 2 * kKVBytes, "dK / dV staging");
  // Named barriers (0 is __syncthreads): 1 dS of both consumers written; 2, 3 dS of consumer w (split keys);
  // 4, 5 dQ staging of consumer w.
  static constexpr int kBarDs = 1, kBarDsOwn = 2, kBarDq = 4;

  __device__ static __forceinline__ uint32_t bar_kv(uint32_t b) { return b; }
  // Persistent: K / V of the current tile no longer read (one arrival per consumer warp).
  __device__ static __forceinline__ uint32_t bar_kv_empty(uint32_t b) { return b + 8 * (kNumBars - 1); }
  __device__ static __forceinline__ uint32_t bar_full(uint32_t b, int s) { return b + 8 * (1 + s); }
  __device__ static __forceinline__ uint32_t bar_empty(uint32_t b, int s) { return b + 8 * (1 + kStages + s); }
  // Writer mode: dQ staging buffer (cw, buf) written by consumer cw (4 arrivals: one per warp) / read by the
  // writer's reduce (1 arrival).
  __device__ static __forceinline__ uint32_t bar_dq_full(uint32_t b, int cw, int buf) {
    return b + 8 * (1 + 2 * kStages + cw * kDqBufs + buf);
  }
  __device__ static __forceinline__ uint32_t bar_dq_empty(uint32_t b, int cw, int buf) {
    return b + 8 * (1 + 2 * kStages + 2 * kDqBufs + cw * kDqBufs + buf);
  }
  __device__ static __forceinline__ uint32_t dq_stage_smem(uint32_t smem, int cw, int buf) {
    return smem + kOffDq + (buf * 2 + cw) * kDqPartBytes;
  }

  // Pipeline step it -> (head hh of the GQA group, query block). Default: heads outer, query blocks ascending
  // from m_block_min. Deterministic: query blocks DESCENDING from the last, heads inner. Then every key-block
  // CTA of a (head_k, batch) visits a given (hh, m_block) at the same step index (CTA n's sequence is a prefix
  // of CTA n - 1's: causal contributors form a prefix of key blocks), so the CTAs run in lockstep, each one
  // counter hand-off behind the previous one. Ascending, causal CTA n would first need the query blocks that
  // only CTAs < n see to be done by them: a wait of a whole step per CTA, and about half the SM time idle.
  // Bulk reduce-add of consumer cw's staged dQ part (shared memory dq_s) into the dq_accum block whose first row is
  // row (batch, head, m_block flattened); the caller commits the bulk group.
  __device__ static __forceinline__ void reduce_dq_part(const BwdParams& p, int64_t row, int cw, uint32_t dq_s) {
    if constexpr (DqSplitKeys) {
      // The 64-row blocks of dq_accum are contiguous: one reduce for all kMTiles tiles.
      bulk_reduce_add_f32(p.dq_accum + row * kHeadDim, dq_s, kDqPartBytes);
    } else {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        bulk_reduce_add_f32(p.dq_accum + (row + 64 * mt) * kHeadDim + cw * 64 * kNDq, dq_s + mt * kDqTileBytes,
                            kDqTileBytes);
      }
    }
  }
  // First workspace row (lse_log2, D, dq_accum) of `head`'s rows of the tile's sequence, and its first dQ counter
  // (one per 64 rows): SeqInfoT::ws_offset in the general path (varlen), the dense layout otherwise.
  __device__ static __forceinline__ int64_t ws_base(const BwdParams& p, const Seq& seq, int head) {
    if constexpr (IsLocal) return seq.ws_offset(head, p.nheads, p.seqlen_q_rounded);
    else return seq.row_offset(head, p.nheads, p.seqlen_q_rounded);
  }
  __device__ static __forceinline__ int64_t sem_base(const BwdParams& p, const Seq& seq, int head) {
    if constexpr (IsLocal) return seq.ws_offset(head, p.nheads, p.seqlen_q_rounded) / 64;
    else return seq.row_offset(head, p.nheads, p.seqlen_q_rounded / 64);
  }
  // Varlen (general path): whether key block n_block lies past its sequence's keys (a tile no role runs).
  __device__ static __forceinline__ bool tile_past_end(const BwdParams& p, int n_block, int batch) {
    if constexpr (IsLocal) return n_block * kBlockN >= Seq(p, batch).seqlen_k;
    else return false;
  }

  // The end of key block n_block's query-block range [Mask::m_block_min, Mask::m_block_max). The plain and causal
  // policies bound it by seqlen_q alone, the same for every key block: the launcher evaluates it once
  // (args.num_m_blocks, read here from the constant bank; computing mask.m_block_max in the kernel spilled 8 bytes
  // in two d64 / d128 kernels). The local policy's bound depends on n_block (a window's left side).
  __device__ static __forceinline__ int m_block_max_of(const BwdTmaArgs& args, const MaskT& mask, int n_block) {
    if constexpr (IsLocal) return mask.template m_block_max<kBlockM, kBlockN>(n_block);
    else { (void)mask; (void)n_block; return args.num_m_blocks; }
  }
  __device__ static __forceinline__ void step_coords(const BwdTmaArgs& args, const MaskT& mask, int n_block,
                                                     int m_block_min, int it, int& hh, int& m_block) {
    const int ratio = args.params.h_h_k_ratio;
    const int m_block_max = m_block_max_of(args, mask, n_block);
    if constexpr (Deterministic) {
      hh = it % ratio;
      m_block = m_block_max - 1 - it / ratio;
    } else {
      const int n_m = m_block_max - m_block_min;
      hh = it / n_m;
      m_block = m_block_min + it % n_m;
    }
  }

  // Pipeline steps of a key block whose query blocks are [m_block_min, m_block_max): every (head of the GQA group,
  // query block of the range). Producer, writer, consumers and the persistent tile loop all count with this.
  __device__ static __forceinline__ int num_steps(const BwdTmaArgs& args, const MaskT& mask, int n_block,
                                                  int m_block_min) {
    return (m_block_max_of(args, mask, n_block) - m_block_min) * args.params.h_h_k_ratio;
  }

  // ------------------------------------------------------------------------------------------ producer
  // g0: pipeline steps of the CTA's earlier tiles, tile_iter: their number (both 0 unless Persistent); sched_tile:
  // DynamicSched: the tile's index, published to the consumers with the K / V arrival.
  __device__ static void producer(const BwdTmaArgs& args, uint32_t smem, uint32_t bars, int n_block, int head_k,
                                  int batch, int g0 = 0, int tile_iter = 0, int sched_tile = 0) {
    const BwdParams& p = args.params;
    const int lane = threadIdx.x % 32;
    const Seq seq(p, batch);
    MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
    const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
    const PipelineState<1> kv(tile_iter);  // the K / V buffer: one slot, one use per tile
    // (TMA coordinates: the general path's from SeqInfo, a varlen map being one packed entry.)
    if (Persistent && tile_iter > 0) mbar_wait(bar_kv_empty(bars), kv.advanced(-1).phase());
    if (lane == 0) {
      // (The consumers read it after their bar_kv wait, which the arrival below releases; they are done with the
      // previous index: bar_kv_empty.)
      if constexpr (DynamicSched) {
        asm volatile("st.shared.s32 [%0], %1;\n" ::"r"(smem + kOffTile), "r"(sched_tile) : "memory");
      }
      if (tile_iter == 0) {
        tma_prefetch_desc(&args.q_map);
        tma_prefetch_desc(&args.do_map);
      }
      if constexpr (IsLocal) {
        load_kv_block<kChunks, kKVChunkBytes, kBlockN, kKVBytes, true>(args, smem + kOffK, smem + kOffV, bar_kv(bars),
                                                                       n_block, head_k, seq.tma_batch(), seq.tma_k_row(0));
      } else {
        load_kv_block<kChunks, kKVChunkBytes, kBlockN, kKVBytes>(args, smem + kOffK, smem + kOffV, bar_kv(bars), n_block,
                                                                 head_k, seq.b);
      }
    }
    const int n_iters = num_steps(args, mask, n_block, m_block_min);
    const PipelineState<kStages> first(g0);  // this tile's first step on the Q / dO / lse / D ring
    for (int it = 0; it < n_iters; ++it) {
      const PipelineState<kStages> pipe = first.advanced(it);  // step it's slot and parity
      int hh, m_block;
      step_coords(args, mask, n_block, m_block_min, it, hh, m_block);
      const int head = head_k * p.h_h_k_ratio + hh;
      const int64_t d_base = ws_base(p, seq, head);
      const int stage = pipe.stage(), phase = pipe.phase();
      mbar_wait(bar_empty(bars, stage), phase ^ 1);
      if (lane == 0) {
        mbar_arrive_expect_tx(bar_full(bars, stage), 2 * kQBytes + 2 * kBlockM * 4);
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          tma_load_4d(smem + kOffQ + stage * kQBytes + c * kQChunkBytes, &args.q_map, bar_full(bars, stage), c * 64,
                      IsLocal ? seq.tma_q_row(m_block * kBlockM) : m_block * kBlockM, head,
                      IsLocal ? seq.tma_batch() : seq.b);
          tma_load_4d(smem + kOffDo + stage * kQBytes + c * kQChunkBytes, &args.do_map, bar_full(bars, stage),
                      c * 64, IsLocal ? seq.tma_q_row(m_block * kBlockM) : m_block * kBlockM, head,
                      IsLocal ? seq.tma_batch() : seq.b);
        }
        load_lse_d_rows<kBlockM>(p, smem + kOffLse + stage * kBlockM * 4, smem + kOffD + stage * kBlockM * 4,
                                 d_base + static_cast<int64_t>(m_block) * kBlockM, bar_full(bars, stage));
      }
    }
  }

  // ------------------------------------------------------------------------------------------ dQ writer
  // Deterministic mode, warp 1 of the producer warpgroup. Per step, lane 0: wait until the step's counter reaches
  // n_block - n_block_min(m_block) (the policy's first contributing key block of the query block), i.e. every
  // lower contributing key block's adds are complete, wait for each consumer's staged dQ part
  // (bar_dq_full), issue its bulk reduce-add, wait until the reduces have READ the staging buffer and hand it back
  // (bar_dq_empty); then wait for the reduces to COMPLETE, proxy fence, and release-increment the counter: one
  // increment per CTA per (head, query block). The counters are per (batch, head, kBlockM-row block) (entries
  // m_block of the 64-row array). Why the adds then run in key-block order, bitwise the same sums every run:
  //   - The contributors of query block m are the key blocks [n_block_min(m), n_block_max(m)) of the policy (today
  //     n_block_min is 0: causal bottom-right, a row that sees key block n sees every block < n), and CTA n visits
  //     every m of [m_block_min(n), m_block_max(n)). So if CTA n visits m, all CTAs n' in [n_block_min(m), n) of
  //     the same (head_k, batch) do too, each increments once, and the first n - n_block_min(m) increments can
  //     only come from them. With GQA every query head of the group has the same pattern (its own counters);
  //     query blocks no key block sees have no contributors. (No step tests for the last contributor,
  //     n_block_max(m) - 1: its increment simply has no waiter.)
  //   - The two consumers' parts (dQ split by columns) are disjoint columns: their relative order is free.
  //   - Deadlock freedom: the writer of CTA n waits only for CTAs of the same (head_k, batch) with a lower
  //     blockIdx.x; x is the fastest grid dimension, so those have lower linear block indices and are launched no
  //     later (resident or finished). The consumers wait only for their own writer (bar_dq_empty) and producer,
  //     the producer only for its consumers.
  //   - Memory ordering: the reduce-adds are async-proxy writes; wait_group 0 completes them and
  //     fence.proxy.async.global orders them before the generic-proxy release (red.release.gpu); on the other
  //     side ld.acquire.gpu, then the same proxy fence before the writer issues its own reduce.
  __device__ static void dq_writer(const BwdTmaArgs& args, uint32_t smem, uint32_t bars, int n_block, int head_k,
                                   int batch) {
    const BwdParams& p = args.params;
    const int lane = threadIdx.x % 32;
    const Seq seq(p, batch);
    MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
    const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
    const int n_iters = num_steps(args, mask, n_block, m_block_min);
    if (lane != 0) return;
    const PipelineState<kDqBufs> first;  // the dQ staging ring (one tile per CTA in writer mode)
    for (int it = 0; it < n_iters; ++it) {
      const PipelineState<kDqBufs> dq_pipe = first.advanced(it);  // step it's buffer and parity
      int hh, m_block;
      step_coords(args, mask, n_block, m_block_min, it, hh, m_block);
      const int head = head_k * p.h_h_k_ratio + hh;
      const int buf = dq_pipe.stage();
      const uint32_t par = dq_pipe.phase();
      const int64_t row = ws_base(p, seq, head) + m_block * kBlockM;
      int* sem = p.dq_semaphore + sem_base(p, seq, head) + m_block;  // only dereferenced when deterministic
      if constexpr (Deterministic) {
        // Key blocks [n_block_min, n_block) of this query block add before this one: one increment each.
        wait_counter_geq(sem, n_block - mask.template n_block_min<kBlockM, kBlockN>(m_block));
        fence_proxy_async_global();
      }
#pragma unroll
      for (int cw = 0; cw < 2; ++cw) {
        const uint32_t dq_s = dq_stage_smem(smem, cw, buf);
        mbar_wait(bar_dq_full(bars, cw, buf), par);
        reduce_dq_part(p, row, cw, dq_s);
        tma_store_commit();
      }
      tma_store_wait_read();
      mbar_arrive(bar_dq_empty(bars, 0, buf));
      mbar_arrive(bar_dq_empty(bars, 1, buf));
      if constexpr (Deterministic) {
        bulk_wait_all();  // complete: the global writes are done
        fence_proxy_async_global();
        red_release_gpu_add(sem, 1);  // (the last contributor's increment has no waiter)
      }
    }
    bulk_wait_all();
  }

  // ------------------------------------------------------------------------------------------ consumer
  __device__ static void consumer(const BwdTmaArgs& args, uint32_t smem, uint32_t bars, int cw, int n_block,
                                  int head_k, int batch, int g0 = 0, int tile_iter = 0) {
    const BwdParams& p = args.params;
    const int tid = threadIdx.x - 128 * (cw + 1);  // 0..127 inside the warpgroup
    const int warp_in_wg = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const Seq seq(p, batch);
    MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
    const int m_block_min = mask.template m_block_min<kBlockM, kBlockN>(n_block);
    const int n_iters = num_steps(args, mask, n_block, m_block_min);
    const float scale_log2 = p.scale_softmax_log2;
    // This thread's key rows (global): key0 and key0 + 8.
    const int key0 = n_block * kBlockN + cw * 64 + warp_in_wg * 16 + g;
    // The score modifiers: read (and their code run) only in the general path's instantiation.
    ScoreMod mod = IsLocal ? ScoreMod(p, batch, head_k * p.h_h_k_ratio, seq.seqlen_q, seq.seqlen_k) : ScoreMod();

    float dv_reg[kHeadDim / 2], dk_reg[kHeadDim / 2];
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) dv_reg[i] = dk_reg[i] = 0.f;
    float s_reg[kBlockM / 2], dp_reg[kBlockM / 2], dq_reg[kMTiles][kNDq / 2];
    uint32_t p_frag[kBlockM / 16][4], ds_frag[kBlockM / 16][4];

    // A operands K_w, V_w: this consumer's 64 rows of each chunk (K-major).
    const uint32_t k_w = smem + kOffK + cw * 64 * 128;
    const uint32_t v_w = smem + kOffV + cw * 64 * 128;

    // This role's ring positions at the current step, set in one place (the top of the step loop) from the tile's
    // first step: the Q / dO / lse / D ring and the dS^T buffers (both run on across tiles from g0), the dQ staging
    // ring (writer mode: one tile per CTA). (Advanced as induction variables of their own, next to the step index,
    // they were not merged with it: an extra register and add, other SASS.)
    const PipelineState<kStages> first(g0);
    const PipelineState<kDsBufs> ds_first(g0);
    const PipelineState<kDqBufs> dq_first;
    PipelineState<kStages> pipe = first;
    PipelineState<kDsBufs> ds_pipe = ds_first;
    PipelineState<kDqBufs> dq_pipe = dq_first;
    auto q_stage = [&](int) { return smem + kOffQ + pipe.stage() * kQBytes; };
    auto do_stage = [&](int) { return smem + kOffDo + pipe.stage() * kQBytes; };

    // Dropout: the keep bits of the current step (keep_bits, at the top of the step, before S^T / dP^T hold registers).
    uint64_t keep[(kBlockM / 2 + 63) / 64];
    (void)keep;
    auto keep_bits = [&](int it) {
      int hh, m_block;
      step_coords(args, mask, n_block, m_block_min, it, hh, m_block);
      const DropoutDev drop(p, batch, head_k * p.h_h_k_ratio + hh);
      drop.template oct_keep<kBlockM / 2>(keep, m_block * kBlockM, key0, t);
    };

    // ---- S^T = K_w Q^T, dP^T = V_w dO^T (two commit groups)
    auto issue_sdp = [&](int it) {
      const uint32_t q_s = q_stage(it), do_s = do_stage(it);
      fence_regs(s_reg);
      fence_regs(dp_reg);
      wgmma_fence();
      // acc = A B^T over the head dim: A the warpgroup's 64 K or V rows, B the stage's Q or dO rows.
      auto gemm = [&](float(&acc)[kBlockM / 2], uint32_t a, uint32_t b) {
        const uint64_t desc_a = make_desc_sw128(a, 16, 1024), desc_b = make_desc_sw128(b, 16, 1024);
#pragma unroll
        for (int kk = 0; kk < kHeadDim / 16; ++kk) {
          const uint32_t off_a = (kk / 4) * kKVChunkBytes + (kk % 4) * 32;
          const uint32_t off_b = (kk / 4) * kQChunkBytes + (kk % 4) * 32;
          Wgmma<kBlockM, T>::template ss<0>(acc, desc_a + (off_a >> 4), desc_b + (off_b >> 4), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
      };
      gemm(s_reg, k_w, q_s);
      gemm(dp_reg, v_w, do_s);
    };

    // ---- wait for S^T / dP^T (no other wgmma group in flight); P^T, dS^T into A fragments.
    auto softmax = [&](int it) {
      const int stage = pipe.stage();
      int hh, m_block;
      step_coords(args, mask, n_block, m_block_min, it, hh, m_block);
      if constexpr (IsLocal) {
        if (p.h_h_k_ratio > 1) mod.set_head(p, batch, head_k * p.h_h_k_ratio + hh);  // this step's query head
      }
      wgmma_wait<1>();
      fence_regs(s_reg);
      // P^T = exp2(S^T scale_log2 - lse_log2[col]) (0 where masked)
      bool need_mask = n_block >= mask.template n_block_unmasked_end<kBlockM, kBlockN>(m_block);
      if constexpr (MaskT::kHasLeftBound) {
        need_mask = need_mask || n_block < mask.template n_block_unmasked_begin<kBlockM, kBlockN>(m_block);
      }
      if constexpr (IsLocal) {
        if (mod.active()) score_mod_st<T>(s_reg, mod, p, m_block * kBlockM, key0, t);
      }
      recompute_pt(s_reg, smem + kOffLse, stage * kBlockM, t, scale_log2);
      if (need_mask) mask_pt(s_reg, mask, m_block * kBlockM, key0, t);
      wgmma_wait<0>();
      fence_regs(dp_reg);
      // Dropout (dropout.cuh; the step's keep bits from the top of the step): dP^T o Z / (1 - p) here; P^T o Z /
      // (1 - p) for dV below, after its last use as P.
      if constexpr (Dropout) dropout_apply(dp_reg, keep, p.dropout_scale);
      if constexpr (IsLocal) {
        if (p.dsink_accum != nullptr) {  // the sinks' gradient terms, from P^T and dP^T (params.h)
          const int h = head_k * p.h_h_k_ratio + hh;
          add_dsink_terms(p, batch, h, dsink_slot<kBlockN, 8>(n_block, cw * 4 + warp_in_wg),
                          sink_terms_pt(s_reg, dp_reg, smem + kOffLse, stage * kBlockM, t, sink_log2_of(p, h)));
        }
      }
      ds_from_pt(dp_reg, s_reg, smem + kOffD, stage * kBlockM, t);  // dS^T = P^T o (dP^T - D)
      if constexpr (IsLocal) {
        if (p.dbias_accum != nullptr) {
          float* dbias_bh = p.dbias_accum + (int64_t(batch) * p.nheads + head_k * p.h_h_k_ratio + hh) *
                                                int64_t(seq.seqlen_q) * seq.seqlen_k;
          store_dbias_st(dp_reg, mod, p, dbias_bh, m_block * kBlockM, key0, t);
        }
        if (mod.has_softcap()) {
          softcap_grad_st<T>(dp_reg, s_reg, smem + kOffLse, stage * kBlockM, mod, p, m_block * kBlockM, key0, t);
        }
        if constexpr (Dropout) dropout_apply(s_reg, keep, p.dropout_scale);
      }
      // P^T, dS^T as A operands of dV += P^T dO, dK += dS^T Q (k-step kk: q columns 16kk..16kk+15).
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          p_frag[kk][r] = pack2<T>(s_reg[8 * kk + 2 * r], s_reg[8 * kk + 2 * r + 1]);
          ds_frag[kk][r] = pack2<T>(dp_reg[8 * kk + 2 * r], dp_reg[8 * kk + 2 * r + 1]);
        }
      }
    };
    // ---- dS^T (16-bit) -> shared memory, SW128: row = key in block (kBlockN rows), col = query (64); then the
    // barrier that makes it visible to the dQ wgmma (both consumers' halves, or this consumer's own).
    auto store_ds = [&](int it) {
      const uint32_t ds_s = smem + kOffDs + ds_pipe.stage() * kDsBytes;
      if constexpr (Persistent) {
        // The previous tile's dK / dV TMA stores (issued by tid 0 of either consumer) read the same shared
        // memory: both must have read it before the first dS of this tile is written.
        if (it == 0 && tile_iter > 0 && args.dkdv_tma) {
          if (tid == 0) tma_store_wait_read();
          named_bar_sync(kBarDs, 256);
        }
      }
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = cw * 64 + warp_in_wg * 16 + g + 8 * (r & 1);
          const int col8 = 2 * kk + (r >> 1);  // q columns 8 col8 .. + 7: chunk col8 / 8, 16-byte piece col8 % 8
          const uint32_t addr =
              ds_s + (col8 / 8) * (kBlockN * 128) + row * 128 + (((col8 % 8) ^ (row % 8)) << 4) + 4 * t;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(ds_frag[kk][r]) : "memory");
        }
      }
      fence_proxy_async_smem();
      if constexpr (DqSplitKeys) {
        named_bar_sync(kBarDsOwn + cw, 128);
      } else {
        named_bar_sync(kBarDs, 256);
      }
    };

    // ---- dV_w += P^T dO, dK_w += dS^T Q (RS; B operands MN-major: K-dim = query rows); then (issue_dq) the dQ
    // part = dS K (SS: A = dS, M = 64 queries, K-dim = keys, MN-major from the dS^T tile; B = K, MN-major).
    // acc += frag (A, registers: kBlockM / 16 k-steps over query rows) x the MN-major tile at b_smem (B).
    auto mma_rs = [&](float (&acc)[kHeadDim / 2], uint32_t (&frag)[kBlockM / 16][4], uint32_t b_smem) {
      const uint64_t desc_b = make_desc_sw128(b_smem, kQChunkBytes, 1024);
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        Wgmma<kHeadDim, T>::template rs<1>(acc, frag[kk], desc_b + ((kk * 16 * 128) >> 4), 1);
      }
    };
    auto issue_dkdv = [&](int it) {
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        fence_regs(p_frag[kk]);
        fence_regs(ds_frag[kk]);
      }
      fence_regs(dv_reg);
      fence_regs(dk_reg);
      wgmma_fence();
      mma_rs(dv_reg, p_frag, do_stage(it));
      mma_rs(dk_reg, ds_frag, q_stage(it));
      wgmma_commit();
    };
    // (DkLast: dV and dK in groups of their own.)
    auto issue_rs_group = [&](float (&acc)[kHeadDim / 2], uint32_t (&frag)[kBlockM / 16][4], uint32_t b_smem) {
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) fence_regs(frag[kk]);
      fence_regs(acc);
      wgmma_fence();
      mma_rs(acc, frag, b_smem);
      wgmma_commit();
    };
    auto issue_dv = [&](int it) { issue_rs_group(dv_reg, p_frag, do_stage(it)); };
    auto issue_dk = [&](int it) { issue_rs_group(dk_reg, ds_frag, q_stage(it)); };
    auto issue_dq = [&](int it) {
      const uint32_t ds_s = smem + kOffDs + ds_pipe.stage() * kDsBytes;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) fence_regs(dq_reg[mt]);
      wgmma_fence();
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        // Queries [64 mt, 64 mt + 64): chunk mt of the dS^T tile.
        const uint32_t ds_mt = ds_s + mt * (kBlockN * 128);
        if constexpr (DqSplitKeys) {
          const uint64_t desc_ds = make_desc_sw128(ds_mt + cw * 64 * 128, kBlockN * 128, 1024);
          const uint64_t desc_k = make_desc_sw128(smem + kOffK + cw * 64 * 128, kKVChunkBytes, 1024);
#pragma unroll
          for (int kk = 0; kk < 64 / 16; ++kk) {
            Wgmma<kNDq, T>::template ss_t<1, 1>(dq_reg[mt], desc_ds + ((kk * 2048) >> 4),
                                                desc_k + ((kk * 2048) >> 4), kk > 0 ? 1 : 0);
          }
        } else {
          const uint64_t desc_ds = make_desc_sw128(ds_mt, kBlockN * 128, 1024);
          // Columns [cw kNDq, +kNDq) of K: chunk (cw kNDq) / 64, byte offset 2 (cw kNDq % 64) inside the row.
          const uint32_t k_cols = smem + kOffK + ((cw * kNDq) / 64) * kKVChunkBytes + ((cw * kNDq) % 64) * 2;
          const uint64_t desc_k = make_desc_sw128(k_cols, kKVChunkBytes, 1024);
#pragma unroll
          for (int kk = 0; kk < kBlockN / 16; ++kk) {
            Wgmma<kNDq, T>::template ss_t<1, 1>(dq_reg[mt], desc_ds + ((kk * 2048) >> 4),
                                                desc_k + ((kk * 2048) >> 4), kk > 0 ? 1 : 0);
          }
        }
      }
      wgmma_commit();
    };
    // After the dK / dV / dQ groups are complete: free the stage, keep the fragments alive until here.
    auto grads_done = [&](int it) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) fence_regs(dq_reg[mt]);
      fence_regs(dv_reg);
      fence_regs(dk_reg);
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        fence_regs(p_frag[kk]);
        fence_regs(ds_frag[kk]);
      }
      // Every lane's reads of this stage (lse / D by ld.shared, Q / dO by wgmma) are complete: order them
      // before lane 0's release-arrive, after which the producer overwrites the stage.
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty(bars, pipe.stage()));  // Q, dO, lse, D of this stage are consumed
    };
    // ---- bulk reduce-add of the staged dQ part of step it into dq_accum (one thread: tid 0).
    auto reduce_dq = [&](int it) {
      int hh, m_block;
      step_coords(args, mask, n_block, m_block_min, it, hh, m_block);
      const int head = head_k * p.h_h_k_ratio + hh;
      const uint32_t dq_s = smem + kOffDq + cw * kDqPartBytes;
      const int64_t row = ws_base(p, seq, head) + m_block * kBlockM;
      reduce_dq_part(p, row, cw, dq_s);
      tma_store_commit();
    };
    // ---- dQ part -> shared memory (register order) -> bulk reduce-add into dq_accum (by tid 0, or by the
    // writer warp).
    // This thread's dQ registers into a staging buffer, in register order (16-byte stores, conflict-free).
    auto stage_dq = [&](uint32_t dq_s) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int i = 0; i < kNDq / 8; ++i) {
          asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(dq_s + mt * kDqTileBytes +
                                                                          (i * 512 + tid * 4) * 4),
                       "f"(dq_reg[mt][4 * i]), "f"(dq_reg[mt][4 * i + 1]), "f"(dq_reg[mt][4 * i + 2]),
                       "f"(dq_reg[mt][4 * i + 3])
                       : "memory");
        }
      }
    };
    auto store_dq = [&](int it) {
      if constexpr (DqWriter) {
        // Writer mode: wait until the writer's reduce has read this buffer (kDqBufs steps ago), stage, signal.
        const int buf = dq_pipe.stage();
        const uint32_t dq_s = dq_stage_smem(smem, cw, buf);
        mbar_wait(bar_dq_empty(bars, cw, buf), dq_pipe.phase() ^ 1);
        stage_dq(dq_s);
        fence_proxy_async_smem();
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_dq_full(bars, cw, buf));
        return;
      }
      const uint32_t dq_s = smem + kOffDq + cw * kDqPartBytes;
      if (tid == 0) tma_store_wait_read();  // the previous reduce has read the staging buffer
      named_bar_sync(kBarDq + cw, 128);
      stage_dq(dq_s);
      fence_proxy_async_smem();
      named_bar_sync(kBarDq + cw, 128);
      if (tid == 0) reduce_dq(it);
    };
    auto wait_full = [&](int) { mbar_wait(bar_full(bars, pipe.stage()), pipe.phase()); };

    mbar_wait(bar_kv(bars), PipelineState<1>(tile_iter).phase());  // (the K / V buffer: one use per tile)
    if constexpr (IsLocal) {
      // Varlen: the K / V rows past seqlen_k of the sequence's last key block (zero_tile_rows); every consumer reads
      // all of K (dQ), so each zeroes both halves.
      if (seq.packed() && (n_block + 1) * kBlockN > seq.seqlen_k) {
        zero_tile_rows<kChunks, kKVChunkBytes, kBlockN>(smem + kOffK, seq.seqlen_k - n_block * kBlockN, tid);
        zero_tile_rows<kChunks, kKVChunkBytes, kBlockN>(smem + kOffV, seq.seqlen_k - n_block * kBlockN, tid);
        fence_proxy_async_smem();
        named_bar_sync(kBarDq + cw, 128);
      }
    }
    // Varlen: the rows of a sequence's last query block past seqlen_q are zeroed below (one register across the
    // loop: the row count, or a bound no block reaches when the batch is dense).
    const int q_tail = IsLocal && seq.packed() ? seq.seqlen_q : 0x7fffffff;
    (void)q_tail;
    for (int it = 0; it < n_iters; ++it) {
      pipe = first.advanced(it);
      ds_pipe = ds_first.advanced(it);
      dq_pipe = dq_first.advanced(it);
      wait_full(it);
      if constexpr (IsLocal) {
        // The Q / dO rows past seqlen_q (a NaN Q row would make P^T NaN in spite of lse_log2 = +inf, and 0 * NaN
        // dO poison dV).
        int hh, m_block;
        step_coords(args, mask, n_block, m_block_min, it, hh, m_block);
        if ((m_block + 1) * kBlockM > q_tail) {
          zero_tile_rows<kChunks, kQChunkBytes, kBlockM>(q_stage(it), q_tail - m_block * kBlockM, tid);
          zero_tile_rows<kChunks, kQChunkBytes, kBlockM>(do_stage(it), q_tail - m_block * kBlockM, tid);
          fence_proxy_async_smem();
          named_bar_sync(kBarDq + cw, 128);
        }
      }
      if constexpr (Dropout) keep_bits(it);
      issue_sdp(it);
      softmax(it);
      if constexpr (DkLast) {
        issue_dv(it);  // (runs while dS^T is stored)
        store_ds(it);
        issue_dq(it);
        issue_dk(it);
        wgmma_wait<1>();  // dV and dQ complete; dK runs on while dQ is staged
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) fence_regs(dq_reg[mt]);
        store_dq(it);
        wgmma_wait<0>();
        grads_done(it);
      } else {
        issue_dkdv(it);
        store_ds(it);
        issue_dq(it);
        wgmma_wait<0>();
        grads_done(it);
        store_dq(it);
      }
    }
    if constexpr (Persistent) {
      // Every wgmma of this tile (the only readers of K / V) is complete (grads_done waited for them).
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_kv_empty(bars));
    }

    // ---- epilogue: dV, dK (scaled) to global; rows < seqlen_k, cols < head_dim.
    // (Varlen: a key block crossing its sequence's end leaves as pairs, for both consumers alike; a TMA box would
    // write into the next sequence's rows.)
    if (IsLocal ? args.dkdv_tma && !(seq.packed() && (n_block + 1) * kBlockN > seq.seqlen_k) : args.dkdv_tma) {
      // Through shared memory (SW128, the layout of the maps' 64 x 64 boxes) and TMA stores issued by tid 0, which
      // leave in the background (the persistent loop goes on to the next tile; see store_ds). The staging area
      // (dS buffers, dQ staging) is free once both consumers' wgmmas are complete (each waited for its own in
      // grads_done; the dQ wgmmas read both halves of dS: the barrier) and the last dQ reduce-adds have read
      // their staging (consumer mode: tid 0's own bulk groups; writer mode: the buffers' empty barriers, waited
      // as for the next kDqBufs steps).
      if constexpr (DqWriter) {
#pragma unroll
        for (int b = 0; b < kDqBufs; ++b) {
          const PipelineState<kDqBufs> st = dq_first.advanced(n_iters + b);
          mbar_wait(bar_dq_empty(bars, cw, st.stage()), st.phase() ^ 1);
        }
      } else {
        if (tid == 0) tma_store_wait_read();
      }
      named_bar_sync(kBarDs, 256);
      const uint32_t st_k = smem + kOffDs + cw * kKVBytes, st_v = st_k + kKVBytes / 2;
      const float scale = p.scale_softmax;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp_in_wg * 16 + g + 8 * h;  // key row inside this consumer's 64 (row % 8 == g)
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          // Columns 8j + 2t, + 1: chunk j / 8, 16-byte piece j % 8 (swizzled with row % 8), byte 4t inside it.
          const uint32_t off = (j / 8) * (64 * 128) + row * 128 + (((j % 8) ^ g) << 4) + 4 * t;
          st_shared_dkdv_pair<T>(st_k, st_v, off, dk_reg[4 * j + 2 * h], dk_reg[4 * j + 2 * h + 1],
                                 dv_reg[4 * j + 2 * h], dv_reg[4 * j + 2 * h + 1], scale);
        }
      }
      fence_proxy_async_smem();
      named_bar_sync(kBarDq + cw, 128);
      if (tid == 0) {
        const int key_row = n_block * kBlockN + cw * 64;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          if constexpr (IsLocal) {
            tma_store_4d(&args.dk_map, st_k + c * (64 * 128), c * 64, seq.tma_k_row(key_row), head_k, seq.tma_batch());
            tma_store_4d(&args.dv_map, st_v + c * (64 * 128), c * 64, seq.tma_k_row(key_row), head_k, seq.tma_batch());
          } else {
            tma_store_4d(&args.dk_map, st_k + c * (64 * 128), c * 64, key_row, head_k, seq.b);
            tma_store_4d(&args.dv_map, st_v + c * (64 * 128), c * 64, key_row, head_k, seq.b);
          }
        }
        tma_store_commit();
      }
    } else {
      store_dkdv_pairs<T, kHeadDim>(p, dk_reg, dv_reg, key0, 0, t, seq, head_k);
    }
    // Not persistent: the CTA exits after this; the bulk operations of tid 0 (dQ reduce-adds in consumer mode,
    // the dK / dV stores) must have read their shared-memory sources first (the persistent loop waits at its end).
    if constexpr (!Persistent) {
      if (tid == 0) bulk_wait_all();
    }
  }

  __device__ static __forceinline__ void run(const BwdTmaArgs& args) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t bars = smem + kOffBar;
    const int warp = threadIdx.x / 32;
    int n_block, head_k, batch;  // one CTA per tile: this CTA's
    Scheduler::cta_tile(n_block, head_k, batch);
    if constexpr (!Persistent) {
      if (tile_past_end(args.params, n_block, batch)) return;  // varlen: the whole CTA, before any barrier
    }
    if (threadIdx.x == 0) {
      mbar_init(bar_kv(bars), 1);
      if constexpr (Persistent) mbar_init(bar_kv_empty(bars), 8);
      for (int s = 0; s < kStages; ++s) {
        mbar_init(bar_full(bars, s), 1);       // lane 0's expect_tx arrival (Q, dO, lse_log2, D bytes)
        mbar_init(bar_empty(bars, s), 8);      // one arrival per consumer warp
      }
      if constexpr (DqWriter) {
        for (int b = 0; b < kDqBufs; ++b) {
          mbar_init(bar_dq_full(bars, 0, b), 4);  // one arrival per warp of the consumer
          mbar_init(bar_dq_full(bars, 1, b), 4);
          mbar_init(bar_dq_empty(bars, 0, b), 1);  // the writer, after the reduce has read the buffer
          mbar_init(bar_dq_empty(bars, 1, b), 1);
        }
      }
      fence_mbar_init();
    }
    __syncthreads();
    if constexpr (Persistent) {
      // Each role loops over the tiles inside its own setmaxnreg branch (a loop shared by both roles would
      // make ptxas ignore setmaxnreg).
      const BwdParams& p = args.params;
      const Scheduler sched(p);
      // Pipeline steps of tile (nb, bb): the query-block range of its key block, for its batch entry.
      auto tile_steps = [&](int nb, int bb) {
        const Seq seq(p, bb);
        MaskT mask(seq.seqlen_q, seq.seqlen_k, p);
        return num_steps(args, mask, nb, mask.template m_block_min<kBlockM, kBlockN>(nb));
      };
      // Static order (non-causal).
      auto for_tiles = [&](auto&& body) {
        int g0 = 0, tile_iter = 0;
        if constexpr (IsLocal) {
          for (int tile = sched.first_tile(); tile < sched.num_tiles; tile = sched.next_static(tile)) {
            int nb, hk, bb;
            sched.coords(p, tile, nb, hk, bb);
            if (tile_past_end(p, nb, bb)) continue;  // varlen: a tile no role runs (nor counts)
            body(nb, hk, bb, g0, tile_iter);
            g0 += tile_steps(nb, bb);
            ++tile_iter;
          }
        } else {
          for (int tile = sched.first_tile(); tile < sched.num_tiles; tile = sched.next_static(tile), ++tile_iter) {
            int nb, hk, bb;
            sched.coords(p, tile, nb, hk, bb);
            body(nb, hk, bb, g0, tile_iter);
            g0 += tile_steps(nb, bb);
          }
        }
      };
      if (warp < 4) {
        setmaxnreg_dec<kProducerRegs>();
        if (warp == 0) {
          if constexpr (DynamicSched) {
            const int lane = threadIdx.x % 32;
            int g0 = 0, tile_iter = 0;
            for (int tile = sched.first_tile(); tile < sched.num_tiles; ++tile_iter) {
              int nb, hk, bb;
              sched.coords(p, tile, nb, hk, bb);
              producer(args, smem, bars, nb, hk, bb, g0, tile_iter, tile);
              g0 += tile_steps(nb, bb);
              tile = sched.next_dynamic(p, lane);
            }
            // No tile left: publish num_tiles once the consumers are done with the last tile's K / V.
            if (tile_iter > 0) mbar_wait(bar_kv_empty(bars), PipelineState<1>(tile_iter).advanced(-1).phase());
            if (lane == 0) {
              asm volatile("st.shared.s32 [%0], %1;\n" ::"r"(smem + kOffTile), "r"(sched.num_tiles) : "memory");
              mbar_arrive(bar_kv(bars));
            }
          } else {
            for_tiles([&](int nb, int hk, int bb, int g0, int ti) { producer(args, smem, bars, nb, hk, bb, g0, ti); });
          }
        }
      } else {
        setmaxnreg_inc<kConsumerRegs>();
        if constexpr (DynamicSched) {
          int g0 = 0;
          for (int tile_iter = 0;; ++tile_iter) {
            mbar_wait(bar_kv(bars), PipelineState<1>(tile_iter).phase());
            int tile;  // published by the producer (see DynamicSched)
            asm volatile("ld.shared.s32 %0, [%1];\n" : "=r"(tile) : "r"(smem + kOffTile) : "memory");
            if (tile >= sched.num_tiles) break;
            int nb, hk, bb;
            sched.coords(p, tile, nb, hk, bb);
            consumer(args, smem, bars, warp / 4 - 1, nb, hk, bb, g0, tile_iter);
            g0 += tile_steps(nb, bb);
          }
        } else {
          for_tiles([&](int nb, int hk, int bb, int g0, int ti) {
            consumer(args, smem, bars, warp / 4 - 1, nb, hk, bb, g0, ti);
          });
        }
        // The last dQ reduce-adds must have read their shared-memory source before the CTA exits.
        if (threadIdx.x % 128 == 0) bulk_wait_all();
      }
      return;
    }
    if (warp < 4) {
      setmaxnreg_dec<kProducerRegs>();
      if (warp == 0) {
        producer(args, smem, bars, n_block, head_k, batch);
      } else if (DqWriter && warp == 1) {
        dq_writer(args, smem, bars, n_block, head_k, batch);
      }
    } else {
      setmaxnreg_inc<kConsumerRegs>();
      consumer(args, smem, bars, warp / 4 - 1, n_block, head_k, batch);
    }
  }
};

}  // namespace sm90
}  // namespace flash_ext
