// Standalone correctness + speed harness for the Hopper backward (csrc/kernels/sm90/bwd_*.cuh). No torch.
// Build (sm_90a only):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
//        tools/harness/sm90_bwd_harness.cu -o .devbin/sm90bwd/bwd_harness
// Run: bwd_harness [test] [bench] [small] [tiny] [det] [d256] [pers] [ord] [ord2]   (no argument: test and bench;
// small: two small cases, for compute-sanitizer; det: the deterministic mode only: its test lists, dq bitwise
// repeatability, and its speed against the default; d256: only the kHeadDim 256 kernel (bwd_kernel_hd256.cuh) in
// test / bench / small; pers, ord, ord2: the comparisons named at their variant tables). Log: $OUT/sm90_bwd.log.
// Inputs are fresh random normals; out / lse come from a naive fp32 reference forward (written in the element
// type, like a real forward). References: `ref` = the gradients in fp32 from those inputs; `pt` = the same
// computation with S, P, dP, dS rounded to the element type (a plain 16-bit PyTorch backward).
// Pass when, for dq, dk, dv each: max|ours - ref| <= 2 max|pt - ref| + atol, atol = 2 max|(ref + 0.3 - 0.3) - ref|
// in the element type, and no NaN / inf. Outputs poisoned (0xFF: NaN) before each call; dq_accum and
// dsoftmax_sum, lse_log2 poisoned too (the API hands them over uninitialized).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../../csrc/kernels/sm90/bwd_launch.cuh"
#include "../../csrc/kernels/sm90/bwd_launch_hd256.cuh"
#include "common.cuh"

using namespace flash_ext;


template bool flash_ext::run_bwd_sm90<64>(const BwdParams&, cudaStream_t);
template bool flash_ext::run_bwd_sm90<128>(const BwdParams&, cudaStream_t);
template <>
bool flash_ext::run_bwd_sm90<256>(const BwdParams& params, cudaStream_t stream) {
  return flash_ext::sm90::run_bwd_sm90_hd256(params, stream);
}

using LaunchFn = void (*)(const BwdParams&, cudaStream_t);
template <int D, int M, int S, bool SplitKeys, bool DkLast>
void run_cfg(const BwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.is_causal, IsCausal,
                [&] { sm90::launch_bwd_sm90<elem_type, D, M, S, IsCausal, SplitKeys, DkLast>(p, s); });
  });
}
// The default tiles with one CTA per tile (the causal default before the dynamic persistent schedule). Harness
// mode `pers`: tests of the defaults, then an interleaved bench of the two (causal).
template <int D>
void run_np(const BwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.is_causal, IsCausal, [&] {
      using Tile = sm90::BwdTile<D, IsCausal>;
      sm90::launch_bwd_sm90<elem_type, D, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys, Tile::DkLast,
                            false, false>(p, s);
    });
  });
}
// The default tiles (deterministic ones when params.deterministic) with the consumer's step order forced
// (DkLast or plain, see bwd_kernel.cuh). Harness mode `ord`: tests of each order, then an interleaved bench.
template <int D, bool DkLast>
void run_order(const BwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.is_causal, IsCausal, [&] {
      if (p.deterministic) {
        using Tile = sm90::BwdTileDet<D, IsCausal>;
        sm90::launch_bwd_sm90<elem_type, D, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys, DkLast,
                              true>(p, s);
      } else {
        using Tile = sm90::BwdTile<D, IsCausal>;
        sm90::launch_bwd_sm90<elem_type, D, Tile::kBlockM, Tile::kStages, IsCausal, Tile::DqSplitKeys, DkLast, false,
                              Tile::Persistent>(p, s);
      }
    });
  });
}
// Bench-only comparisons of the defaults (harness mode `ord2`, with a test pass of each): 3 Q / dO stages at d128;
// d128 causal one CTA per tile (no dynamic schedule); d64 non-causal in the DkLast order (20 bytes spilled).
template <int D, int Stages, bool DkLast, int Pers>
void run_alt(const BwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.is_causal, IsCausal, [&] {
      using Tile = sm90::BwdTile<D, IsCausal>;
      constexpr bool kPers = Pers < 0 ? Tile::Persistent : Pers > 0;
      sm90::launch_bwd_sm90<elem_type, D, Tile::kBlockM, Stages, IsCausal, Tile::DqSplitKeys, DkLast, false,
                            kPers>(p, s);
    });
  });
}
struct OrdVariant { const char* name; int d; LaunchFn fn; };
static const OrdVariant kAltVariants[] = {
    {"default", 128, nullptr},
    {"st3", 128, run_alt<128, 3, true, -1>},
    {"onepert", 128, run_alt<128, 2, true, 0>},
    {"default", 64, nullptr},
    {"dklast", 64, run_alt<64, 2, true, -1>},
};
static const OrdVariant kOrdVariants[] = {
    {"plain", 128, run_order<128, false>},
    {"dklast", 128, run_order<128, true>},
    {"plain", 64, run_order<64, false>},
    {"dklast", 64, run_order<64, true>},
};
static bool g_det = false;  // Problem::init sets params.deterministic from it
template <bool kStagger>
void run_cfg256(const BwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.is_causal, IsCausal, [&] { sm90::launch_bwd_hd256_sm90<elem_type, IsCausal, kStagger>(p, s); });
  });
}
// Timing only: the preprocess and dq-conversion kernels of the d256 backward alone.
static void run_pre_cvt256(const BwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    sm90::launch_bwd_preprocess<elem_type, 256>(p, s);
    sm90::launch_bwd_convert_dq<elem_type, 256, 128>(p, s);
  });
}
// Tile variants (kHeadDim, kBlockM, kStages, DqSplitKeys, DkLast); each runs the full test list of its head dim.
// d64m128 is the d64 non-causal default, d64m128sD the d64 causal default in the plain order (BwdTile in
// bwd_launch.cuh). d256: run_cfg256<Stagger> (bwd_launch_hd256.cuh); bench_only rows time only part of the
// backward.
struct Variant { const char* name; int d; LaunchFn fn; bool bench_only = false; };
static const Variant kVariants[] = {
    {"d64st3", 64, run_cfg<64, 64, 3, true, false>},
    {"d64splitD", 64, run_cfg<64, 64, 2, false, false>},
    {"d64m128", 64, run_cfg<64, 128, 2, true, false>},
    {"d64m128sD", 64, run_cfg<64, 128, 2, false, false>},
    {"d128splitK", 128, run_cfg<128, 64, 2, true, false>},
    {"d128st3", 128, run_cfg<128, 64, 3, false, false>},
    {"d256nostg", 256, run_cfg256<false>},
    {"precvt", 256, run_pre_cvt256, true},  // preprocess + convert only
};
static bool g_only256 = false;

