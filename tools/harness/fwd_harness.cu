// Standalone correctness test + benchmark of the sm80-family forward kernel (no torch).
// Build (sm_90a for the H200; add -gencode=arch=compute_80,code=sm_80 for Ampere):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o fwd_harness tools/harness/fwd_harness.cu
// Run: ./fwd_harness [--quick] [--no-bench] [--no-variants] [--no-correctness] [--d128 (tuning: variant
//   correctness + d128 bf16 timings only)]
//   correctness: every case against an fp32 GPU reference (one block per query row) and against the
//   same computation rounded like a plain bf16/fp16 PyTorch run (S, P and O rounded to the dtype);
//   pass when max|ours - ref| <= 2 * max|plain - ref| + atol (docs/ARCHITECTURE.md, Correctness), lse
//   likewise; outputs poisoned with 0xFF (NaN) first, elements outside [rows < seqlen_q, cols < head_dim]
//   must stay so.
//   bench: cudaEvent median of many reps after warm-up, batch*seqlen = 16384, hidden 2048.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/kernels/sm80/fwd_launch.cuh"
#include "common.cuh"

using namespace flash_ext;


// ------------------------------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float round_t(float x) { return float(T(x)); }

// ------------------------------------------------------------------------------------------------
// Reference: one block (128 threads) per (query row, head, batch). ref_*: fp32 math on the dtype
// inputs; lp_*: the plain dtype computation (S, scaled S, P and O rounded to T like torch does).
// ref_out / lp_out: batch x nheads x seqlen_q x head_dim (contiguous); *_lse: batch x nheads x seqlen_q.
template <typename T>
__global__ void ref_kernel(FwdParams p, float* ref_out, float* ref_lse, float* lp_out, float* lp_lse) {
  extern __shared__ float sh[];
  float* s = sh;                // seqlen_k scaled scores (fp32)
  float* slp = sh + p.seqlen_k; // seqlen_k scaled scores rounded like the dtype computation
  __shared__ float red[2][32];
  const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int hk = h / p.h_h_k_ratio;
  const T* q = (const T*)p.q + b * p.q_batch_stride + h * p.q_head_stride + row * p.q_row_stride;
  const T* k = (const T*)p.k + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = (const T*)p.v + b * p.v_batch_stride + hk * p.v_head_stride;
  const int d = p.head_dim;
  int limit = p.seqlen_k;
  if (p.is_causal) limit = min(limit, row + 1 + p.seqlen_k - p.seqlen_q);
  for (int j = tid; j < p.seqlen_k; j += nt) {
    if (j < limit) {
      float acc = 0.f;
      for (int c = 0; c < d; ++c) acc += float(q[c]) * float(k[j * p.k_row_stride + c]);
      s[j] = acc * p.scale_softmax;
      slp[j] = round_t<T>(round_t<T>(acc) * p.scale_softmax);
    } else {
      s[j] = -INFINITY;
      slp[j] = -INFINITY;
    }
  }
  __syncthreads();
  auto block_reduce = [&](float x, float y, bool is_max, float& ox, float& oy) {
    for (int o = 16; o > 0; o >>= 1) {
      const float xo = __shfl_xor_sync(0xffffffffu, x, o), yo = __shfl_xor_sync(0xffffffffu, y, o);
      x = is_max ? fmaxf(x, xo) : x + xo;
      y = is_max ? fmaxf(y, yo) : y + yo;
    }
    if ((tid & 31) == 0) { red[0][tid >> 5] = x; red[1][tid >> 5] = y; }
    __syncthreads();
    x = red[0][0]; y = red[1][0];
    for (int w = 1; w < nt / 32; ++w) {
      x = is_max ? fmaxf(x, red[0][w]) : x + red[0][w];
      y = is_max ? fmaxf(y, red[1][w]) : y + red[1][w];
    }
    __syncthreads();
    ox = x; oy = y;
  };
  float m = -INFINITY, mlp = -INFINITY;
  for (int j = tid; j < p.seqlen_k; j += nt) { m = fmaxf(m, s[j]); mlp = fmaxf(mlp, slp[j]); }
  block_reduce(m, mlp, true, m, mlp);
  float l = 0.f, llp = 0.f;
  if (limit > 0)
    for (int j = tid; j < p.seqlen_k; j += nt) { l += expf(s[j] - m); llp += expf(slp[j] - mlp); }
  block_reduce(l, llp, false, l, llp);
  const int64_t orow = ((int64_t(b) * p.nheads + h) * p.seqlen_q + row);
  if (tid == 0) {
    ref_lse[orow] = limit > 0 ? m + logf(l) : -INFINITY;
    lp_lse[orow] = limit > 0 ? mlp + logf(llp) : -INFINITY;
  }
  for (int c = tid; c < d; c += nt) {
    float acc = 0.f, acclp = 0.f;
    if (limit > 0) {
      for (int j = 0; j < limit; ++j) {
        const float vv = float(v[j * p.v_row_stride + c]);
        acc += expf(s[j] - m) * vv;
        acclp += round_t<T>(expf(slp[j] - mlp) / llp) * vv;
      }
      acc /= l;
    }
    ref_out[orow * d + c] = acc;
    lp_out[orow * d + c] = round_t<T>(acclp);
  }
}

