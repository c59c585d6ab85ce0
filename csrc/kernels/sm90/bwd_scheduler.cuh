// Work order of the Hopper backward's main kernels (bwd_kernel.cuh, bwd_kernel_hd256.cuh): which
// (key block, kv head, batch entry) tiles a CTA runs, in which order. The launcher takes the grid from here and
// every role (producer, dQ writer, consumers) takes its tiles from here.
//
// Tiles are numbered key block fastest, then kv head, then batch entry. The deterministic mode relies on that
// order (bwd_kernel.cuh, dq_writer): a CTA waits only for lower key blocks of its (kv head, batch), which have
// lower tile numbers and so were launched no later.
//   - One CTA per tile (Persistent false): grid (key blocks, kv heads, batch), the tile is the CTA's block index.
//   - Persistent, static: min(tiles, SMs) CTAs; CTA c runs tiles c, c + gridDim.x, ... (equal tiles: non-causal).
//   - Persistent, dynamic (causal, where tiles shrink with the key block): CTA c starts with tile c and its
//     producer takes each next tile from params.tile_counter (zeroed by the preprocess kernel), so the tiles start
//     in their number order and a CTA that finishes early takes more; the producer hands each tile to the
//     consumers (bwd_kernel.cuh, kOffTile). A tile number >= num_tiles: no more work.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "../params.h"

namespace flash_ext {
namespace sm90 {

template <int kBlockN, bool Persistent, bool Dynamic>
struct BwdScheduler {
  static_assert(Persistent || !Dynamic, "the dynamic order is a persistent one");

  // ---- launcher
  static dim3 grid(const BwdParams& p) {
    dim3 g((p.seqlen_k + kBlockN - 1) / kBlockN, p.nheads_k, p.batch);
    if constexpr (Persistent) {
      const int64_t tiles = static_cast<int64_t>(g.x) * g.y * g.z;
      const int num_sm = p.num_sm > 0 ? p.num_sm : 132;
      g = dim3(static_cast<unsigned>(tiles < num_sm ? tiles : num_sm), 1, 1);
    }
    return g;
  }

  // ---- kernel
  // One CTA per tile: this CTA's tile.
  __device__ static __forceinline__ void cta_tile(int& n_block, int& head_k, int& batch) {
    n_block = blockIdx.x;
    head_k = blockIdx.y;
    batch = blockIdx.z;
  }

  // Persistent: the tile count and the coordinates of tile number `tile`.
  int n_blocks;   // key blocks per (kv head, batch entry)
  int num_tiles;  // n_blocks x nheads_k x batch
  __device__ __forceinline__ explicit BwdScheduler(const BwdParams& p)
      : n_blocks((p.seqlen_k + kBlockN - 1) / kBlockN), num_tiles(n_blocks * p.nheads_k * p.batch) {}
  __device__ __forceinline__ void coords(const BwdParams& p, int tile, int& n_block, int& head_k, int& batch) const {
    n_block = tile % n_blocks;
    const int rest = tile / n_blocks;
    head_k = rest % p.nheads_k;
    batch = rest / p.nheads_k;
  }
  __device__ static __forceinline__ int first_tile() { return blockIdx.x; }
  // Static order: the tile after `tile`.
  __device__ static __forceinline__ int next_static(int tile) { return tile + gridDim.x; }
  // Dynamic order (the producer warp, all lanes): the next tile from the counter.
  __device__ static __forceinline__ int next_dynamic(const BwdParams& p, int lane) {
    int next = 0;
    if (lane == 0) next = static_cast<int>(gridDim.x) + atomicAdd(p.tile_counter, 1);
    return __shfl_sync(0xffffffffu, next, 0);
  }
};

}  // namespace sm90
}  // namespace flash_ext
