// Standalone correctness + speed harness for the Hopper forward (csrc/kernels/sm90). No torch.
// Variants: "default" is what the API runs; the others are the comparisons in fwd_launch.cuh / NOTES.md.
// Build (sm_90a only):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
//        tools/harness/sm90_fwd_harness.cu -o .devbin/sm90/fwd_harness
// Run: fwd_harness [check|bench|quick|all|dobench [variant names]|prof [variant]]   (default all)
//   prof: a few launches of one bench-shaped config (env FWD_DIM, FWD_S, FWD_CAUSAL; or one launch of FWD_SHAPE, see
//   run_prof) for ncu / compute-sanitizer, e.g.
//   FWD_DIM=64 FWD_S=1024 FWD_CAUSAL=1 ncu --kernel-name-base demangled -k regex:FwdKernel -s 1 -c 1 ... fwd_harness prof
// Correctness: every case is compared with a naive GPU reference in fp32 (`ref`) and with the same
// computation rounded like a plain 16-bit PyTorch run (`pt`: S, P and O rounded to the input dtype).
// Pass when max|ours - ref| <= 2 max|pt - ref| + atol, atol = 2 max|(ref + 0.3 - 0.3) - ref| in the
// input dtype, lse within 2e-3 (abs + rel) of the fp32 lse, -inf exactly where a row sees no key, no NaN.
// Outputs are poisoned (0xFF bytes: NaN) before each call so an unwritten element fails.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/kernels/sm90/fwd_launch.cuh"
#include "common.cuh"

using namespace flash_ext;


template bool flash_ext::run_fwd_sm90<64>(const FwdParams&, cudaStream_t);
template bool flash_ext::run_fwd_sm90<128>(const FwdParams&, cudaStream_t);
template bool flash_ext::run_fwd_sm90<256>(const FwdParams&, cudaStream_t);

// ------------------------------------------------------------------------------------------ variants
using LaunchFn = void (*)(const FwdParams&, cudaStream_t);
struct Variant {
  const char* name;
  int head_dim;  // kHeadDim
  LaunchFn fn;
};
template <int D>
void run_default(const FwdParams& p, cudaStream_t s) { run_fwd_sm90<D>(p, s); }
template <int D, int N, int S, bool PP, bool DP, int kGridLimit = 0, bool kChain = false, int kWG = 2,
          int kPaired = -1, int kGroup = 0, bool kSkip = false>