// ------------------------------------------------------------------------------------------------
struct Tensor {
  void* ptr = nullptr;
  int64_t numel = 0, batch_stride = 0, row_stride = 0, head_stride = 0;
};
// layout 0: batch x seqlen x heads x dalloc (BSHD); layout 1: batch x heads x seqlen x dalloc (BHSD).
static Tensor make_tensor(int b, int s, int h, int dalloc, int layout) {
  Tensor t;
  t.numel = int64_t(b) * s * h * dalloc;
  if (layout == 0) { t.head_stride = dalloc; t.row_stride = int64_t(h) * dalloc; t.batch_stride = int64_t(s) * h * dalloc; }
  else { t.row_stride = dalloc; t.head_stride = int64_t(s) * dalloc; t.batch_stride = int64_t(s) * h * dalloc; }
  CK(cudaMalloc(&t.ptr, std::max<int64_t>(t.numel, 1) * 2));
  return t;
}

static uint64_t g_seed = 0x1234567ull;
template <typename T>
static void randn(Tensor& t, float scale) {
  fill_randn<T><<<1024, 256>>>((T*)t.ptr, t.numel, g_seed++ * 0x9E3779B97F4A7C15ull + 17, scale);
  CK(cudaGetLastError());
}

static int instantiated_dim(int d) {
  for (int D : kSm80FwdHeadDims) if (d <= D) return D;
  return -1;
}
typedef bool (*FwdFn)(const FwdParams&, cudaStream_t);
static FwdFn dispatch_fn(int d) {
  switch (instantiated_dim(d)) {
    case 32: return &run_fwd_sm80<32>;
    case 64: return &run_fwd_sm80<64>;
    case 96: return &run_fwd_sm80<96>;
    case 128: return &run_fwd_sm80<128>;
    case 160: return &run_fwd_sm80<160>;
    case 192: return &run_fwd_sm80<192>;
    case 224: return &run_fwd_sm80<224>;
    case 256: return &run_fwd_sm80<256>;
  }
  return nullptr;
}

// Alternative tile configs, bf16 only, for tuning.
// kXq / kXkv: XOR-ed ldmatrix bases; kFlags: kFwdRolledQK | kFwdLazyRescale.
template <int kHeadDim, int kBlockM, int kBlockN, int kNWarps, bool kXq = false, bool kXkv = false,
          int kFlags = 0>
bool variant_fwd(const FwdParams& p, cudaStream_t st) {  // an FwdFn
  BOOL_SWITCH(p.is_causal, IsCausal, [&] {
    launch_fwd_sm80<__nv_bfloat16, kHeadDim, kBlockM, kBlockN, kNWarps, IsCausal, kXq, kXkv, kFlags>(p, st);
  });
  return true;
}
struct Variant { const char* name; int d; FwdFn fn; };

struct Case {
  int b, sq, sk, h, hk, d, dalloc;
  bool causal;
  int layout;
  bool bf16;
  float in_scale;
};