// ---------------------------------------------------------------- helpers
template <typename T> __device__ __forceinline__ float rnd(float x) { return to_f<T>(from_f<T>(x)); }

// dq (compact fp32, b x h x i x d) and D; kPt: S, P, dP, dS rounded to T (a 16-bit computation).
template <typename T, bool kPt>
__global__ void ref_dq(Dims dm, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv, const T* out,
                       Layout lo, const T* dout, Layout ldo, const float* lse, float* dq_ref, float* dsum) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)dm.B * dm.H * dm.Sq) return;
  const int i = idx % dm.Sq, h = (idx / dm.Sq) % dm.H, b = idx / ((int64_t)dm.Sq * dm.H);
  const int hk = h / (dm.H / dm.Hk);
  const T* qi = q + b * lq.sb + i * lq.ss + h * lq.sh;
  const T* oi = out + b * lo.sb + i * lo.ss + h * lo.sh;
  const T* doi = dout + b * ldo.sb + i * ldo.ss + h * ldo.sh;
  float Dv = 0.f;
  for (int d = 0; d < dm.D; ++d) Dv += to_f(oi[d]) * to_f(doi[d]);
  if (!kPt) dsum[idx] = Dv;
  float acc[256];
  for (int d = 0; d < dm.D; ++d) acc[d] = 0.f;
  const float L = lse[idx];
  if (L != -INFINITY) {
    for (int j = 0; j < dm.Sk; ++j) {
      if (!visible(dm, i, j)) continue;
      const T* kj = k + b * lk.sb + j * lk.ss + hk * lk.sh;
      const T* vj = v + b * lv.sb + j * lv.ss + hk * lv.sh;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < dm.D; ++d) { s += to_f(qi[d]) * to_f(kj[d]); dp += to_f(doi[d]) * to_f(vj[d]); }
      if (kPt) { s = rnd<T>(s); dp = rnd<T>(dp); }
      float p = expf(s * dm.scale - L);
      if (kPt) p = rnd<T>(p);
      float ds = p * (dp - Dv);
      if (kPt) ds = rnd<T>(ds);
      for (int d = 0; d < dm.D; ++d) acc[d] += ds * to_f(kj[d]);
    }
  }
  for (int d = 0; d < dm.D; ++d) dq_ref[idx * dm.D + d] = kPt ? rnd<T>(acc[d] * dm.scale) : acc[d] * dm.scale;
}

template <typename T, bool kPt>
__global__ void ref_dkdv(Dims dm, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv,
                         const T* dout, Layout ldo, const float* lse, const float* dsum, float* dk_ref, float* dv_ref) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)dm.B * dm.Hk * dm.Sk) return;
  const int j = idx % dm.Sk, hk = (idx / dm.Sk) % dm.Hk, b = idx / ((int64_t)dm.Sk * dm.Hk);
  const int ratio = dm.H / dm.Hk;
  const T* kj = k + b * lk.sb + j * lk.ss + hk * lk.sh;
  const T* vj = v + b * lv.sb + j * lv.ss + hk * lv.sh;
  float adk[256], adv[256];
  for (int d = 0; d < dm.D; ++d) adk[d] = adv[d] = 0.f;
  for (int h = hk * ratio; h < (hk + 1) * ratio; ++h) {
    for (int i = 0; i < dm.Sq; ++i) {
      if (!visible(dm, i, j)) continue;
      const int64_t ri = ((int64_t)b * dm.H + h) * dm.Sq + i;
      const float L = lse[ri];
      if (L == -INFINITY) continue;
      const T* qi = q + b * lq.sb + i * lq.ss + h * lq.sh;
      const T* doi = dout + b * ldo.sb + i * ldo.ss + h * ldo.sh;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < dm.D; ++d) { s += to_f(qi[d]) * to_f(kj[d]); dp += to_f(doi[d]) * to_f(vj[d]); }
      if (kPt) { s = rnd<T>(s); dp = rnd<T>(dp); }
      float p = expf(s * dm.scale - L);
      if (kPt) p = rnd<T>(p);
      float ds = p * (dp - dsum[ri]);
      if (kPt) ds = rnd<T>(ds);
      for (int d = 0; d < dm.D; ++d) { adv[d] += p * to_f(doi[d]); adk[d] += ds * to_f(qi[d]); }
    }
  }
  for (int d = 0; d < dm.D; ++d) {
    dk_ref[idx * dm.D + d] = kPt ? rnd<T>(adk[d] * dm.scale) : adk[d] * dm.scale;
    dv_ref[idx * dm.D + d] = kPt ? rnd<T>(adv[d]) : adv[d];
  }
}

