// Pieces shared by the standalone harnesses in this folder (no torch): the CUDA error check, random normal
// inputs, strided (batch, seqlen, heads, head_dim) layouts, 16-bit conversions and the causal visibility rule.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CK(x)                                                                                             \
  do {                                                                                                    \
    cudaError_t e_ = (x);                                                                                 \
    if (e_ != cudaSuccess) {                                                                              \
      fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x);    \
      exit(1);                                                                                            \
    }                                                                                                     \
  } while (0)

// (batch, seqlen, heads, dim) strides in elements; bhsd: (batch, heads, seqlen, dim) memory viewed as
// (batch, seqlen, heads, dim); pad: extra elements per row (strided rows).
struct Layout { int64_t sb, ss, sh, numel; };
static Layout make_layout(int B, int S, int H, int D, bool bhsd, int pad) {
  const int64_t Dp = D + pad;
  Layout L;
  if (bhsd) { L.ss = Dp; L.sh = (int64_t)S * Dp; L.sb = (int64_t)H * S * Dp; }
  else { L.sh = Dp; L.ss = (int64_t)H * Dp; L.sb = (int64_t)S * H * Dp; }
  L.numel = (int64_t)B * S * H * Dp;
  return L;
}

template <typename T> __host__ __device__ __forceinline__ float to_f(T x);
template <> __host__ __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __host__ __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __host__ __device__ __forceinline__ T from_f(float x);
template <> __host__ __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Random normal fill (hash + Box-Muller): the same (seed, index) gives the same value.
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
template <typename T>
__global__ void fill_randn(T* p, int64_t n, uint64_t seed, float scale = 1.f) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t r = mix64(seed * 0x100000001B3ull + i);
    const float u1 = ((r >> 40) + 1) * (1.0f / 16777217.0f);
    const float u2 = ((r & 0xFFFFFF)) * (1.0f / 16777216.0f);
    p[i] = from_f<T>(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2) * scale);
  }
}

// Problem sizes of the backward harnesses; causal is aligned bottom-right.
struct Dims { int B, Sq, Sk, H, Hk, D; bool causal; float scale; };
__device__ __forceinline__ bool visible(const Dims& d, int i, int j) { return !d.causal || j <= i + d.Sk - d.Sq; }

// Reference forward in fp32 for the backward harnesses: one thread per (b, h, i); writes out (element type,
// strided) and lse (-inf for a row that sees no key).
template <typename T>
__global__ void ref_fwd(Dims dm, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv, T* out,
                        Layout lo, float* lse) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)dm.B * dm.H * dm.Sq) return;
  const int i = idx % dm.Sq, h = (idx / dm.Sq) % dm.H, b = idx / ((int64_t)dm.Sq * dm.H);
  const int hk = h / (dm.H / dm.Hk);
  const T* qi = q + b * lq.sb + i * lq.ss + h * lq.sh;
  float mx = -INFINITY;
  for (int j = 0; j < dm.Sk; ++j) {
    if (!visible(dm, i, j)) continue;
    const T* kj = k + b * lk.sb + j * lk.ss + hk * lk.sh;
    float s = 0.f;
    for (int d = 0; d < dm.D; ++d) s += to_f(qi[d]) * to_f(kj[d]);
    mx = fmaxf(mx, s * dm.scale);
  }
  float o[256];
  for (int d = 0; d < dm.D; ++d) o[d] = 0.f;
  float l = 0.f;
  if (mx != -INFINITY) {
    for (int j = 0; j < dm.Sk; ++j) {
      if (!visible(dm, i, j)) continue;
      const T* kj = k + b * lk.sb + j * lk.ss + hk * lk.sh;
      const T* vj = v + b * lv.sb + j * lv.ss + hk * lv.sh;
      float s = 0.f;
      for (int d = 0; d < dm.D; ++d) s += to_f(qi[d]) * to_f(kj[d]);
      const float p = expf(s * dm.scale - mx);
      l += p;
      for (int d = 0; d < dm.D; ++d) o[d] += p * to_f(vj[d]);
    }
  }
  T* oi = out + b * lo.sb + i * lo.ss + h * lo.sh;
  for (int d = 0; d < dm.D; ++d) oi[d] = from_f<T>(l > 0.f ? o[d] / l : 0.f);
  lse[idx] = l > 0.f ? mx + logf(l) : -INFINITY;
}