static FwdParams make_params(const Case& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                             float* lse) {
  FwdParams p;
  memset(&p, 0, sizeof(p));
  p.q = q.ptr; p.k = k.ptr; p.v = v.ptr; p.out = o.ptr; p.lse = lse;
  p.q_batch_stride = q.batch_stride; p.q_row_stride = q.row_stride; p.q_head_stride = q.head_stride;
  p.k_batch_stride = k.batch_stride; p.k_row_stride = k.row_stride; p.k_head_stride = k.head_stride;
  p.v_batch_stride = v.batch_stride; p.v_row_stride = v.row_stride; p.v_head_stride = v.head_stride;
  p.o_batch_stride = o.batch_stride; p.o_row_stride = o.row_stride; p.o_head_stride = o.head_stride;
  p.batch = c.b; p.seqlen_q = c.sq; p.seqlen_k = c.sk; p.nheads = c.h; p.nheads_k = c.hk;
  p.head_dim = c.d; p.h_h_k_ratio = c.h / c.hk;
  p.scale_softmax = 1.f / sqrtf(float(c.d));
  p.scale_softmax_log2 = p.scale_softmax * 1.4426950408889634f;
  p.is_bf16 = c.bf16; p.is_causal = c.causal;
  int dev; CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&p.num_sm, cudaDevAttrMultiProcessorCount, dev));
  return p;
}

static float h2f(uint16_t x, bool bf16) {
  if (bf16) { uint32_t u = uint32_t(x) << 16; float f; memcpy(&f, &u, 4); return f; }
  __half_raw r; r.x = x; return __half2float(__half(r));
}
static float round_host(float x, bool bf16) {
  if (bf16) return __bfloat162float(__float2bfloat16(x));
  return __half2float(__float2half(x));
}

struct CaseResult { bool pass; double err_o, err_o_lp, atol, err_lse, err_lse_lp; long bad_untouched, nonfinite; };