// stats: [0] max|ours-ref|, [1] max|pt-ref|, [2] max|(ref+0.3-0.3)-ref| in T, [3] max|ref|, [4] NaN/inf count
template <typename T>
__global__ void compare(const T* ours, Layout lo, const float* ref, const float* pt, int B, int S, int H, int D,
                        unsigned* stats) {
  const int64_t n = (int64_t)B * H * S * D;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int d = idx % D, s = (idx / D) % S, h = (idx / ((int64_t)D * S)) % H, b = idx / ((int64_t)D * S * H);
    const float o = to_f(ours[b * lo.sb + s * lo.ss + h * lo.sh + d]);
    const float r = ref[idx];
    if (!isfinite(o)) { atomicAdd(stats + 4, 1u); continue; }
    atomicMax(stats + 0, __float_as_uint(fabsf(o - r)));
    atomicMax(stats + 1, __float_as_uint(fabsf(pt[idx] - r)));
    atomicMax(stats + 2, __float_as_uint(fabsf(rnd<T>(rnd<T>(r + 0.3f) - 0.3f) - r)));
    atomicMax(stats + 3, __float_as_uint(fabsf(r)));
  }
}

template <typename T>
struct Problem {
  Dims dm;
  int inst;
  Layout lq, lk, lv, lo, ldo, ldq, ldk, ldv;
  T *q, *k, *v, *out, *dout, *dq, *dk, *dv;
  float *lse, *dq_accum, *dsum_ws, *lse2_ws;
  int* dq_sem;
  BwdParams params;
  LaunchFn runner = nullptr;