void run_cfg(const FwdParams& p, cudaStream_t s) {
  DTYPE_SWITCH(p.is_bf16, [&] {
    BOOL_SWITCH(p.is_causal, IsCausal, [&] {
      sm90::launch_fwd_sm90<elem_type, D, N, S, IsCausal, PP, DP, kChain, kWG, kSkip>(p, s, kGridLimit, kPaired,
                                                                                      kGroup);
    });
  });
}
constexpr int kNoPersist = 1 << 30;  // one CTA per tile
constexpr int kPersist = -1;         // one CTA per SM
static const Variant kVariants[] = {
    {"default", 64, run_default<64>},
    {"default", 128, run_default<128>},
    {"default", 256, run_default<256>},
    {"wg2", 64, run_cfg<64, 128, 2, true, true>},  // the 2-warpgroup d64 default before 3 warpgroups
    {"wg2np", 64, run_cfg<64, 128, 2, true, true, kNoPersist>},
    {"wg2chain", 64, run_cfg<64, 128, 2, true, true, 0, true>},
    {"wg3pp", 64, run_cfg<64, 128, 2, true, false, 0, true, 3>},
    {"wg3pp0", 64, run_cfg<64, 128, 2, false, false, 0, false, 3>},
    {"wg3p", 64, run_cfg<64, 128, 2, true, false, kPersist, true, 3>},
    {"wg2p", 64, run_cfg<64, 128, 2, true, true, kPersist>},  // the short causal default, persistent at any length
    // WgSkip (each warpgroup skips the key blocks its 64 rows cannot see), sixth session: the 3-warpgroup causal
    // kernel with it (default above 1k; "wg3pp" is that kernel without), forced persistent, and with 2 warpgroups.
    {"wg3s", 64, run_cfg<64, 128, 2, true, false, 0, true, 3, -1, 0, true>},
    {"wg3sp", 64, run_cfg<64, 128, 2, true, false, kPersist, true, 3, -1, 0, true>},
    {"wg2s", 64, run_cfg<64, 128, 2, true, true, 0, false, 2, -1, 0, true>},
    {"skip", 256, run_cfg<256, 80, 2, false, false, 0, false, 2, -1, 0, true>},  // default + WgSkip
    // K / V stages (sixth session, after ncu showed cuDNN's d64 forward with ~134 KB of shared memory): the short
    // causal kernel with 3 and 4 stages, the 3-warpgroup causal (WgSkip) and non-causal kernels with 3.
    {"wg2st3", 64, run_cfg<64, 128, 3, true, true>},
    {"wg2st4", 64, run_cfg<64, 128, 4, true, true>},
    {"wg3st3", 64, run_cfg<64, 128, 3, true, false, 0, true, 3, -1, 0, true>},
    {"nc3st3", 64, run_cfg<64, 128, 3, false, false, 0, false, 3>},
    // Causal schedule: paired (tiles m and num_m_blocks - 1 - m back to back on one CTA, the default where
    // persistent) vs the zig-zag rounds before it; same kernels.
    {"wg2zz", 64, run_cfg<64, 128, 2, true, true, 0, false, 2, 0>},
    {"zigzag", 128, run_cfg<128, 128, 2, true, true, 0, false, 2, 0>},
    {"perspair", 256, run_cfg<256, 80, 2, false, false, kPersist, false, 2, 1>},
    // L2 grouping of the tile order: (head, batch) pairs per group forced to 1, 2, 4 or 8 (default: 1 when not
    // causal, else 32 MiB of K/V); g1 at d64 / d256 (d64: the non-causal default's flags, so causal rows differ).
    {"g1", 128, run_cfg<128, 128, 2, true, true, 0, false, 2, -1, 1>},
    {"g8", 128, run_cfg<128, 128, 2, true, true, 0, false, 2, -1, 8>},
    {"g2", 128, run_cfg<128, 128, 2, true, true, 0, false, 2, -1, 2>},
    {"g4", 128, run_cfg<128, 128, 2, true, true, 0, false, 2, -1, 4>},
    {"g1s", 64, run_cfg<64, 128, 2, true, true, 0, false, 2, -1, 1>},  // = the short causal default
    {"g1nc", 64, run_cfg<64, 128, 2, false, false, 0, false, 3, -1, 1>},  // = default when not causal
    {"g1", 256, run_cfg<256, 80, 2, false, false, 0, false, 2, -1, 1>},
    {"n144", 128, run_cfg<128, 144, 2, true, true>},  // kBlockN 144 (FA3 uses 176 for d128 non-causal)
    {"n144dp0", 128, run_cfg<128, 144, 2, true, false>},
    {"nonpersist", 128, run_cfg<128, 128, 2, true, true, kNoPersist>},
    {"persist", 128, run_cfg<128, 128, 2, true, true, kPersist>},
    {"dp0", 128, run_cfg<128, 128, 2, true, false>},
    {"nonpersist", 256, run_cfg<256, 80, 2, false, false, kNoPersist>},
    {"persist", 256, run_cfg<256, 80, 2, false, false, kPersist>},
    {"dp1", 256, run_cfg<256, 80, 2, false, true>},
};

// ------------------------------------------------------------------------------------------ helpers
template <typename T>
__device__ __forceinline__ float round_t(float x) { return static_cast<float>(static_cast<T>(x)); }