static CaseResult run_case(const Case& c, FwdFn fn) {
  Tensor q = make_tensor(c.b, c.sq, c.h, c.dalloc, c.layout);
  Tensor k = make_tensor(c.b, c.sk, c.hk, c.dalloc, c.layout);
  Tensor v = make_tensor(c.b, c.sk, c.hk, c.dalloc, c.layout);
  Tensor o = make_tensor(c.b, c.sq, c.h, c.dalloc, c.layout);
  if (c.bf16) { randn<__nv_bfloat16>(q, c.in_scale); randn<__nv_bfloat16>(k, c.in_scale); randn<__nv_bfloat16>(v, c.in_scale); }
  else { randn<__half>(q, c.in_scale); randn<__half>(k, c.in_scale); randn<__half>(v, c.in_scale); }
  const int64_t nrows = int64_t(c.b) * c.h * c.sq;
  float *lse, *ref_out, *ref_lse, *lp_out, *lp_lse;
  CK(cudaMalloc(&lse, nrows * 4));
  CK(cudaMalloc(&ref_out, nrows * c.d * 4)); CK(cudaMalloc(&lp_out, nrows * c.d * 4));
  CK(cudaMalloc(&ref_lse, nrows * 4)); CK(cudaMalloc(&lp_lse, nrows * 4));
  CK(cudaMemset(o.ptr, 0xFF, o.numel * 2));
  CK(cudaMemset(lse, 0xFF, nrows * 4));
  FwdParams p = make_params(c, q, k, v, o, lse);
  fn(p, 0);
  CK(cudaGetLastError());
  const size_t ref_smem = size_t(2) * c.sk * 4;
  if (c.bf16) {
    CK(cudaFuncSetAttribute(ref_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    ref_kernel<__nv_bfloat16><<<dim3(c.sq, c.h, c.b), 128, ref_smem>>>(p, ref_out, ref_lse, lp_out, lp_lse);
  } else {
    CK(cudaFuncSetAttribute(ref_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    ref_kernel<__half><<<dim3(c.sq, c.h, c.b), 128, ref_smem>>>(p, ref_out, ref_lse, lp_out, lp_lse);
  }
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> ho(o.numel);
  std::vector<float> hl(nrows), hro(nrows * c.d), hrl(nrows), hpo(nrows * c.d), hpl(nrows);
  CK(cudaMemcpy(ho.data(), o.ptr, o.numel * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hl.data(), lse, nrows * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hro.data(), ref_out, nrows * c.d * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hrl.data(), ref_lse, nrows * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hpo.data(), lp_out, nrows * c.d * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hpl.data(), lp_lse, nrows * 4, cudaMemcpyDeviceToHost));
  CaseResult r{true, 0, 0, 0, 0, 0, 0, 0};
  std::vector<char> touched(o.numel, 0);
  bool empty_ok = true;
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.h; ++h)
      for (int i = 0; i < c.sq; ++i) {
        const int64_t orow = (int64_t(b) * c.h + h) * c.sq + i;
        const float rl = hrl[orow], ol = hl[orow];
        if (std::isinf(rl)) {
          if (!(std::isinf(ol) && ol < 0)) empty_ok = false;
        } else if (!std::isfinite(ol)) {
          r.nonfinite++;
        } else {
          r.err_lse = std::max(r.err_lse, (double)fabsf(ol - rl));
          r.err_lse_lp = std::max(r.err_lse_lp, (double)fabsf(hpl[orow] - rl));
        }
        for (int d = 0; d < c.d; ++d) {
          const int64_t idx = b * o.batch_stride + i * o.row_stride + h * o.head_stride + d;
          touched[idx] = 1;
          const float ov = h2f(ho[idx], c.bf16);
          const float rv = hro[orow * c.d + d];
          if (!std::isfinite(ov)) { r.nonfinite++; continue; }
          if (std::isinf(rl) && ov != 0.f) empty_ok = false;
          r.err_o = std::max(r.err_o, (double)fabsf(ov - rv));
          r.err_o_lp = std::max(r.err_o_lp, (double)fabsf(hpo[orow * c.d + d] - rv));
          r.atol = std::max(r.atol, (double)fabsf(round_host(round_host(rv + 0.3f, c.bf16) - 0.3f, c.bf16) - rv));
        }
      }
  for (int64_t i = 0; i < o.numel; ++i)
    if (!touched[i] && ho[i] != 0xFFFF) r.bad_untouched++;
  r.atol *= 2;
  const double tol_o = 2 * r.err_o_lp + r.atol + 1e-6;
  const double tol_lse = 2 * r.err_lse_lp + 1e-3;
  r.pass = empty_ok && r.nonfinite == 0 && r.bad_untouched == 0 && r.err_o <= tol_o && r.err_lse <= tol_lse;
  CK(cudaFree(q.ptr)); CK(cudaFree(k.ptr)); CK(cudaFree(v.ptr)); CK(cudaFree(o.ptr));
  CK(cudaFree(lse)); CK(cudaFree(ref_out)); CK(cudaFree(lp_out)); CK(cudaFree(ref_lse)); CK(cudaFree(lp_lse));
  return r;
}

static bool report_case(const Case& c, const char* impl, const CaseResult& r) {
  printf("%-6s %s b=%d sq=%5d sk=%5d h=%2d hk=%2d d=%3d dalloc=%3d causal=%d layout=%s x%.0f | err_o %.2e (plain %.2e, atol %.1e) "
         "err_lse %.2e (plain %.2e) nonfinite %ld untouched-bad %ld  %s\n",
         impl, c.bf16 ? "bf16" : "fp16", c.b, c.sq, c.sk, c.h, c.hk, c.d, c.dalloc, int(c.causal),
         c.layout ? "BHSD" : "BSHD", c.in_scale, r.err_o, r.err_o_lp, r.atol, r.err_lse, r.err_lse_lp, r.nonfinite,
         r.bad_untouched, r.pass ? "PASS" : "FAIL");
  return r.pass;
}

// ------------------------------------------------------------------------------------------------
struct BenchRow { std::string impl; bool bf16; int d; bool causal; int seqlen, batch, nheads; float ms, tflops; };

static BenchRow bench(const char* impl, FwdFn fn, int d, bool causal, int seqlen, bool bf16) {
  const int batch = 16384 / seqlen, nheads = 2048 / d;
  Case c{batch, seqlen, seqlen, nheads, nheads, d, d, causal, 0, bf16, 1.f};
  Tensor q = make_tensor(batch, seqlen, nheads, d, 0), k = make_tensor(batch, seqlen, nheads, d, 0),
         v = make_tensor(batch, seqlen, nheads, d, 0), o = make_tensor(batch, seqlen, nheads, d, 0);
  if (bf16) { randn<__nv_bfloat16>(q, 1.f); randn<__nv_bfloat16>(k, 1.f); randn<__nv_bfloat16>(v, 1.f); }
  else { randn<__half>(q, 1.f); randn<__half>(k, 1.f); randn<__half>(v, 1.f); }
  float* lse; CK(cudaMalloc(&lse, int64_t(batch) * nheads * seqlen * 4));
  FwdParams p = make_params(c, q, k, v, o, lse);
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int i = 0; i < 5; ++i) fn(p, 0);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  // Aim for ~30 reps or ~150 ms.
  CK(cudaEventRecord(e0)); fn(p, 0); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
  float one; CK(cudaEventElapsedTime(&one, e0, e1));
  const int reps = std::max(10, std::min(100, int(150.f / std::max(one, 1e-3f))));
  std::vector<float> t(reps);
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(e0)); fn(p, 0); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&t[i], e0, e1));
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  const float ms = t[reps / 2];
  const double flops = 4.0 * batch * nheads * double(seqlen) * seqlen * d / (causal ? 2 : 1);
  CK(cudaFree(q.ptr)); CK(cudaFree(k.ptr)); CK(cudaFree(v.ptr)); CK(cudaFree(o.ptr)); CK(cudaFree(lse));
  CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
  return BenchRow{impl, bf16, d, causal, seqlen, batch, nheads, ms, float(flops / (ms * 1e-3) / 1e12)};
}

