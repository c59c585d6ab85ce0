// Work order of the Hopper forward (fwd_kernel.cuh): which (query block, head, batch entry) tiles a CTA runs, in
// which order. The launcher takes the grid from here (grid()) and every role (the producer warp, each consumer
// warpgroup) walks the same tiles through first_tile / next_tile / tile_coord, so a new order (varlen, split-KV) is
// a new scheduler type, not an edit of each role's loop.
//
// FwdStaticScheduler: a static order, one kernel for every launch shape (the shape is in FwdSchedArgs):
//   - One CTA per tile (grid = num_tiles): CTA b runs tile b (round 0 of the zig-zag below; round 1 is past the end).
//   - Persistent zig-zag rounds (grid < num_tiles): round r takes tiles [r * G, (r + 1) * G) (G = gridDim.x), CTA b
//     the tile r * G + b in even rounds and r * G + G - 1 - b in odd ones, so a CTA that got a long tile of a round
//     (the order is longest first inside a group) gets a short one in the next.
//   - Persistent causal pairs (paired): tiles 2q and 2q + 1 are the pair (num_m_blocks - 1 - k, k) of one (head,
//     batch), run back to back by one CTA, so every pair costs about num_m_blocks + 1 key blocks; CTA b takes pairs
//     b, b + G, ... With an odd num_m_blocks the middle block's pair has no second tile (next_tile skips it).
//   - Varlen batches (the general path's scheduler, kRuntimeOrder): one CTA per tile over the longest sequence's
//     query blocks, descending, so the blocks only long sequences have run first and the hardware's block scheduler
//     balances the ragged rest (tiles past a sequence's end cost a CTA that exits).
//   - L2 grouping (all of them): tiles are ordered in groups of group_hb (head, batch) pairs whose K / V fit in L2
//     together; inside a group the query block index (or the pair's k) is the slower index (descending for causal:
//     the longest tiles first) and (head, batch) the faster.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../params.h"

namespace flash_ext {
namespace sm90 {

// The work item: one kBlockM-row query block of one head of one batch entry.
struct FwdWork {
  int m_block, head, batch;
};

// The schedule's launch-time shape, part of the kernel's parameter (FwdTmaArgs::sched); set by grid().
struct FwdSchedArgs {
  int num_m_blocks;  // ceil(seqlen_q / kBlockM)
  int num_hb;        // nheads * batch
  int group_hb;      // (head, batch) pairs per L2 group, >= 1
  int num_tiles;     // num_m_blocks * num_hb; paired: 2 * num_pairs
  int paired;        // the causal pair order (persistent causal launches)
  // Query blocks in descending order (kRuntimeOrder schedulers: the general path's): set for varlen batches, where
  // the high query blocks exist only in the longest sequences, so that those run first.
  int descending;
};

// L2 groups of K / V for one CTA per tile: kL2GroupBytes of K and V per group. Where CTAs loop over tiles, one
// (head, batch) pair per group (all query blocks of a head before the next, so K / V blocks hit in L2; H200 d128
// non-causal 1k 516 vs 459 TFLOP/s); one CTA per causal tile: query blocks longest first and groups of this size
// (one pair was up to 8% slower there). NOTES.md (fourth session) has the numbers.
constexpr int64_t kL2GroupBytes = 32ll << 20;

template <int kBlockM, bool IsCausal, bool kRuntimeOrder = false>
struct FwdStaticScheduler {
  // ---- launcher
  static int num_m_blocks(const FwdParams& p) { return (p.seqlen_q + kBlockM - 1) / kBlockM; }
  // Fills `s` and returns the number of CTAs. max_ctas: the most CTAs the launch may use, 0 for one CTA per tile
  // (fewer than the tiles: persistent); paired 0 forces the zig-zag rounds where the causal pairs would run;
  // group_hb > 0 overrides the L2 grouping (harness comparisons).
  static int grid(FwdSchedArgs& s, const FwdParams& p, int head_dim, int max_ctas, int paired, int group_hb) {
    s.num_m_blocks = num_m_blocks(p);
    s.num_hb = p.nheads * p.batch;
    s.num_tiles = s.num_m_blocks * s.num_hb;
    const int limit = max_ctas > 0 ? max_ctas : s.num_tiles;
    // Query heads h_h_k_ratio apart share one K/V head: a group of G pairs reads G / ratio heads' K and V.
    const int64_t kv_bytes = static_cast<int64_t>(p.seqlen_k) * head_dim * 2 * 2;
    int64_t group = limit < s.num_tiles ? 1 : kL2GroupBytes * p.h_h_k_ratio / (kv_bytes > 0 ? kv_bytes : 1);
    if (group_hb > 0) group = group_hb;
    s.group_hb = static_cast<int>(group < 1 ? 1 : group > s.num_hb ? s.num_hb : group);
    s.paired = IsCausal && limit < s.num_tiles && paired != 0 ? 1 : 0;
    s.descending = kRuntimeOrder && p.cu_seqlens_q != nullptr ? 1 : 0;
    if (s.paired) s.num_tiles = 2 * ((s.num_m_blocks + 1) / 2) * s.num_hb;
    const int units = s.paired ? s.num_tiles / 2 : s.num_tiles;  // what one CTA takes per round
    return units < limit ? units : limit;
  }