  void init(int B, int Sq, int Sk, int H, int Hk, int D, bool causal, bool bhsd, int do_pad, uint64_t seed) {
    dm = Dims{B, Sq, Sk, H, Hk, D, causal, 1.f / sqrtf((float)D)};
    inst = D <= 64 ? 64 : D <= 128 ? 128 : 256;
    lq = make_layout(B, Sq, H, D, bhsd, 0);
    lk = make_layout(B, Sk, Hk, D, bhsd, 0);
    lv = make_layout(B, Sk, Hk, D, false, 0);
    lo = make_layout(B, Sq, H, D, false, 0);
    ldo = make_layout(B, Sq, H, D, bhsd, do_pad);
    ldq = make_layout(B, Sq, H, D, false, 0);
    ldk = make_layout(B, Sk, Hk, D, bhsd, 0);
    ldv = make_layout(B, Sk, Hk, D, false, 8);
    CK(cudaMalloc(&q, lq.numel * sizeof(T)));
    CK(cudaMalloc(&k, lk.numel * sizeof(T)));
    CK(cudaMalloc(&v, lv.numel * sizeof(T)));
    CK(cudaMalloc(&out, lo.numel * sizeof(T)));
    CK(cudaMalloc(&dout, ldo.numel * sizeof(T)));
    CK(cudaMalloc(&dq, ldq.numel * sizeof(T)));
    CK(cudaMalloc(&dk, ldk.numel * sizeof(T)));
    CK(cudaMalloc(&dv, ldv.numel * sizeof(T)));
    CK(cudaMalloc(&lse, (int64_t)B * H * Sq * sizeof(float)));
    const int sqr = (Sq + 127) / 128 * 128;
    CK(cudaMalloc(&dq_accum, (int64_t)B * H * sqr * inst * sizeof(float)));
    CK(cudaMalloc(&dsum_ws, (int64_t)B * H * sqr * sizeof(float)));
    CK(cudaMalloc(&lse2_ws, ((int64_t)B * H * sqr + 4) * sizeof(float)));  // + the tile counter (as the API)
    CK(cudaMalloc(&dq_sem, (int64_t)B * H * (sqr / 64) * sizeof(int)));
    fill_randn<T><<<1024, 256>>>(q, lq.numel, seed * 7 + 1);
    fill_randn<T><<<1024, 256>>>(k, lk.numel, seed * 7 + 2);
    fill_randn<T><<<1024, 256>>>(v, lv.numel, seed * 7 + 3);
    fill_randn<T><<<1024, 256>>>(dout, ldo.numel, seed * 7 + 4);
    CK(cudaGetLastError());
    BwdParams& p = params;
    memset(&p, 0, sizeof(p));
    p.q = q; p.k = k; p.v = v; p.out = out; p.lse = lse; p.dout = dout; p.dq = dq; p.dk = dk; p.dv = dv;
    p.q_batch_stride = lq.sb; p.q_row_stride = lq.ss; p.q_head_stride = lq.sh;
    p.k_batch_stride = lk.sb; p.k_row_stride = lk.ss; p.k_head_stride = lk.sh;
    p.v_batch_stride = lv.sb; p.v_row_stride = lv.ss; p.v_head_stride = lv.sh;
    p.o_batch_stride = lo.sb; p.o_row_stride = lo.ss; p.o_head_stride = lo.sh;
    p.do_batch_stride = ldo.sb; p.do_row_stride = ldo.ss; p.do_head_stride = ldo.sh;
    p.dq_batch_stride = ldq.sb; p.dq_row_stride = ldq.ss; p.dq_head_stride = ldq.sh;
    p.dk_batch_stride = ldk.sb; p.dk_row_stride = ldk.ss; p.dk_head_stride = ldk.sh;
    p.dv_batch_stride = ldv.sb; p.dv_row_stride = ldv.ss; p.dv_head_stride = ldv.sh;
    p.batch = B; p.seqlen_q = Sq; p.seqlen_k = Sk; p.nheads = H; p.nheads_k = Hk;
    p.head_dim = D; p.h_h_k_ratio = H / Hk;
    p.scale_softmax = dm.scale; p.scale_softmax_log2 = dm.scale * 1.4426950408889634f;
    p.is_bf16 = std::is_same<T, __nv_bfloat16>::value; p.is_causal = causal;
    p.dq_accum = dq_accum; p.dsoftmax_sum = dsum_ws; p.lse_log2 = lse2_ws;
    p.tile_counter = reinterpret_cast<int*>(lse2_ws + (int64_t)B * H * sqr);
    p.seqlen_q_rounded = sqr; p.head_dim_rounded = inst;
    p.deterministic = g_det;
    p.dq_semaphore = dq_sem;  // head dims <= 128 need it in both modes (fused dq conversion); d256 ignores it
    int dev; CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&p.num_sm, cudaDevAttrMultiProcessorCount, dev));
  }
  void poison() {
    CK(cudaMemset(dq, 0xFF, ldq.numel * sizeof(T)));
    CK(cudaMemset(dk, 0xFF, ldk.numel * sizeof(T)));
    CK(cudaMemset(dv, 0xFF, ldv.numel * sizeof(T)));
    const int64_t sqr = params.seqlen_q_rounded;
    CK(cudaMemset(dq_accum, 0xFF, (int64_t)dm.B * dm.H * sqr * inst * sizeof(float)));
    CK(cudaMemset(dsum_ws, 0xFF, (int64_t)dm.B * dm.H * sqr * sizeof(float)));
    CK(cudaMemset(lse2_ws, 0xFF, ((int64_t)dm.B * dm.H * sqr + 4) * sizeof(float)));  // counter -1: zeroed by the kernels
    CK(cudaMemset(dq_sem, 0xFF, (int64_t)dm.B * dm.H * (sqr / 64) * sizeof(int)));  // -1: the kernels zero it
  }
  void run(cudaStream_t st = 0) {
    if (runner) { runner(params, st); return; }
    if (inst == 64) run_bwd_sm90<64>(params, st);
    else if (inst == 128) run_bwd_sm90<128>(params, st);
    else run_bwd_sm90<256>(params, st);
  }
  void free_all() {
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(out); cudaFree(dout); cudaFree(dq); cudaFree(dk);
    cudaFree(dv); cudaFree(lse); cudaFree(dq_accum); cudaFree(dsum_ws); cudaFree(lse2_ws); cudaFree(dq_sem);
  }
};

static int g_fail = 0, g_pass = 0;
static FILE* g_log = nullptr;
static void logline(const char* s) { printf("%s\n", s); if (g_log) { fprintf(g_log, "%s\n", s); fflush(g_log); } }