int main(int argc, char** argv) {
  bool quick = false, do_bench = true, do_variants = true, do_correct = true, only_d128 = false;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--quick")) quick = true;
    if (!strcmp(argv[i], "--no-bench")) do_bench = false;
    if (!strcmp(argv[i], "--no-variants")) do_variants = false;
    if (!strcmp(argv[i], "--no-correctness")) do_correct = false;
    // --d128: tuning run: no main correctness, variant correctness + d128 bf16 timings only.
    if (!strcmp(argv[i], "--d128")) only_d128 = true;
  }
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
  printf("device %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);

  // ---- correctness through the public entry point (run_fwd_sm80<kHeadDim>) ----
  std::vector<Case> cases;
  const int dims[] = {32, 40, 64, 80, 96, 128, 160, 192, 224, 256};
  const int seqs_full[][2] = {{1, 1}, {17, 17}, {113, 203}, {203, 113}, {239, 239}, {1, 239}, {239, 1},
                              {1023, 1025}, {1025, 1023}, {128, 128}, {64, 300}};
  const int seqs_quick[][2] = {{17, 17}, {113, 203}, {203, 113}};
  const int hh[][2] = {{4, 4}, {4, 2}, {6, 1}};
  int n = 0;
  for (int d : dims) {
    const int nseq = quick ? 3 : 11;
    for (int si = 0; si < nseq; ++si)
      for (int causal = 0; causal < 2; ++causal, ++n) {
        const int sq = quick ? seqs_quick[si][0] : seqs_full[si][0];
        const int sk = quick ? seqs_quick[si][1] : seqs_full[si][1];
        const int* hv = hh[n % 3];
        const int dalloc = (n % 5 == 2) ? d + 8 : d;  // sliced tensors: columns past head_dim must stay untouched
        const bool big = sq > 512 || sk > 512;
        cases.push_back(Case{big ? 1 : 2, sq, sk, hv[0], hv[1], d, dalloc, bool(causal), (n / 2) % 2,
                             n % 3 != 1, (n % 4 == 3) ? 5.f : 1.f});
      }
  }
  if (!quick) {
    for (int d : {64, 128, 256})
      for (int causal = 0; causal < 2; ++causal)
        cases.push_back(Case{2, 2048, 2048, 2048 / d / 4, 2048 / d / 4, d, d, bool(causal), 0, true, 1.f});
    // x5 inputs and fp16 at a larger size.
    cases.push_back(Case{1, 1024, 1024, 4, 4, 128, 128, true, 1, false, 5.f});
    cases.push_back(Case{1, 1024, 1024, 4, 4, 128, 128, false, 0, true, 5.f});
  }
  int fails = 0;
  if (!do_correct || only_d128) cases.clear();
  for (const Case& c : cases) {
    CaseResult r = run_case(c, dispatch_fn(c.d));
    if (!report_case(c, "main", r)) ++fails;
  }
  printf("CORRECTNESS main: %d / %zu cases pass\n", int(cases.size()) - fails, cases.size());
  if (quick) return fails ? 1 : 0;

  // ---- tile variants (bf16): correctness on odd shapes, then timing ----
  std::vector<Variant> variants;
  if (do_variants) {
    // Names: MxN, w = warps, xq / xkv = XOR bases, rl = rolled QK loop, lz = lazy rescale.
    // d128: the previous main (128x32), the unrolled lazy form (spills), a rolled one-step form; d64 / d256:
    // the lazy rescale on their main shapes.
    constexpr int kLz = kFwdLazyRescale, kRl = kFwdRolledQK, kRl2 = kFwdRolledQK | kFwdRolledQK2;
    variants = {
        {"d64_128x64w4_lz", 64, &variant_fwd<64, 128, 64, 4, false, false, kLz>},
        {"d128_128x32w4xq", 128, &variant_fwd<128, 128, 32, 4, true, false>},
        {"d128_128x64w4_lz", 128, &variant_fwd<128, 128, 64, 4, false, false, kLz>},
        {"d128_128x64w4xq_rl_lz", 128, &variant_fwd<128, 128, 64, 4, true, false, kRl | kLz>},
        {"d128_128x64w4xq_rl2_lz", 128, &variant_fwd<128, 128, 64, 4, true, false, kRl2 | kLz>},
        {"d256_64x64w4xq_lz", 256, &variant_fwd<256, 64, 64, 4, true, false, kLz>},
    };
  }
  int vfails = 0;
  if (do_correct)
  for (const Variant& v : variants)
    for (int causal = 0; causal < 2; ++causal) {
      Case c{2, 1025, 1023, 4, 2, v.d, v.d, bool(causal), 1, true, 1.f};
      if (!report_case(c, v.name, run_case(c, v.fn))) ++vfails;
      Case c2{1, 203, 1100, 4, 1, v.d - 8, v.d - 8, bool(causal), 0, true, 5.f};
      if (!report_case(c2, v.name, run_case(c2, v.fn))) ++vfails;
    }
  if (!variants.empty()) printf("CORRECTNESS variants: %d failures\n", vfails);

  if (!do_bench) return fails ? 1 : 0;
  std::vector<BenchRow> rows;
  for (int d : {64, 128, 256})
    for (int causal = 0; causal < 2; ++causal)
      for (int s : {1024, 4096, 16384}) {
        if (only_d128 && d != 128) continue;
        rows.push_back(bench("main", dispatch_fn(d), d, causal, s, true));
        for (const Variant& v : variants)
          if (v.d == d) rows.push_back(bench(v.name, v.fn, d, causal, s, true));
      }
  for (int d : {64, 128, 256})
    for (int causal = 0; causal < 2; ++causal)
      if (!only_d128) rows.push_back(bench("main", dispatch_fn(d), d, causal, 4096, false));
  for (int d : {32, 96, 160, 192, 224})
    if (!only_d128)
    for (int causal = 0; causal < 2; ++causal) rows.push_back(bench("main", dispatch_fn(d), d, causal, 4096, true));
  printf("\n%-26s %-5s %4s %6s %6s %5s %6s %9s %8s\n", "impl", "dtype", "d", "causal", "seqlen", "batch", "heads", "ms",
         "TFLOP/s");
  for (const BenchRow& r : rows)
    printf("%-26s %-5s %4d %6d %6d %5d %6d %9.3f %8.1f\n", r.impl.c_str(), r.bf16 ? "bf16" : "fp16", r.d, int(r.causal),
           r.seqlen, r.batch, r.nheads, r.ms, r.tflops);
  printf("CORRECTNESS main: %d / %zu cases pass; variants failures %d\n", int(cases.size()) - fails, cases.size(), vfails);
  return fails ? 1 : 0;
}
