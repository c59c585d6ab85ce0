// Warpgroup MMA (wgmma, sm_90a) building blocks: shared-memory matrix descriptors for 128-byte-swizzled
// tiles, the fence / commit / wait protocol, and the m64nNk16 instructions (wgmma_ops.inc).
// Scope: every function here is warpgroup-collective (the 128 threads of 4 consecutive warps call it
// together) except make_desc_sw128, which is plain arithmetic.
//
// Shared-memory tile layout used throughout the sm90 kernels ("SW128 tile"): a rows x kCols tile of 16-bit
// elements is stored as kCols/64 column chunks, each chunk rows x 64 elements (128 bytes per row), rows
// contiguous, the 16-byte pieces of row r permuted by XOR with (r % 8) (TMA's CU_TENSOR_MAP_SWIZZLE_128B).
// Each chunk starts on a 1024-byte boundary, so the swizzle phase is the row index.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flash_ext {
namespace sm90 {

// Descriptor of an SW128 operand (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 62-63 layout
// (1 = 128-byte swizzle); base offset 0 because chunks are 1024-byte aligned.
// K-major operand (Q and K for S = Q K^T): 8-row groups 1024 bytes apart (SBO); LBO unused (K = 16 stays
//   inside one 128-byte row); stepping 16 along K adds 32 bytes to the start address.
// MN-major operand (V for O += P V, transposed by the instruction): 64-element MN chunks LBO bytes apart
//   (rows * 128), 8-row K groups 1024 bytes apart (SBO); stepping 16 along K adds 16 rows = 2048 bytes.
__device__ __forceinline__ uint64_t make_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4);
  desc |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32;
  desc |= static_cast<uint64_t>(1) << 62;
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed wgmma groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keep the compiler from moving accesses of accumulator / fragment registers across wgmma boundaries.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Wgmma<N, T>::ss<kTransB>(d, desc_a, desc_b, scale_d) and ::rs<kTransB>(d, a_reg, desc_b, scale_d):
// D (64 x N, fp32, d[N/2] per thread) = A (64 x 16) * B (16 x N) + (scale_d ? D : 0).
// Accumulator layout per warp w of the warpgroup, lane = 4g + t: for n8 block j,
// d[4j+0..1] = D[16w+g][8j+2t..+1], d[4j+2..3] = D[16w+g+8][8j+2t..+1] (mma.m16n8 C layout per block).
template <int N, typename T>
struct Wgmma;
#include "wgmma_ops.inc"

}  // namespace sm90
}  // namespace flash_ext
