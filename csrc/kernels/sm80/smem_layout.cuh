// Shared-memory tile layout for the sm80 kernels (forward and backward): a [kRows x kCols] tile of
// 16-bit elements, stored as column blocks of kSubCols (64, or 32 when kCols is not a multiple of 64),
// each a row-major [kRows x kSubCols] array whose 16-byte chunks are XOR-swizzled by the row, so that
//   - ldmatrix (8 lanes give the addresses of 8 consecutive rows at the same column chunk) and
//   - cp.async (8 consecutive lanes write 8 consecutive chunks of one row)
// touch each of the 32 banks once per 128-byte phase (no bank conflicts).
//   kSubCols == 64: row = 128 bytes = 8 chunks, chunk c of row r lives at chunk c ^ (r % 8).
//   kSubCols == 32: row = 64 bytes = 4 chunks, two rows share one 128-byte line; chunk c of row r
//                   lives at chunk c ^ ((r / 2) % 4).
// Scope: SwizzledTile is pure index math (any thread); load_tile_async is executed by all kNThreads
// threads of the block together; ldsm_* helpers give one lane's address for a warp-collective ldmatrix.
#pragma once
#include <cstdint>
#include "../ptx.cuh"

namespace flash_ext {

template <int kRows_, int kCols_>
struct SwizzledTile {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static_assert(kCols % 32 == 0, "tile columns must be a multiple of 32");
  static_assert(kRows % 8 == 0, "tile rows must be a multiple of 8");
  static constexpr int kSubCols = (kCols % 64 == 0) ? 64 : 32;  // columns per swizzle atom
  static constexpr int kElems = kRows * kCols;                  // 16-bit elements in the tile

  // Element offset of the 16-byte chunk holding (row, col); col % 8 == 0.
  __device__ __forceinline__ static int chunk_offset(int row, int col) {
    const int sub = col / kSubCols;
    const int c = (col % kSubCols) / 8;
    const int sw = (kSubCols == 64) ? (row & 7) : ((row >> 1) & 3);
    return sub * (kRows * kSubCols) + row * kSubCols + ((c ^ sw) << 3);
  }
  // Element offset of (row, col) for any col.
  __device__ __forceinline__ static int offset(int row, int col) {
    return chunk_offset(row, col & ~7) + (col & 7);
  }
  // Byte offset of the chunk, for shared-space addresses (smem_u32(base) + byte_offset).
  __device__ __forceinline__ static uint32_t byte_offset(int row, int col) {
    return static_cast<uint32_t>(chunk_offset(row, col)) * 2u;
  }
};

// Global -> shared copy of a [Tile::kRows x Tile::kCols] tile with cp.async (16 bytes per copy).
// gmem: tile rows x head dim, row stride row_stride elements (16-byte aligned rows).
// Rows >= rows_valid and columns >= cols_valid (multiple of 8) are zero-filled and never read.
// Threads walk one swizzle atom (kSubCols columns) at a time: lane -> (row, chunk) with a row step
// that is a multiple of 8, so every thread keeps one swizzle pattern and all shared addresses are
// one base register plus immediates. A warp reads 4 rows x 128 B (or 8 x 64 B) of global memory.
// Caller commits the group (cp_async_commit).
template <typename Tile, int kNThreads, typename T>
__device__ __forceinline__ void load_tile_async(uint32_t tile_smem, const T* gmem, int64_t row_stride,
                                                int rows_valid, int cols_valid, int tid) {
  constexpr int kSubCols = Tile::kSubCols;
  constexpr int kSubChunks = kSubCols / 8;                // chunks per row of one atom
  constexpr int kRowStep = kNThreads / kSubChunks;        // rows covered by one pass of all threads
  static_assert(kNThreads % kSubChunks == 0 && kRowStep % 8 == 0, "loader thread mapping");
  constexpr int kIters = (Tile::kRows + kRowStep - 1) / kRowStep;
  const int row0 = tid / kSubChunks;
  const int chunk = tid % kSubChunks;
  const uint32_t dst0 = tile_smem + Tile::byte_offset(row0, chunk * 8);  // row0 % 8 fixes the swizzle
  const int64_t step = kRowStep * row_stride;
#pragma unroll
  for (int sub = 0; sub < Tile::kCols / kSubCols; ++sub) {
    const int col = sub * kSubCols + chunk * 8;
    // Walk the rows with a running pointer; the empty asm keeps the compiler from precomputing
    // i * step for every i (kIters 64-bit registers held across the whole main loop).
    const T* src = gmem + (row0 * row_stride + col);
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int row = row0 + i * kRowStep;
      if (Tile::kRows % kRowStep == 0 || row < Tile::kRows) {
        const bool pred = row < rows_valid && col < cols_valid;
        cp_async_16(dst0 + (sub * Tile::kRows * kSubCols + i * kRowStep * kSubCols) * 2, pred ? src : gmem, pred);
      }
      src += step;
      asm volatile("" : "+l"(src));
    }
  }
}