template <typename T>
static void test_one(int B, int Sq, int Sk, int H, int Hk, int D, bool causal, bool bhsd, int do_pad, uint64_t seed,
                     LaunchFn runner = nullptr, const char* vname = "default") {
  Problem<T> pb;
  pb.init(B, Sq, Sk, H, Hk, D, causal, bhsd, do_pad, seed);
  pb.runner = runner;
  if (!sm90_bwd_supported(pb.params)) {
    char line[256];
    snprintf(line, sizeof(line), "SKIP unsupported b%d sq%d sk%d h%d/%d d%d", B, Sq, Sk, H, Hk, D);
    logline(line); ++g_fail; pb.free_all(); return;
  }
  const int64_t nq = (int64_t)B * H * Sq, nk = (int64_t)B * Hk * Sk;
  ref_fwd<T><<<(nq + 127) / 128, 128>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.out, pb.lo, pb.lse);
  float *dq_ref, *dk_ref, *dv_ref, *dq_pt, *dk_pt, *dv_pt, *dsum;
  CK(cudaMalloc(&dq_ref, nq * D * 4)); CK(cudaMalloc(&dk_ref, nk * D * 4)); CK(cudaMalloc(&dv_ref, nk * D * 4));
  CK(cudaMalloc(&dq_pt, nq * D * 4)); CK(cudaMalloc(&dk_pt, nk * D * 4)); CK(cudaMalloc(&dv_pt, nk * D * 4));
  CK(cudaMalloc(&dsum, nq * 4));
  ref_dq<T, false><<<(nq + 127) / 128, 128>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.out, pb.lo, pb.dout,
                                              pb.ldo, pb.lse, dq_ref, dsum);
  ref_dq<T, true><<<(nq + 127) / 128, 128>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.out, pb.lo, pb.dout,
                                             pb.ldo, pb.lse, dq_pt, dsum);
  ref_dkdv<T, false><<<(nk + 63) / 64, 64>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.dout, pb.ldo, pb.lse,
                                             dsum, dk_ref, dv_ref);
  ref_dkdv<T, true><<<(nk + 63) / 64, 64>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.dout, pb.ldo, pb.lse,
                                            dsum, dk_pt, dv_pt);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  pb.poison();
  pb.run();
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  unsigned* stats;
  CK(cudaMalloc(&stats, 15 * 4));
  CK(cudaMemset(stats, 0, 15 * 4));
  compare<T><<<512, 256>>>(pb.dq, pb.ldq, dq_ref, dq_pt, B, Sq, H, D, stats + 0);
  compare<T><<<512, 256>>>(pb.dk, pb.ldk, dk_ref, dk_pt, B, Sk, Hk, D, stats + 5);
  compare<T><<<512, 256>>>(pb.dv, pb.ldv, dv_ref, dv_pt, B, Sk, Hk, D, stats + 10);
  CK(cudaGetLastError());
  unsigned hs[15];
  CK(cudaMemcpy(hs, stats, sizeof(hs), cudaMemcpyDeviceToHost));
  bool ok = true;
  char parts[3][96];
  const char* nm[3] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    float e[4];
    memcpy(e, hs + 5 * i, 16);
    const unsigned nan = hs[5 * i + 4];
    const bool o = nan == 0 && e[0] <= 2.f * e[1] + 2.f * e[2];
    ok &= o;
    snprintf(parts[i], sizeof(parts[i]), "%s %.2e/pt %.2e/at %.2e%s", nm[i], e[0], e[1], 2.f * e[2],
             nan ? " NaN!" : "");
  }
  char line[512];
  snprintf(line, sizeof(line), "%s %-9s %s b%d sq%-5d sk%-5d h%d/%d d%-3d %s%s%s | %s | %s | %s", ok ? "PASS" : "FAIL",
           vname, std::is_same<T, __nv_bfloat16>::value ? "bf16" : "fp16", B, Sq, Sk, H, Hk, D,
           causal ? "causal" : "full  ", bhsd ? " bhsd" : "", do_pad ? " dopad" : "", parts[0], parts[1], parts[2]);
  logline(line);
  if (ok) ++g_pass; else ++g_fail;
  cudaFree(stats); cudaFree(dq_ref); cudaFree(dk_ref); cudaFree(dv_ref); cudaFree(dq_pt); cudaFree(dk_pt);
  cudaFree(dv_pt); cudaFree(dsum);
  pb.free_all();
}