// One warp per (row, head, batch). ref: fp32 everything. pt: S, P, O rounded to T like a 16-bit framework.
template <typename T>
__global__ void ref_kernel(FwdParams p, float* ref_out, float* pt_out, float* ref_lse) {
  const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x;
  const int hk = h / p.h_h_k_ratio, d = p.head_dim, sk = p.seqlen_k;
  extern __shared__ float sm[];
  float* qs = sm;            // 256
  float* s32 = sm + 256;     // sk
  float* spt = s32 + sk;     // sk
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (int64_t)row * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  for (int i = lane; i < d; i += 32) qs[i] = static_cast<float>(q[i]);
  __syncwarp();
  int lim = sk;
  if (p.is_causal) lim = min(sk, row + 1 + sk - p.seqlen_q);
  float mx = -INFINITY, mxp = -INFINITY;
  for (int j = lane; j < sk; j += 32) {
    float dot = 0.f;
    const T* kr = k + (int64_t)j * p.k_row_stride;
    for (int i = 0; i < d; ++i) dot += qs[i] * static_cast<float>(kr[i]);
    const float a = j < lim ? dot * p.scale_softmax : -INFINITY;
    const float c = j < lim ? round_t<T>(round_t<T>(dot) * p.scale_softmax) : -INFINITY;
    s32[j] = a;
    spt[j] = c;
    mx = fmaxf(mx, a);
    mxp = fmaxf(mxp, c);
  }
  for (int o = 16; o > 0; o >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    mxp = fmaxf(mxp, __shfl_xor_sync(0xffffffffu, mxp, o));
  }
  const int64_t orow = (((int64_t)b * p.seqlen_q + row) * p.nheads + h) * d;
  if (mx == -INFINITY) {
    for (int i = lane; i < d; i += 32) ref_out[orow + i] = pt_out[orow + i] = 0.f;
    if (lane == 0) ref_lse[((int64_t)b * p.nheads + h) * p.seqlen_q + row] = -INFINITY;
    return;
  }
  float sum = 0.f, sump = 0.f;
  for (int j = lane; j < sk; j += 32) {
    sum += expf(s32[j] - mx);
    sump += expf(spt[j] - mxp);
  }
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    sump += __shfl_xor_sync(0xffffffffu, sump, o);
  }
  __syncwarp();
  for (int j = lane; j < sk; j += 32) {
    s32[j] = expf(s32[j] - mx) / sum;
    spt[j] = round_t<T>(expf(spt[j] - mxp) / sump);
  }
  __syncwarp();
  for (int i = lane; i < d; i += 32) {
    float a = 0.f, c = 0.f;
    for (int j = 0; j < lim; ++j) {
      const float vv = static_cast<float>(v[(int64_t)j * p.v_row_stride + i]);
      a += s32[j] * vv;
      c += spt[j] * vv;
    }
    ref_out[orow + i] = a;
    pt_out[orow + i] = round_t<T>(c);
  }
  if (lane == 0) ref_lse[((int64_t)b * p.nheads + h) * p.seqlen_q + row] = mx + logf(sum);
}

