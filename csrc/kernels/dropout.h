// Attention dropout's random numbers (docs/ARCHITECTURE.md, "Dropout"): which probabilities are kept is a pure
// function of (seed, offset) and the element's coordinates (batch, head, row, key), the same on the CPU and in every
// CUDA kernel, whatever their tiles, so the backward regenerates the forward's mask bit for bit and the families
// agree with each other and with the CPU. Plain C++ (host and device): no torch, no CUDA-only headers.
//
// Generator: Philox4x32-10 (a counter-based generator: 10 rounds of two 32x32 -> 64-bit multiplies and xors over a
// 128-bit counter under a 64-bit key). One call gives four 32-bit words; they cover the 2 x 2 elements
// (rows i, i + 8) x (keys j, j + 1) of a 16-row group, the pairs one thread of an mma / wgmma accumulator holds:
//   row i = 16 I + 8 u + r (u in {0, 1}, r < 8), key j = 2 J + v (v in {0, 1}),
//   n = ((b * nheads + h) * (8 ceil(seqlen_q / 16)) + 8 I + r) * ceil(seqlen_k / 2) + J      (64 bits),
//   counter = (n low, n high, offset low, offset high), key = (seed low, seed high), word 2 u + v.
// The element is kept when its word >= threshold = floor(p 2^32), so with probability 1 - p (to 2^-32), and a kept
// probability is scaled by 1 / (1 - p).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FLASH_EXT_HD __host__ __device__ __forceinline__
#else
#define FLASH_EXT_HD inline
#endif

namespace flash_ext {

struct Philox4 {
  uint32_t x[4];
};

FLASH_EXT_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
FLASH_EXT_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c.x[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, c.x[2], hi1, lo1);
    c = Philox4{{hi1 ^ c.x[1] ^ k0, lo1, hi0 ^ c.x[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The dropout of one call: seed / offset (the op's dropout_rng), the slice dims, the keep threshold.
struct DropoutRng {
  uint64_t seed = 0, offset = 0;
  int64_t nheads = 0, rows_per_slice = 0, col_pairs = 0;  // 8 ceil(seqlen_q / 16), ceil(seqlen_k / 2)
  uint32_t threshold = 0;                                 // floor(p 2^32)

  FLASH_EXT_HD DropoutRng() {}
  FLASH_EXT_HD DropoutRng(uint64_t seed_, uint64_t offset_, int64_t nheads_, int64_t seqlen_q, int64_t seqlen_k,
                          double p)
      : seed(seed_), offset(offset_), nheads(nheads_), rows_per_slice(8 * ((seqlen_q + 15) / 16)),
        col_pairs((seqlen_k + 1) / 2), threshold(threshold_of(p)) {}

  static FLASH_EXT_HD uint32_t threshold_of(double p) {
    const double t = p * 4294967296.0;  // p < 1: t < 2^32
    return t <= 0.0 ? 0u : static_cast<uint32_t>(t);
  }
  // The four words of the call covering rows (16 I + r, 16 I + 8 + r), keys (2 J, 2 J + 1) of (b, h).
  FLASH_EXT_HD Philox4 words(int64_t b, int64_t h, int64_t i16, int64_t r, int64_t j2) const {
    const uint64_t n = static_cast<uint64_t>(((b * nheads + h) * rows_per_slice + 8 * i16 + r) * col_pairs + j2);
    const Philox4 c{{static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), static_cast<uint32_t>(offset),
                     static_cast<uint32_t>(offset >> 32)}};
    return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  }
  // Whether element (b, h, i, j) is kept.
  FLASH_EXT_HD bool keep(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const Philox4 w = words(b, h, i / 16, i % 8, j / 2);
    return w.x[2 * ((i / 8) % 2) + (j % 2)] >= threshold;
  }
};

}  // namespace flash_ext