// The test list for head dim D (64: dims 64, 48; 128: dims 128, 80, 120), with `runner` (nullptr: run_bwd_sm90).
static void run_tests_d(int Dinst, LaunchFn runner, const char* vname, uint64_t seed) {
  using bf = __nv_bfloat16;
  using hf = __half;
  const int D = Dinst;
  //        B   Sq    Sk   H Hk  D  causal bhsd pad
  for (bool c : {false, true}) {
    test_one<bf>(1, 1, 1, 2, 1, D, c, false, 0, ++seed, runner, vname);
    test_one<bf>(2, 17, 17, 4, 4, D, c, false, 0, ++seed, runner, vname);
    test_one<bf>(2, 113, 203, 4, 2, D, c, false, 0, ++seed, runner, vname);
    test_one<bf>(2, 203, 113, 4, 2, D, c, true, 8, ++seed, runner, vname);
    test_one<bf>(1, 1023, 1025, 4, 1, D, c, false, 8, ++seed, runner, vname);
    test_one<bf>(1, 1025, 1023, 6, 2, D, c, true, 0, ++seed, runner, vname);
    test_one<bf>(1, 1, 1025, 2, 1, D, c, false, 0, ++seed, runner, vname);
    test_one<bf>(1, 1025, 17, 2, 2, D, c, false, 0, ++seed, runner, vname);
    test_one<bf>(3, 256, 256, 4, 2, D, c, false, 0, ++seed, runner, vname);
    // More tiles than SMs (288): the persistent loop's later tiles (K / V reload, dK / dV staging reuse).
    if (Dinst != 256) test_one<bf>(4, 1025, 1025, 16, 8, D, c, false, 0, ++seed, runner, vname);
  }
  if (Dinst == 256) {
    test_one<bf>(2, 203, 1023, 6, 3, 160, true, false, 0, ++seed, runner, vname);
    test_one<bf>(2, 1023, 203, 6, 3, 200, false, true, 8, ++seed, runner, vname);
    test_one<bf>(1, 1025, 113, 4, 4, 200, true, false, 0, ++seed, runner, vname);
    test_one<bf>(1, 113, 1025, 4, 1, 160, false, false, 0, ++seed, runner, vname);
    test_one<hf>(2, 1025, 1025, 4, 2, 256, true, false, 0, ++seed, runner, vname);
    test_one<hf>(1, 1023, 203, 4, 1, 256, false, true, 8, ++seed, runner, vname);
    test_one<hf>(2, 113, 203, 4, 2, 160, true, false, 0, ++seed, runner, vname);
    test_one<hf>(1, 17, 1, 2, 2, 200, false, false, 0, ++seed, runner, vname);
  } else if (Dinst == 128) {
    test_one<bf>(2, 203, 1023, 6, 3, 80, true, false, 0, ++seed, runner, vname);
    test_one<bf>(2, 1023, 203, 6, 3, 80, false, true, 8, ++seed, runner, vname);
    test_one<bf>(1, 1025, 113, 4, 4, 120, true, false, 0, ++seed, runner, vname);
    test_one<hf>(2, 1025, 1025, 4, 2, 128, true, false, 0, ++seed, runner, vname);
  } else {
    test_one<bf>(1, 113, 1025, 4, 2, 48, true, true, 0, ++seed, runner, vname);
    test_one<bf>(1, 1023, 1023, 2, 1, 48, true, false, 0, ++seed, runner, vname);
    test_one<hf>(1, 203, 113, 4, 1, 64, true, true, 8, ++seed, runner, vname);
    test_one<hf>(2, 113, 203, 4, 2, 64, false, false, 0, ++seed, runner, vname);
  }
}

static void run_small() {  // for compute-sanitizer
  test_one<__nv_bfloat16>(2, 113, 203, 4, 2, 200, true, false, 0, 7);
  test_one<__half>(1, 203, 113, 4, 1, 256, false, true, 8, 8);
  if (g_only256) return;
  test_one<__nv_bfloat16>(2, 113, 203, 4, 2, 64, true, false, 0, 5);
  test_one<__nv_bfloat16>(1, 203, 239, 4, 2, 120, true, true, 8, 6);
}

static void run_tiny() {  // one small case (tools/sanitize_cases.py's first), for compute-sanitizer
  test_one<__nv_bfloat16>(1, 17, 203, 2, 1, 64, false, false, 0, 5);
}

static void run_tests() {
  if (!g_only256) {
    run_tests_d(64, nullptr, "default", 1000);
    run_tests_d(128, nullptr, "default", 2000);
  }
  run_tests_d(256, nullptr, "default", 2500);
  uint64_t seed = 3000;
  using bf = __nv_bfloat16;
  for (const Variant& v : kVariants)
    if ((!g_only256 || v.d == 256) && !v.bench_only) run_tests_d(v.d, v.fn, v.name, seed += 100);
  // Repeatability: dk / dv have no atomics and must be bitwise equal run to run.
  for (int D : {128, 256}) {
    if (g_only256 && D != 256) continue;
    Problem<bf> pb;
    pb.init(4, 1025, 1025, 8, 2, D, true, false, 0, 77);
    const int64_t nq = (int64_t)4 * 8 * 1025;
    ref_fwd<bf><<<(nq + 127) / 128, 128>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.out, pb.lo, pb.lse);
    std::vector<char> a(pb.ldk.numel * 2), b(a.size());
    int diff = 0;
    for (int r = 0; r < 5; ++r) {
      pb.poison(); pb.run(); CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(r == 0 ? a.data() : b.data(), pb.dk, a.size(), cudaMemcpyDeviceToHost));
      if (r > 0) diff += memcmp(a.data(), b.data(), a.size()) != 0;
    }
    char line[128];
    snprintf(line, sizeof(line), "%s repeat d%d dk bitwise over 5 runs: %d differ", diff ? "FAIL" : "PASS", D, diff);
    logline(line);
    if (diff) ++g_fail; else ++g_pass;
    pb.free_all();
  }
}