// Per-lane ldmatrix.x4 addresses into a swizzled tile, for 16x16 sub-tiles at (row_base + row0, col0)
// with row_base % 8 == 0 (run time, e.g. the warp's first row) and row0 % 8 == 0, col0 % 16 == 0
// (compile time after unrolling). The lane's swizzle is fixed by lane % 8, so the address is a base
// register plus an immediate: no per-call index math, nothing to hoist.
// RowsFirst (A operand of mma from a row-major [m x k] tile, or the .trans operand from a [k x n]
//   tile such as V): matrices (row0, col0), (row0+8, col0), (row0, col0+8), (row0+8, col0+8)
//   -> r[0..3] = a[0..3] of m16n8k16, or for .trans {r[0], r[1]} = b of n-tile col0 and
//   {r[2], r[3]} = b of n-tile col0+8.
// ColsFirst (B operand from an [n x k] tile, e.g. K for S = Q K^T): matrices (row0, col0),
//   (row0, col0+8), (row0+8, col0), (row0+8, col0+8) -> {r[0], r[1]} = b of n-tile row0,
//   {r[2], r[3]} = b of n-tile row0+8.
// XorBase == false: one base register per 16-column pair of a swizzle atom (kSubCols / 16 of them).
// XorBase == true: a single base register; the swizzle only touches address bits 4..6 (4..5 for
//   32-column atoms), which are zero in the tile base (128-byte aligned), in row * row_bytes and in
//   every immediate, so column pair j is reached by XOR-ing j << 5 into it: one LOP3 per ldmatrix,
//   kSubCols / 16 - 1 fewer registers live (used where the plain form spills).
template <typename Tile, bool RowsFirst, bool XorBase = false>
struct LdsmAddr {
  static constexpr int kSubCols = Tile::kSubCols;
  static constexpr int kBases = XorBase ? 1 : kSubCols / 16;
  uint32_t base[kBases];

  __device__ __forceinline__ LdsmAddr(uint32_t tile_smem, int row_base, int lane) {
    const int m = lane >> 3;
    const int r = row_base + (RowsFirst ? ((m & 1) << 3) : ((m >> 1) << 3)) + (lane & 7);
    const int c = RowsFirst ? ((m >> 1) << 3) : ((m & 1) << 3);
#pragma unroll
    for (int j = 0; j < kBases; ++j) base[j] = tile_smem + Tile::byte_offset(r, j * 16 + c);
  }
  // row0, col0: compile-time after unrolling.
  __device__ __forceinline__ uint32_t operator()(int row0, int col0) const {
    const uint32_t imm =
        static_cast<uint32_t>(((col0 / kSubCols) * Tile::kRows * kSubCols + row0 * kSubCols) * 2);
    if constexpr (XorBase) {
      return (base[0] ^ static_cast<uint32_t>(((col0 % kSubCols) / 16) << 5)) + imm;
    } else {
      return base[(col0 % kSubCols) / 16] + imm;
    }
  }
};

}  // namespace flash_ext