  // ---- kernel (every role, the same sequence of tile numbers t; round: how many tiles this CTA ran before)
  __device__ static __forceinline__ int first_tile(const FwdSchedArgs& s) {
    return IsCausal && s.paired ? 2 * blockIdx.x : blockIdx.x;
  }
  __device__ static __forceinline__ bool valid(const FwdSchedArgs& s, int t) { return t < s.num_tiles; }
  __device__ static __forceinline__ int next_tile(const FwdSchedArgs& s, int t, int round) {
    const int g = gridDim.x, b = blockIdx.x;
    if (IsCausal && s.paired) {
      const int q = t >> 1;
      if (!(t & 1) && 2 * pair_k(s, q) + 1 != s.num_m_blocks) return t + 1;
      return 2 * (q + g);
    }
    return round * g + ((round & 1) ? g - 1 - b : b);
  }
  // Unit u of the L2-grouped order (kPairs: pairs of query blocks, (num_m_blocks + 1) / 2 per (head, batch) pair;
  // else query blocks): its slower index (idx: the query block index, or the pair's k) and its (head, batch) pair hb.
  struct GroupPos {
    int idx, hb;
  };
  template <bool kPairs>
  __device__ static __forceinline__ GroupPos group_split(const FwdSchedArgs& s, int u) {
    const int per_group = s.group_hb * (kPairs ? (s.num_m_blocks + 1) >> 1 : s.num_m_blocks);
    const int group = u / per_group;
    const int within = u - group * per_group;
    const int hb0 = group * s.group_hb;
    const int gsize = min(s.group_hb, s.num_hb - hb0);
    const int idx = within / gsize;
    return GroupPos{idx, hb0 + within - idx * gsize};
  }
  // Paired order: pair q -> its k (the pair is query blocks num_m_blocks - 1 - k and k).
  __device__ static __forceinline__ int pair_k(const FwdSchedArgs& s, int q) {
    return group_split<true>(s, q).idx;
  }
  __device__ static __forceinline__ FwdWork tile_coord(const FwdSchedArgs& s, const FwdParams& p, int t) {
    if (IsCausal && s.paired) {
      const GroupPos g = group_split<true>(s, t >> 1);
      FwdWork tile;
      tile.m_block = (t & 1) ? g.idx : s.num_m_blocks - 1 - g.idx;
      tile.head = g.hb % p.nheads;
      tile.batch = g.hb / p.nheads;
      return tile;
    }
    const GroupPos g = group_split<false>(s, t);
    FwdWork tile;
    tile.m_block = IsCausal || (kRuntimeOrder && s.descending) ? s.num_m_blocks - 1 - g.idx : g.idx;
    tile.head = g.hb % p.nheads;
    tile.batch = g.hb / p.nheads;
    return tile;
  }
};

}  // namespace sm90
}  // namespace flash_ext