// Bitwise repeatability of dq (and dk) over `reps` runs with the same inputs; returns the number of runs whose
// dq differs from the first (logged). With deterministic off, dq is expected to differ (float atomics order).
static int repeat_dq(int B, int S, int H, int Hk, int D, bool causal, int reps, LaunchFn runner, const char* vname) {
  using bf = __nv_bfloat16;
  Problem<bf> pb;
  pb.init(B, S, S, H, Hk, D, causal, false, 0, 77);
  pb.runner = runner;
  const int64_t nq = (int64_t)B * H * S;
  ref_fwd<bf><<<(nq + 127) / 128, 128>>>(pb.dm, pb.q, pb.lq, pb.k, pb.lk, pb.v, pb.lv, pb.out, pb.lo, pb.lse);
  std::vector<char> a(pb.ldq.numel * 2), b(a.size()), ka(pb.ldk.numel * 2), kb(ka.size());
  int diff = 0, kdiff = 0;
  for (int r = 0; r < reps; ++r) {
    pb.poison(); pb.run(); CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(r == 0 ? a.data() : b.data(), pb.dq, a.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(r == 0 ? ka.data() : kb.data(), pb.dk, ka.size(), cudaMemcpyDeviceToHost));
    if (r > 0) diff += memcmp(a.data(), b.data(), a.size()) != 0;
    if (r > 0) kdiff += memcmp(ka.data(), kb.data(), ka.size()) != 0;
  }
  char line[256];
  snprintf(line, sizeof(line), "%s %-9s %s repeat b%d s%d h%d/%d d%d %s: dq differs in %d of %d runs, dk in %d",
           (g_det && (diff || kdiff)) || kdiff ? "FAIL" : "PASS", vname, g_det ? "det" : "atomic", B, S, H, Hk, D,
           causal ? "causal" : "full", diff, reps - 1, kdiff);
  logline(line);
  if ((g_det && diff) || kdiff) ++g_fail; else ++g_pass;
  pb.free_all();
  return diff;
}

struct BenchRow { std::string v; int d; bool causal; int s; float ms, tflops; };
template <typename T>
static BenchRow bench_one(int D, int S, bool causal, LaunchFn runner = nullptr, const char* vname = "default") {
  const int B = 16384 / S, H = 2048 / D;
  Problem<T> pb;
  pb.init(B, S, S, H, H, D, causal, false, 0, 7);
  pb.runner = runner;
  fill_randn<T><<<1024, 256>>>(pb.out, pb.lo.numel, 11);
  {
    std::vector<float> l((size_t)B * H * S, 8.f);  // stand-in lse (timing does not depend on values)
    CK(cudaMemcpy(pb.lse, l.data(), l.size() * 4, cudaMemcpyHostToDevice));
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) pb.run();
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < 15; ++i) {
    CK(cudaEventRecord(e0)); pb.run(); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
    float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); t.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  const float ms = t[t.size() / 2];
  const double flops = 2.5 * 4.0 * B * H * (double)S * S * D / (causal ? 2.0 : 1.0);
  BenchRow r{vname, D, causal, S, ms, (float)(flops / (ms * 1e-3) / 1e12)};
  char line[256];
  snprintf(line, sizeof(line), "BENCH %s%-9s bf16 d%-3d %-6s s%-5d b%-2d h%-2d %8.3f ms %6.1f TFLOP/s (min %.3f)",
           g_det ? "det:" : "", vname, D,
           causal ? "causal" : "full", S, B, H, ms, r.tflops, t[0]);
  logline(line);
  cudaEventDestroy(e0); cudaEventDestroy(e1);
  pb.free_all();
  return r;
}

// Interleaved timing of variants (fn nullptr: the default kernels) over the shapes: variants in order in even
// passes and reversed in odd ones, so drift during the run hits them alike. skip(v, causal): leave v out there.
static void bench_abba(std::vector<BenchRow>& rows, const std::vector<OrdVariant>& vars, std::initializer_list<int> dims,
                       std::initializer_list<bool> causals, std::initializer_list<int> seqs,
                       bool (*skip)(const OrdVariant&, bool) = nullptr) {
  const int n = (int)vars.size();
  for (int pass = 0; pass < 2; ++pass)
    for (int D : dims)
      for (bool c : causals)
        for (int S : seqs)
          for (int k = 0; k < n; ++k) {
            const OrdVariant& v = vars[pass == 0 ? k : n - 1 - k];
            if (v.d == D && !(skip && skip(v, c))) rows.push_back(bench_one<__nv_bfloat16>(D, S, c, v.fn, v.name));
          }
}