static float bf16_to_float(uint16_t x) {
  uint32_t u = (uint32_t)x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static float half_to_float(uint16_t x) { return __half2float(*reinterpret_cast<__half*>(&x)); }
static float round_host(float x, bool bf16) {
  if (bf16) return __bfloat162float(__float2bfloat16(x));
  return __half2float(__float2half(x));
}

struct Case {
  int b, h, hk, sq, sk, d;
  bool causal, bf16;
  int layout;  // 0: BSHD contiguous; 1: BHSD (transposed strides); 2: packed qkv (b, s, 3, h, d), needs sq == sk, h == hk
};
// The benchmark's shape: 16k tokens (batch x seqlen), hidden 2048 (heads x head dim), seqlen_q = seqlen_k = S.
static Case bench_case(int D, int S, bool causal, bool bf16) {
  return Case{16384 / S, 2048 / D, 2048 / D, S, S, D, causal, bf16, 0};
}
static double case_flops(const Case& c) { return 4.0 * c.b * c.h * (double)c.sq * c.sk * c.d / (c.causal ? 2 : 1); }

struct Buffers {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  float* lse = nullptr;
  void* qkv = nullptr;
  FwdParams p{};
  size_t o_elems = 0;
};

static uint64_t g_seed = 0;

static Buffers make_buffers(const Case& c) {
  Buffers B;
  FwdParams& p = B.p;
  const int64_t d = c.d;
  const size_t qn = (size_t)c.b * c.sq * c.h * d, kn = (size_t)c.b * c.sk * c.hk * d;
  if (c.layout == 2) {
    const size_t n = (size_t)c.b * c.sq * 3 * c.h * d;
    CK(cudaMalloc(&B.qkv, n * 2));
    B.q = B.qkv;
    B.k = static_cast<char*>(B.qkv) + c.h * d * 2;
    B.v = static_cast<char*>(B.qkv) + 2 * c.h * d * 2;
    const int64_t rs = 3 * c.h * d;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = rs;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = d;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = rs * c.sq;
    if (c.bf16) fill_randn<<<1024, 256>>>((__nv_bfloat16*)B.qkv, n, ++g_seed);
    else fill_randn<<<1024, 256>>>((__half*)B.qkv, n, ++g_seed);
  } else {
    CK(cudaMalloc(&B.q, qn * 2));
    CK(cudaMalloc(&B.k, kn * 2));
    CK(cudaMalloc(&B.v, kn * 2));
    if (c.layout == 0) {
      p.q_row_stride = (int64_t)c.h * d; p.q_head_stride = d; p.q_batch_stride = (int64_t)c.sq * c.h * d;
      p.k_row_stride = (int64_t)c.hk * d; p.k_head_stride = d; p.k_batch_stride = (int64_t)c.sk * c.hk * d;
    } else {
      p.q_row_stride = d; p.q_head_stride = (int64_t)c.sq * d; p.q_batch_stride = (int64_t)c.sq * c.h * d;
      p.k_row_stride = d; p.k_head_stride = (int64_t)c.sk * d; p.k_batch_stride = (int64_t)c.sk * c.hk * d;
    }
    p.v_row_stride = p.k_row_stride; p.v_head_stride = p.k_head_stride; p.v_batch_stride = p.k_batch_stride;
    void* bufs[3] = {B.q, B.k, B.v};
    size_t ns[3] = {qn, kn, kn};
    for (int i = 0; i < 3; ++i) {
      if (c.bf16) fill_randn<<<1024, 256>>>((__nv_bfloat16*)bufs[i], ns[i], ++g_seed);
      else fill_randn<<<1024, 256>>>((__half*)bufs[i], ns[i], ++g_seed);
    }
  }
  B.o_elems = qn;
  CK(cudaMalloc(&B.o, qn * 2));
  CK(cudaMalloc(&B.lse, (size_t)c.b * c.h * c.sq * 4));
  if (c.layout == 1) {
    p.o_row_stride = d; p.o_head_stride = (int64_t)c.sq * d; p.o_batch_stride = (int64_t)c.sq * c.h * d;
  } else {
    p.o_row_stride = (int64_t)c.h * d; p.o_head_stride = d; p.o_batch_stride = (int64_t)c.sq * c.h * d;
  }
  p.q = B.q; p.k = B.k; p.v = B.v; p.out = B.o; p.lse = B.lse;
  p.batch = c.b; p.seqlen_q = c.sq; p.seqlen_k = c.sk; p.nheads = c.h; p.nheads_k = c.hk;
  p.head_dim = c.d; p.h_h_k_ratio = c.h / c.hk;
  p.scale_softmax = 1.f / sqrtf((float)c.d);
  p.scale_softmax_log2 = p.scale_softmax * 1.4426950408889634f;
  p.is_bf16 = c.bf16; p.is_causal = c.causal;
  int dev; CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&p.num_sm, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaGetLastError());
  return B;
}
static void free_buffers(Buffers& B) {
  if (B.qkv) cudaFree(B.qkv); else { cudaFree(B.q); cudaFree(B.k); cudaFree(B.v); }
  cudaFree(B.o); cudaFree(B.lse);
}

static int g_fail = 0, g_pass = 0;
static FILE* g_log = stdout;

static void check_case(const Case& c) {
  Buffers B = make_buffers(c);
  const FwdParams& p = B.p;
  const size_t qn = B.o_elems, ln = (size_t)c.b * c.h * c.sq;
  float *ref, *pt, *rlse;
  CK(cudaMalloc(&ref, qn * 4)); CK(cudaMalloc(&pt, qn * 4)); CK(cudaMalloc(&rlse, ln * 4));
  const size_t shm = (256 + 2 * (size_t)c.sk) * 4 + 4096;  // + slack
  if (shm > 48 * 1024) {
    if (c.bf16) CK(cudaFuncSetAttribute(ref_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm));
    else CK(cudaFuncSetAttribute(ref_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm));
  }
  dim3 rg(c.sq, c.h, c.b);
  if (c.bf16) ref_kernel<__nv_bfloat16><<<rg, 32, shm>>>(p, ref, pt, rlse);
  else ref_kernel<__half><<<rg, 32, shm>>>(p, ref, pt, rlse);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> h_ref(qn), h_pt(qn), h_rlse(ln);
  CK(cudaMemcpy(h_ref.data(), ref, qn * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(h_pt.data(), pt, qn * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(h_rlse.data(), rlse, ln * 4, cudaMemcpyDeviceToHost));
  double err_pt = 0, atol = 0;
  for (size_t i = 0; i < qn; ++i) {
    err_pt = std::max(err_pt, (double)fabsf(h_pt[i] - h_ref[i]));
    atol = std::max(atol, (double)fabsf(round_host(round_host(h_ref[i] + 0.3f, c.bf16) - 0.3f, c.bf16) - h_ref[i]));
  }
  atol *= 2;
  const int kdim = c.d <= 64 ? 64 : c.d <= 128 ? 128 : 256;
  std::vector<uint16_t> h_o(qn);
  std::vector<float> h_lse(ln);
  for (const Variant& var : kVariants) {
    if (var.head_dim != kdim) continue;
    if (!sm90_fwd_supported(p)) {
      fprintf(g_log, "UNSUPPORTED b%d h%d/%d sq%d sk%d d%d\n", c.b, c.h, c.hk, c.sq, c.sk, c.d);
      ++g_fail;
      break;
    }
    CK(cudaMemset(B.o, 0xFF, qn * 2));
    CK(cudaMemset(B.lse, 0xFF, ln * 4));
    var.fn(p, 0);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    // Read back with the output strides.
    std::vector<uint16_t> raw(qn);
    CK(cudaMemcpy(raw.data(), B.o, qn * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h_lse.data(), B.lse, ln * 4, cudaMemcpyDeviceToHost));
    double err = 0, err_lse = 0;
    bool nan = false, lse_bad = false;
    for (int b = 0; b < c.b; ++b)
      for (int s = 0; s < c.sq; ++s)
        for (int h = 0; h < c.h; ++h)
          for (int i = 0; i < c.d; ++i) {
            const size_t ri = (((size_t)b * c.sq + s) * c.h + h) * c.d + i;
            const size_t oi = b * p.o_batch_stride + (size_t)s * p.o_row_stride + h * p.o_head_stride + i;
            const float x = c.bf16 ? bf16_to_float(raw[oi]) : half_to_float(raw[oi]);
            if (!std::isfinite(x)) nan = true;
            else err = std::max(err, (double)fabsf(x - h_ref[ri]));
          }
    for (size_t i = 0; i < ln; ++i) {
      const float a = h_lse[i], r = h_rlse[i];
      if (std::isnan(a)) { lse_bad = true; continue; }
      if (std::isinf(r) || std::isinf(a)) { if (a != r) lse_bad = true; continue; }
      const double e = fabs((double)a - r);
      err_lse = std::max(err_lse, e);
      if (e > 2e-3 * (1 + fabs(r))) lse_bad = true;
    }
    const bool ok = !nan && !lse_bad && err <= 2 * err_pt + atol;
    ok ? ++g_pass : ++g_fail;
    fprintf(g_log, "%s %-11s D%-3d %s %s b%d h%d/%d sq%-5d sk%-5d d%-3d L%d  err %.3e  pt %.3e  atol %.1e  lse %.1e%s\n",
            ok ? "PASS" : "FAIL", var.name, var.head_dim, c.bf16 ? "bf16" : "fp16", c.causal ? "causal" : "full  ", c.b,
            c.h, c.hk, c.sq, c.sk, c.d, c.layout, err, err_pt, atol, err_lse, nan ? " NaN/unwritten" : lse_bad ? " LSE" : "");
    fflush(g_log);
  }
  cudaFree(ref); cudaFree(pt); cudaFree(rlse);
  free_buffers(B);
}

static void run_checks(bool quick) {
  std::vector<Case> cases;
  const int dims[] = {64, 128, 256};
  for (int D : dims) {
    for (int causal = 0; causal < 2; ++causal) {
      cases.push_back({1, 1, 1, 1, 1, D, (bool)causal, true, 0});
      cases.push_back({2, 3, 3, 17, 17, D, (bool)causal, true, 0});
      cases.push_back({1, 2, 2, 113, 203, D, (bool)causal, true, 0});
      cases.push_back({2, 2, 2, 203, 113, D, (bool)causal, true, 0});
      if (quick) continue;
      cases.push_back({1, 2, 1, 239, 1023, D, (bool)causal, true, 0});
      cases.push_back({1, 2, 2, 1025, 1025, D, (bool)causal, true, 0});
      cases.push_back({2, 4, 2, 1023, 1025, D, (bool)causal, true, 1});
      cases.push_back({2, 2, 2, 257, 257, D, (bool)causal, true, 2});
      cases.push_back({1, 2, 2, 1, 1025, D, (bool)causal, true, 0});
      cases.push_back({1, 2, 2, 1025, 1, D, (bool)causal, true, 0});
      cases.push_back({1, 4, 4, 300, 300, D, (bool)causal, false, 0});  // fp16
    }
  }
  // head_dim below the instantiated kHeadDim (zero-filled columns), GQA / MQA.
  cases.push_back({2, 4, 2, 203, 239, 80, false, true, 0});
  cases.push_back({2, 4, 1, 203, 239, 80, true, true, 1});
  cases.push_back({1, 2, 2, 113, 113, 40, true, true, 0});
  cases.push_back({1, 2, 2, 300, 129, 200, true, true, 0});
  cases.push_back({2, 8, 2, 129, 129, 96, false, false, 2});
  cases.push_back({1, 3, 3, 17, 1023, 8, false, true, 0});
  // Enough tiles (> 132) for the persistent causal schedules: paired with an odd num_m_blocks (7 at kBlockM 128,
  // 9 for the forced-persistent d256 variant), GQA, sq != sk.
  cases.push_back({1, 40, 20, 800, 1000, 64, true, true, 0});
  cases.push_back({1, 40, 20, 800, 1000, 128, true, true, 0});
  cases.push_back({1, 20, 20, 1100, 1000, 256, true, true, 0});
  cases.push_back({2, 16, 8, 1024, 1024, 128, true, false, 1});
  // seqlen_k >= 4096: the d128 non-causal long-key tile (kBlockN 144, FwdTileLong), with a key tail.
  cases.push_back({1, 2, 1, 300, 4500, 128, false, true, 0});
  cases.push_back({1, 2, 2, 129, 4097, 96, false, false, 1});
  for (const Case& c : cases) check_case(c);
}

// Times every variant of a config in kRounds interleaved rounds (the device may be shared: interleaving
// spreads any contention over all variants); reports the median of the per-round medians and the best.
static void run_bench() {
  constexpr int kRounds = 5;
  fprintf(g_log, "\n%-4s %-6s %-6s %-5s %-12s %9s %9s %9s\n", "hdim", "causal", "seqlen", "dtype", "variant", "ms",
          "TFLOP/s", "best");
  const int dims[] = {64, 128, 256};
  const int seqs[] = {1024, 4096, 16384};
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int D : dims)
    for (int causal = 0; causal < 2; ++causal)
      for (int S : seqs)
        for (int dt = 0; dt < 2; ++dt) {
          const bool bf16 = dt == 0;
          if (!bf16 && !(D == 128 && S == 4096)) continue;  // fp16 spot check
          Case c = bench_case(D, S, causal, bf16);
          Buffers B = make_buffers(c);
          CK(cudaDeviceSynchronize());
          const double flops = case_flops(c);
          std::vector<const Variant*> vars;
          for (const Variant& var : kVariants)
            if (var.head_dim == D && (bf16 || strcmp(var.name, "default") == 0)) vars.push_back(&var);
          std::vector<std::vector<double>> med(vars.size());
          for (int round = 0; round < kRounds; ++round) {
            for (size_t vi = 0; vi < vars.size(); ++vi) {
              for (int i = 0; i < 3; ++i) vars[vi]->fn(B.p, 0);
              CK(cudaGetLastError());
              std::vector<float> ts;
              const int iters = S >= 16384 ? 8 : 15;
              for (int i = 0; i < iters; ++i) {
                CK(cudaEventRecord(e0));
                vars[vi]->fn(B.p, 0);
                CK(cudaEventRecord(e1));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                ts.push_back(ms);
              }
              CK(cudaGetLastError());
              std::sort(ts.begin(), ts.end());
              med[vi].push_back(ts[ts.size() / 2]);
            }
          }
          for (size_t vi = 0; vi < vars.size(); ++vi) {
            std::sort(med[vi].begin(), med[vi].end());
            const double ms = med[vi][kRounds / 2], best = med[vi][0];
            fprintf(g_log, "%-4d %-6s %-6d %-5s %-12s %9.3f %9.1f %9.1f\n", D, causal ? "yes" : "no", S,
                    bf16 ? "bf16" : "fp16", vars[vi]->name, ms, flops / ms * 1e-9, flops / best * 1e-9);
          }
          fflush(g_log);
          free_buffers(B);
        }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

// Like the Python bench's triton do_bench: calls queued back to back, each after a 256 MiB memset that
// evicts L2, events around the call only, about 100 ms per variant; also the same without the memset.
// Variants interleaved over 3 rounds; median of the round medians.
// Whether `name` is one of the space-separated names in `list` (whole names: "wg3p" does not select "wg3pp").
static bool name_listed(const char* list, const char* name) {
  const size_t n = strlen(name);
  for (const char* p = strstr(list, name); p; p = strstr(p + 1, name)) {
    if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return true;
  }
  return false;
}
static void run_dobench(const char* only) {
  constexpr int kRounds = 3;
  const size_t flush_bytes = 256u << 20;
  void* flush;
  CK(cudaMalloc(&flush, flush_bytes));
  fprintf(g_log, "\n%-4s %-6s %-6s %-8s %9s %9s %9s\n", "hdim", "causal", "seqlen", "variant", "flushed", "queued",
          "TFLOP/s");
  const int dims[] = {64, 128, 256};
  const int seqs[] = {1024, 2048, 4096, 16384};
  const char* only_dim = getenv("FWD_DIM");  // e.g. FWD_DIM=64: that head dim only
  std::vector<cudaEvent_t> e0(400), e1(400);
  for (auto& e : e0) CK(cudaEventCreate(&e));
  for (auto& e : e1) CK(cudaEventCreate(&e));
  auto timed = [&](const Variant* v, const FwdParams& p, int n, bool flushed) {
    for (int i = 0; i < n; ++i) {
      if (flushed) CK(cudaMemsetAsync(flush, 0, flush_bytes, 0));
      CK(cudaEventRecord(e0[i]));
      v->fn(p, 0);
      CK(cudaEventRecord(e1[i]));
    }
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    std::vector<float> ts(n);
    for (int i = 0; i < n; ++i) CK(cudaEventElapsedTime(&ts[i], e0[i], e1[i]));
    std::sort(ts.begin(), ts.end());
    return (double)ts[n / 2];
  };
  for (int D : dims)
    for (int causal = 0; causal < 2; ++causal)
      for (int S : seqs) {
        if (only_dim && atoi(only_dim) != D) continue;
        Case c = bench_case(D, S, causal, true);
        Buffers B = make_buffers(c);
        CK(cudaDeviceSynchronize());
        const double flops = case_flops(c);
        std::vector<const Variant*> vars;
        for (const Variant& var : kVariants)
          if (var.head_dim == D && (!only || name_listed(only, var.name))) vars.push_back(&var);
        std::vector<std::vector<double>> medf(vars.size()), medq(vars.size());
        for (int round = 0; round < kRounds; ++round)
          for (size_t vi = 0; vi < vars.size(); ++vi) {
            const double est = timed(vars[vi], B.p, 5, true);
            const int n = std::max(10, std::min(400, (int)(100.0 / std::max(est, 1e-3))));
            medf[vi].push_back(timed(vars[vi], B.p, n, true));
            medq[vi].push_back(timed(vars[vi], B.p, n, false));
          }
        for (size_t vi = 0; vi < vars.size(); ++vi) {
          std::sort(medf[vi].begin(), medf[vi].end());
          std::sort(medq[vi].begin(), medq[vi].end());
          const double f = medf[vi][kRounds / 2], q = medq[vi][kRounds / 2];
          fprintf(g_log, "%-4d %-6s %-6d %-8s %9.3f %9.3f %9.1f\n", D, causal ? "yes" : "no", S, vars[vi]->name, f,
                  q, flops / f * 1e-9);
        }
        fflush(g_log);
        free_buffers(B);
      }
  for (auto& e : e0) cudaEventDestroy(e);
  for (auto& e : e1) cudaEventDestroy(e);
  cudaFree(flush);
}

// One variant, one bench-shaped config (bf16, 16k tokens x 2048 hidden), a few launches: for ncu.
// Env: FWD_DIM (64), FWD_S (1024), FWD_CAUSAL (0); argv[2]: variant name (default "default").
static void run_prof(const char* name) {
  const int D = getenv("FWD_DIM") ? atoi(getenv("FWD_DIM")) : 64;
  const int S = getenv("FWD_S") ? atoi(getenv("FWD_S")) : 1024;
  const bool causal = getenv("FWD_CAUSAL") && atoi(getenv("FWD_CAUSAL")) != 0;
  Case c = bench_case(D, S, causal, true);
  // FWD_SHAPE="b,h,hk,sq,sk,d,causal" replaces the bench shape (e.g. a small case for compute-sanitizer).
  int n_launch = 4;
  if (const char* shape = getenv("FWD_SHAPE")) {
    int cz = 0;
    if (sscanf(shape, "%d,%d,%d,%d,%d,%d,%d", &c.b, &c.h, &c.hk, &c.sq, &c.sk, &c.d, &cz) != 7) {
      fprintf(stderr, "FWD_SHAPE: expected b,h,hk,sq,sk,d,causal\n");
      exit(2);
    }
    c.causal = cz != 0;
    n_launch = 1;
  }
  Buffers B = make_buffers(c);
  const int kdim = c.d <= 64 ? 64 : c.d <= 128 ? 128 : 256;
  for (const Variant& var : kVariants)
    if (var.head_dim == kdim && strcmp(var.name, name ? name : "default") == 0) {
      for (int i = 0; i < n_launch; ++i) var.fn(B.p, 0);
      CK(cudaDeviceSynchronize());
      CK(cudaGetLastError());
      printf("prof %s b%d h%d/%d sq%d sk%d d%d causal %d: %d launches\n", var.name, c.b, c.h, c.hk, c.sq, c.sk, c.d,
             (int)c.causal, n_launch);
    }
  free_buffers(B);
}

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "all";
  g_seed = (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count();
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);
  if (mode == "check" || mode == "all") run_checks(false);
  if (mode == "quick") run_checks(true);
  if (mode == "check" || mode == "all" || mode == "quick") printf("checks: %d pass, %d fail\n", g_pass, g_fail);
  if (mode == "bench" || mode == "all") run_bench();
  if (mode == "dobench") run_dobench(argc > 2 ? argv[2] : nullptr);
  if (mode == "prof") run_prof(argc > 2 ? argv[2] : nullptr);
  return g_fail ? 1 : 0;
}