int main(int argc, char** argv) {
  bool do_test = argc < 2, do_bench = argc < 2, do_small = false, do_det = false;
  bool do_pers = false, do_ord = false, do_ord2 = false, do_tiny = false;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "det")) do_det = true;
    if (!strcmp(argv[i], "pers")) do_pers = true;  // causal: dynamic persistent vs one CTA per tile
    if (!strcmp(argv[i], "ord")) do_ord = true;    // the consumer's step order (DkLast or plain)
    if (!strcmp(argv[i], "ord2")) do_ord2 = true;  // stages / persistence / d64 order against the defaults
    if (!strcmp(argv[i], "small")) do_small = true;
    if (!strcmp(argv[i], "tiny")) do_tiny = true;
    if (!strcmp(argv[i], "test")) do_test = true;
    if (!strcmp(argv[i], "bench")) do_bench = true;
    if (!strcmp(argv[i], "d256")) g_only256 = true;
  }
  const char* outdir = getenv("OUT");
  const std::string logpath = std::string(outdir ? outdir : ".") + "/sm90_bwd.log";
  g_log = fopen(logpath.c_str(), "a");
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  if (do_small) run_small();
  if (do_tiny) run_tiny();
  if (do_test) run_tests();
  std::vector<BenchRow> rows;
  if (do_pers) {
    uint64_t seed = 12000;
    run_tests_d(64, nullptr, "default", seed += 100);
    run_tests_d(128, nullptr, "default", seed += 100);
    // dk bitwise over repeated runs with the dynamic schedule (a tile's dK / dV do not depend on the CTA).
    repeat_dq(4, 1025, 8, 2, 128, true, 4, nullptr, "default");
    repeat_dq(4, 1025, 8, 2, 64, true, 4, nullptr, "default");
    // (d128 only: d64 causal is one CTA per tile by default, so both rows would be the same kernel)
    bench_abba(rows, {{"dynpers", 128, nullptr}, {"onepertile", 128, run_np<128>}}, {128}, {true},
               {1024, 2048, 4096, 16384});
  }
  if (do_ord) {
    uint64_t seed = 13000;
    for (int det = 0; det < 2; ++det) {
      g_det = det;
      for (const auto& v : kOrdVariants) run_tests_d(v.d, v.fn, v.name, seed += 100);
    }
    g_det = true;
    for (const auto& v : kOrdVariants) repeat_dq(4, 1025, 8, 2, v.d, true, 4, v.fn, v.name);
    g_det = false;
    const std::vector<OrdVariant> ord(std::begin(kOrdVariants), std::end(kOrdVariants));
    bench_abba(rows, ord, {128, 64}, {false, true}, {1024, 2048, 4096, 16384});
    g_det = true;
    bench_abba(rows, ord, {128, 64}, {false, true}, {1024, 4096});
    g_det = false;
  }
  if (do_ord2) {
    uint64_t seed = 14000;
    for (const auto& v : kAltVariants)
      if (v.fn) run_tests_d(v.d, v.fn, v.name, seed += 100);
    bench_abba(rows, std::vector<OrdVariant>(std::begin(kAltVariants), std::end(kAltVariants)), {128, 64}, {false, true},
               {1024, 2048, 4096, 16384}, [](const OrdVariant& v, bool c) {
                 return (!strcmp(v.name, "onepert") && !c) || (!strcmp(v.name, "dklast") && c);
               });
  }
  if (do_det) {
    // Tests: the deterministic defaults over the full list of their head dim.
    g_det = true;
    run_tests_d(64, nullptr, "det", 5000);
    run_tests_d(128, nullptr, "det", 6000);
    run_tests_d(256, nullptr, "det", 6500);
    // dq bitwise over 10 runs: the defaults; GQA; causal with seqlen_q != seqlen_k is in the lists.
    repeat_dq(4, 1025, 8, 2, 128, true, 10, nullptr, "det");
    repeat_dq(4, 1025, 8, 2, 128, false, 10, nullptr, "det");
    repeat_dq(4, 1025, 8, 2, 64, true, 10, nullptr, "det");
    repeat_dq(4, 1025, 8, 2, 64, false, 10, nullptr, "det");
    repeat_dq(4, 1025, 8, 2, 256, true, 10, nullptr, "det");
    repeat_dq(4, 1025, 8, 2, 200, false, 10, nullptr, "det");
    g_det = false;  // the same with the default (atomic) mode: dq is expected to differ (shows the check bites)
    repeat_dq(4, 1025, 8, 2, 128, true, 10, nullptr, "default");
    repeat_dq(4, 1025, 8, 2, 64, false, 10, nullptr, "default");
    repeat_dq(4, 1025, 8, 2, 256, true, 10, nullptr, "default");
    // Speed: default vs deterministic, interleaved per shape.
    for (int D : {64, 128, 256})
      for (bool c : {false, true})
        for (int S : {1024, 4096, 16384}) {
          g_det = false;
          rows.push_back(bench_one<__nv_bfloat16>(D, S, c, nullptr, "default"));
          g_det = true;
          rows.push_back(bench_one<__nv_bfloat16>(D, S, c, nullptr, "det"));
          g_det = false;
        }
  }
  if (do_bench) {
    const std::vector<int> dims = g_only256 ? std::vector<int>{256} : std::vector<int>{64, 128, 256};
    for (int D : dims)
      for (bool c : {false, true})
        for (int S : {1024, 4096, 16384}) rows.push_back(bench_one<__nv_bfloat16>(D, S, c));
    for (const Variant& v : kVariants) {
      if (g_only256 && v.d != 256) continue;
      for (bool c : {false, true})
        for (int S : {1024, 4096, 16384}) rows.push_back(bench_one<__nv_bfloat16>(v.d, S, c, v.fn, v.name));
    }
    // The defaults again (the spread between the two passes shows the machine's noise).
    for (int D : dims)
      for (bool c : {false, true})
        for (int S : {1024, 4096, 16384}) rows.push_back(bench_one<__nv_bfloat16>(D, S, c, nullptr, "default2"));
  }
  char line[256];
  snprintf(line, sizeof(line), "==== tests: %d pass, %d fail ====", g_pass, g_fail);
  logline(line);
  for (auto& r : rows) {
    snprintf(line, sizeof(line), "%-9s d%-3d %-6s s%-5d %7.1f TFLOP/s (%.3f ms)", r.v.c_str(), r.d,
             r.causal ? "causal" : "full", r.s, r.tflops, r.ms);
    logline(line);
  }
  if (g_log) fclose(g_log);
  return g_fail ? 1 : 0;
}
