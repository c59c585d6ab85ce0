// CUDA implementations of the flash_ext ops: argument checks, device guard, output and workspace
// allocation, params, and dispatch to a kernel family:
//   sm90: wgmma + TMA + warp specialization (Hopper, compute capability 9.0, built for sm_90a);
//   sm80: mma.sync + ldmatrix + cp.async (every GPU from sm_80 up).
// FLASH_EXT_BACKEND=sm80|sm90 forces a family (tests exercise both on one H200); a shape the sm90
// kernels cannot take (TMA alignment, an uninstantiated head dim) falls back to sm80.
// Nothing here synchronizes; every kernel runs on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <mutex>

#include "../attention_checks.h"
#include "../block_mask_as_bias.h"
#include "../kernels/dropout.h"
#include "../kernels/instantiations/dispatch.h"
#include "../kernels/params.h"
#include "../kernels/seqinfo.cuh"
#ifdef FLASH_EXT_WITH_SM90
#include "../kernels/sm90/bwd_api.h"
#include "../kernels/sm90/fwd_api.h"
#endif

namespace flash_ext {
namespace {

// Properties of the current device, read once per device.
const cudaDeviceProp* current_device_props() {
  constexpr int kMaxDevices = 64;
  static cudaDeviceProp props[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "flash_ext: device index ", fmt(device), " out of range");
  std::call_once(once[device], [&] { C10_CUDA_CHECK(cudaGetDeviceProperties(&props[device], device)); });
  return &props[device];
}

enum class Backend { kAuto, kSm80, kSm90 };

Backend requested_backend() {
  const char* env = std::getenv("FLASH_EXT_BACKEND");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return Backend::kAuto;
  if (std::strcmp(env, "sm80") == 0) return Backend::kSm80;
  if (std::strcmp(env, "sm90") == 0) return Backend::kSm90;
  TORCH_CHECK(false, "FLASH_EXT_BACKEND must be sm80, sm90 or auto, got '", env, "'");
}

// Whether the sm90 family may run on the current device (built for sm_90a, compute capability 9.0).
bool sm90_available(const cudaDeviceProp* props) {
#ifdef FLASH_EXT_WITH_SM90
  return props->major == 9 && props->minor == 0;
#else
  (void)props;
  return false;
#endif
}

bool want_sm90(const cudaDeviceProp* props) {
  const Backend b = requested_backend();
  if (b == Backend::kSm80) return false;
  const bool ok = sm90_available(props);
  TORCH_CHECK(ok || b != Backend::kSm90,
              "FLASH_EXT_BACKEND=sm90 needs a compute capability 9.0 GPU and a build with FLASH_EXT_CUDA_ARCHS "
              "containing 90a; this device is sm_", fmt(props->major), fmt(props->minor));
  return ok;
}

int round_head_dim(int head_dim, const int* dims, int n) {
  for (int i = 0; i < n; ++i)
    if (head_dim <= dims[i]) return dims[i];
  return -1;
}

// Checks what only the CUDA path restricts; returns the current device's properties (call under the device
// guard of q's device).
const cudaDeviceProp* check_cuda_inputs(const at::Tensor& q, const AttnShape& s) {
  const cudaDeviceProp* props = current_device_props();
  TORCH_CHECK(props->major >= 8, "flash_ext CUDA kernels need compute capability 8.0 (sm_80) or newer, got sm_",
              fmt(props->major), fmt(props->minor));
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 on CUDA (float32 inputs are cast under torch.autocast), got ",
              q.scalar_type());
  TORCH_CHECK(s.head_dim <= 256, "head_dim must be at most 256 on CUDA, got ", fmt(s.head_dim));
  // The kernels' grids put heads and batch on grid.y / grid.z (at most 65535 each).
  TORCH_CHECK(s.batch <= 65535, "batch must be at most 65535 on CUDA, got ", fmt(s.batch));
  TORCH_CHECK(s.nheads <= 65535, "nheads must be at most 65535 on CUDA, got ", fmt(s.nheads));
  TORCH_CHECK(s.seqlen_q <= std::numeric_limits<int>::max() - 256 &&
                  s.seqlen_k <= std::numeric_limits<int>::max() - 256,
              "seqlen_q and seqlen_k must fit in 31 bits on CUDA");
  return props;
}

// The head dim the kernels run on: the caller's rounded up to a multiple of 8 (16-byte rows). The
// padding columns are zeros in q, k, v (and out, dout in the backward), so they add nothing to q·k and
// give zero output columns, which are cut off again; the softmax scale stays the caller's.
int64_t kernel_head_dim(int64_t head_dim) { return (head_dim + 7) / 8 * 8; }

// What the kernels can read, from any strided tensor: the last dim contiguous and `head_dim` wide, the base
// pointer 16-byte aligned and every other stride a multiple of 8 elements (16-byte vectors, cp.async and
// TMA rows). A tensor that is not gets one copy into a fresh (aligned, contiguous) buffer, zero-padded to
// `head_dim` columns where it is narrower. A tensor that already is is passed as it is, strides and all.
at::Tensor kernel_ready(const at::Tensor& t, int64_t head_dim) {
  if (t.size(-1) != head_dim) {
    at::Tensor padded = at::zeros({t.size(0), t.size(1), t.size(2), head_dim}, t.options());
    padded.narrow(-1, 0, t.size(-1)).copy_(t);
    return padded;
  }
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(-1) <= 1 || t.stride(-1) == 1);
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  if (ok) return t;
  // (t.contiguous() would return t itself when t is contiguous but its base pointer is not aligned.)
  at::Tensor copy = at::empty(t.sizes(), t.options());
  copy.copy_(t);
  return copy;
}

// The caller's head dim of a result computed on the padded one.
at::Tensor caller_head_dim(const at::Tensor& t, int64_t head_dim) {
  return t.size(-1) == head_dim ? t : t.narrow(-1, 0, head_dim).contiguous();
}

// FLASH_EXT_SM80_SMEM_LIMIT=<bytes>: the shared memory per block the sm80 backward may assume (an A100's
// 166912 on a Hopper GPU runs the fallback tile configurations, as the tests do); unset = the device's.
int sm80_smem_limit() {
  const char* env = std::getenv("FLASH_EXT_SM80_SMEM_LIMIT");
  if (env == nullptr || env[0] == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v > 0 && v <= std::numeric_limits<int>::max(),
              "FLASH_EXT_SM80_SMEM_LIMIT must be a positive number of bytes, got '", env, "'");
  return static_cast<int>(v);
}

// The mask the kernels run: causal (the plain causal policy) where the window is (-1, 0) without chunks, else the
// local policy where there is any bound or chunk, with unbounded sides as a bound no row reaches.
void fill_mask_params(FwdParams& p, const Features& f, const AttnShape& s, bool varlen = false) {
  // The general path (the local policy, the score modifiers of csrc/kernels/score_mod.cuh, the sinks and variable-length
  // batches) runs for any window, chunk, softcap, ALiBi, sinks or varlen batch; causal then is its window (-1, 0), and
  // the plain causal policy does not run.
  p.is_local = varlen || !f.mask_is_plain() || f.window_right > 0 || f.softcap > 0.0 || f.has_alibi || f.has_sinks ||
               f.has_bias || f.dropout_p > 0.0;
  p.is_causal = f.is_causal_only() && !p.is_local;
  if (!p.is_local) return;  // (the window fields stay 0: no other policy reads them)
  const int64_t unbounded = s.seqlen_q + s.seqlen_k;  // |i' - j| < seqlen_q + seqlen_k for every row and key
  TORCH_CHECK(unbounded < (int64_t(1) << 30), "flash_ext: a window, chunks, softcap, ALiBi, a bias or sinks "
              "need seqlen_q + seqlen_k < 2^30 on CUDA (the general path's bounds are int), got ", fmt(unbounded));
  auto bound = [&](int64_t w) { return static_cast<int>(w < 0 || w > unbounded ? unbounded : w); };
  p.window_left = bound(f.window_left);
  p.window_right = bound(f.window_right);
  p.attention_chunk = static_cast<int>(f.attention_chunk > unbounded ? unbounded : f.attention_chunk);
}

// The score modifiers' and the sinks' fields (general path only; FwdParams). `alibi` and `sinks` are the
// arguments as the kernels read them (float_for_kernels), kept alive by the caller until the launch.
void fill_score_mod_params(FwdParams& p, const Features& f, const at::Tensor& alibi, const at::Tensor& sinks,
                           double scale) {
  if (sinks.defined()) p.sinks = sinks.data_ptr<float>();
  if (f.softcap > 0.0) {
    p.softcap_in = static_cast<float>(scale / f.softcap);
    p.softcap_out = static_cast<float>(f.softcap / scale);
  }
  if (alibi.defined()) {
    p.alibi_slopes = alibi.data_ptr<float>();
    p.alibi_batch_stride = alibi.dim() == 2 ? alibi.stride(0) : 0;
  }
}

// The bias's fields (general path only): the tensor as the caller passed it (checked by check_bias: 4-D, each dim 1
// or full, bool, float32 or q's dtype), read in place through its strides; a dim of size 1 gets stride 0.
// The kernels address an element inside a (batch, head) slice with 32-bit offsets (csrc/kernels/score_mod.cuh); a
// bias whose slice spans 2^31 elements or more is read from a copy with contiguous slices (its broadcast dims kept
// broadcast), and one whose contiguous slice still does not fit is refused. Returns the tensor the kernels read
// (kept alive by the caller until the launch).
at::Tensor bias_for_kernels(const std::optional<at::Tensor>& attn_bias) {
  if (!attn_bias.has_value() || !attn_bias->defined()) return at::Tensor();
  at::Tensor b = *attn_bias;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int d = 2; d < 4; ++d) last += (t.size(d) - 1) * (t.size(d) == 1 ? 0 : t.stride(d));
    return last;
  };
  const int64_t limit = std::numeric_limits<int32_t>::max();
  if (span(b) >= limit) {
    for (int d = 0; d < 4; ++d)
      if (b.size(d) > 1 && b.stride(d) == 0) b = b.narrow(d, 0, 1);  // a broadcast dim stays one slice
    b = b.contiguous();
    TORCH_CHECK(span(b) < limit, "attn_bias on CUDA: seqlen_q * seqlen_k must be below 2^31 elements per (batch, "
                "head) slice, got ", fmt(b.size(2)), " x ", fmt(b.size(3)));
  }
  return b;
}

void fill_bias_params(FwdParams& p, const at::Tensor& b, const at::Tensor& q) {
  if (!b.defined()) return;
  p.attn_bias = b.data_ptr();
  p.bias_kind = b.scalar_type() == at::kBool ? 1 : b.scalar_type() == at::kFloat ? 2 : 3;
  TORCH_INTERNAL_ASSERT(p.bias_kind != 3 || b.scalar_type() == q.scalar_type());
  int64_t* strides[4] = {&p.bias_batch_stride, &p.bias_head_stride, &p.bias_row_stride, &p.bias_col_stride};
  for (int d = 0; d < 4; ++d) *strides[d] = b.size(d) == 1 ? 0 : b.stride(d);
}

// FLASH_EXT_CUDA_DROPOUT=1 switches the dropout kernels on: opt-in until their tests have passed on a GPU
// (docs/ARCHITECTURE.md, "Dropout"); otherwise dropout_p > 0 raises NotImplementedError on CUDA.
bool cuda_dropout_enabled(const Features& f) {
  if (f.dropout_p <= 0.0) return true;
  const char* env = std::getenv("FLASH_EXT_CUDA_DROPOUT");
  return env != nullptr && std::strcmp(env, "1") == 0;
}
constexpr const char* kCudaDropoutOff =
    "dropout_p > 0 on CUDA: the dropout kernels are opt-in (FLASH_EXT_CUDA_DROPOUT=1) until their tests have passed "
    "on a GPU (docs/ARCHITECTURE.md, \"Dropout\"); the CPU path has dropout";

// Dropout's fields (general path only; FwdParams): `rng` is the op's dropout_rng as the kernels read it (two
// contiguous int64 on q's device), kept alive by the caller until the launch.
void fill_dropout_params(FwdParams& p, const Features& f, const at::Tensor& rng) {
  if (f.dropout_p <= 0.0) return;
  p.dropout_rng = rng.data_ptr<int64_t>();
  p.dropout_threshold = DropoutRng::threshold_of(f.dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - f.dropout_p));
}

// alibi_slopes or sinks (checked by check_features: (nheads,), or (batch, nheads) for the slopes, float32 or q's
// dtype, on q's device) as the kernels read them: float32, contiguous rows (a copy where they are not); undefined
// where the argument is absent.
at::Tensor float_for_kernels(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(at::kFloat).contiguous();
}

void fill_fwd_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const AttnShape& s, double scale,
                     const Features& f, const cudaDeviceProp* props, bool varlen = false) {
  std::memset(&p, 0, sizeof(p));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.batch = static_cast<int>(s.batch);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.nheads = static_cast<int>(s.nheads);
  p.nheads_k = static_cast<int>(s.nheads_k);
  p.head_dim = static_cast<int>(q.size(3));  // the kernel head dim (kernel_head_dim of the caller's)
  p.h_h_k_ratio = static_cast<int>(s.nheads / s.nheads_k);
  p.scale_softmax = static_cast<float>(scale);
  p.scale_softmax_log2 = static_cast<float>(scale * 1.4426950408889634);  // scale * log2(e)
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  fill_mask_params(p, f, s, varlen);
  p.num_sm = props->multiProcessorCount;
}

// The forward's params plus the backward's tensors; the workspaces are allocated per family below.
void fill_bwd_params(BwdParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
                     const at::Tensor& dk, const at::Tensor& dv, const AttnShape& s, double scale,
                     const Features& f, bool deterministic, const cudaDeviceProp* props, bool varlen = false) {
  std::memset(&p, 0, sizeof(p));
  fill_fwd_params(p, q, k, v, out, lse, s, scale, f, props, varlen);
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
  p.deterministic = deterministic;
  p.seqlen_q_rounded = static_cast<int>((s.seqlen_q + 127) / 128 * 128);
  p.sm80_smem_limit = sm80_smem_limit();
}

// dsinks from the key-side kernels' float32 slots (BwdParams::dsink_accum, (batch, nheads, slots); undefined where no
// kernel ran: 0): dsink_h = -(sum over batch and slots), in float64, in the sinks' dtype; empty without sinks.
at::Tensor dsinks_from_slots(const at::Tensor& dsink_accum, const Features& f, const std::optional<at::Tensor>& sinks,
                             const at::Tensor& q) {
  if (!f.has_sinks) return at::empty({0}, q.options());
  if (!dsink_accum.defined()) return at::zeros_like(*sinks);
  return dsink_accum.to(at::kDouble).sum(at::IntArrayRef{0, 2}).neg().to(sinks->scalar_type());
}

// A variable-length batch's fields (FwdParams, general path): its offsets as the kernels read them (int32,
// contiguous; the tensors the caller keeps alive until the launch, returned), and the packed totals.
std::vector<at::Tensor> fill_varlen_params(FwdParams& p, const VarlenShape& vs, const at::Tensor& cu_seqlens_q,
                                           const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k) {
  std::vector<at::Tensor> keep{cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()};
  p.cu_seqlens_q = keep[0].data_ptr<int>();
  p.cu_seqlens_k = keep[1].data_ptr<int>();
  if (seqused_k.has_value()) {
    keep.push_back(seqused_k->contiguous());
    p.seqused_k = keep.back().data_ptr<int>();
  }
  p.total_q = static_cast<int>(vs.total_q);
  p.total_k = static_cast<int>(vs.total_k);
  return keep;
}

// The totals a varlen batch may have on CUDA: int32 row indices, and the backward's workspace rows
// (total_q + 128 batch, csrc/kernels/seqinfo.cuh) in 31 bits.
void check_varlen_cuda(const VarlenShape& vs) {
  TORCH_CHECK(varlen_ws_rows(vs.total_q, vs.s.batch) < std::numeric_limits<int>::max() &&
                  vs.total_k < std::numeric_limits<int>::max(),
              "attention_varlen on CUDA: total_q + 128 * batch and total_k must fit in 31 bits, got total_q = ",
              fmt(vs.total_q), ", batch = ", fmt(vs.s.batch), ", total_k = ", fmt(vs.total_k));
}

// Launches the forward: the sm90 family where it applies (and FLASH_EXT_BACKEND allows), else sm80.
void launch_forward(const FwdParams& params, const cudaDeviceProp* props, cudaStream_t stream) {
  bool launched = false;
#ifdef FLASH_EXT_WITH_SM90
  if (want_sm90(props) && sm90_fwd_supported(params)) {
    launched = dispatch_fwd_sm90(round_head_dim(params.head_dim, kSm90FwdHeadDims, std::size(kSm90FwdHeadDims)),
                                 params, stream);
  }
#else
  want_sm90(props);  // rejects FLASH_EXT_BACKEND=sm90 in a build without the Hopper kernels
#endif
  if (!launched) {
    launched = dispatch_fwd_sm80(round_head_dim(params.head_dim, kSm80FwdHeadDims, std::size(kSm80FwdHeadDims)),
                                 params, stream);
  }
  TORCH_CHECK(launched, "flash_ext: no CUDA forward kernel for head_dim ", fmt(params.head_dim),
              " (the kernel head dim) runs on this device");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, std::optional<double> softmax_scale,
    bool causal_in, bool /*deterministic*/, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
    int64_t attention_chunk, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_kv,
    const std::optional<at::Tensor>& block_q, int64_t block_size, double dropout_p,
    const std::optional<at::Tensor>& dropout_rng) {
  const AttnShape s = check_qkv(q_in, k_in, v_in);
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  // Every issue-15 feature runs on CUDA (docs/ARCHITECTURE.md, "Issue 15 plan"); check_features checks them as on
  // the CPU.
  Features f = check_features(q_in, s, causal_in, window_left, window_right, softcap, alibi_slopes, attn_bias,
                              attention_chunk, sinks);
  if (check_dropout(q_in, dropout_p, dropout_rng)) f.dropout_p = dropout_p;
  TORCH_CHECK_NOT_IMPLEMENTED(cuda_dropout_enabled(f), kCudaDropoutOff);
  const BlockSparse sp = check_block_sparse(q_in, s, block_kv, block_q, block_size);
  if (sp.on) {  // the block mask folded into attn_bias for now (csrc/block_mask_as_bias.h)
    return attention_forward_cuda(q_in, k_in, v_in, softmax_scale, causal_in, false, window_left, window_right,
                                  softcap, alibi_slopes, block_mask_as_bias(*block_kv, attn_bias, s, sp),
                                  attention_chunk, sinks, std::nullopt, std::nullopt, 0, dropout_p, dropout_rng);
  }
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaDeviceProp* props = check_cuda_inputs(q_in, s);

  const int64_t hd = kernel_head_dim(s.head_dim);
  at::Tensor out = at::empty({s.batch, s.seqlen_q, s.nheads, hd}, q_in.options());
  at::Tensor lse = at::empty({s.batch, s.nheads, s.seqlen_q}, q_in.options().dtype(at::kFloat));
  if (s.batch == 0 || s.seqlen_q == 0 || s.nheads == 0) return {caller_head_dim(out, s.head_dim), lse};
  if (s.seqlen_k == 0) {  // no key: out 0, lse -inf (with sinks: the sink, as for any row that sees no key)
    out.zero_();
    if (f.has_sinks) {
      lse.copy_(float_for_kernels(sinks).view({1, s.nheads, 1}).expand_as(lse));
    } else {
      lse.fill_(-std::numeric_limits<float>::infinity());
    }
    return {caller_head_dim(out, s.head_dim), lse};
  }
  const at::Tensor q = kernel_ready(q_in, hd), k = kernel_ready(k_in, hd), v = kernel_ready(v_in, hd);
  FwdParams params;
  fill_fwd_params(params, q, k, v, out, lse, s, scale, f, props);
  const at::Tensor alibi = float_for_kernels(alibi_slopes), sinks_f32 = float_for_kernels(sinks);
  fill_score_mod_params(params, f, alibi, sinks_f32, scale);
  const at::Tensor bias = bias_for_kernels(attn_bias);
  fill_bias_params(params, bias, q);
  const at::Tensor rng = f.dropout_p > 0.0 ? dropout_rng->contiguous() : at::Tensor();
  fill_dropout_params(params, f, rng);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  launch_forward(params, props, stream);
  return {caller_head_dim(out, s.head_dim), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double softmax_scale, bool causal_in, bool deterministic,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& attn_bias, int64_t attention_chunk, const std::optional<at::Tensor>& sinks,
    bool bias_requires_grad, const std::optional<at::Tensor>& block_kv, const std::optional<at::Tensor>& block_q,
    int64_t block_size, double dropout_p, const std::optional<at::Tensor>& dropout_rng) {
  const AttnShape s = check_qkv(q_in, k_in, v_in);
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  Features f = check_features(q_in, s, causal_in, window_left, window_right, softcap, alibi_slopes, attn_bias,
                              attention_chunk, sinks, bias_requires_grad);
  if (check_dropout(q_in, dropout_p, dropout_rng)) f.dropout_p = dropout_p;
  TORCH_CHECK_NOT_IMPLEMENTED(cuda_dropout_enabled(f), kCudaDropoutOff);
  const BlockSparse sp = check_block_sparse(q_in, s, block_kv, block_q, block_size);
  if (sp.on) {  // as the forward: the block mask folded into attn_bias (csrc/block_mask_as_bias.h)
    auto [dq, dk, dv, dbias, dsinks] = attention_backward_cuda(
        dout_in, q_in, k_in, v_in, out_in, lse_in, softmax_scale, causal_in, deterministic, window_left, window_right,
        softcap, alibi_slopes, block_mask_as_bias(*block_kv, attn_bias, s, sp), attention_chunk, sinks,
        bias_requires_grad, std::nullopt, std::nullopt, 0, dropout_p, dropout_rng);
    if (bias_requires_grad) dbias = block_dbias(dbias, *attn_bias);
    return std::make_tuple(dq, dk, dv, dbias, dsinks);
  }
  check_bwd_args(dout_in, q_in, out_in, lse_in, s);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaDeviceProp* props = check_cuda_inputs(q_in, s);

  const int64_t hd = kernel_head_dim(s.head_dim);
  at::Tensor dq = at::empty({s.batch, s.seqlen_q, s.nheads, hd}, q_in.options());
  at::Tensor dk = at::empty({s.batch, s.seqlen_k, s.nheads_k, hd}, q_in.options());
  at::Tensor dv = at::empty({s.batch, s.seqlen_k, s.nheads_k, hd}, q_in.options());
  at::Tensor dbias_full;  // allocated below, once the shapes are known to be non-empty
  // dbias (bias_requires_grad): the kernels' dS (dbias_full) summed over the bias's dims of size 1, in its dtype and
  // sizes; zeros where no kernel ran. dsinks (with sinks): dsink_h = -sum over (b, i, j) of
  // exp(sink_h - lse[b, h, i]) P_ij dP_ij (docs/ARCHITECTURE.md), whose terms the key-side kernels add up in the
  // slots of dsink_accum (BwdParams::dsink_accum; undefined: no kernel ran, dsinks = 0), summed here in float64.
  at::Tensor dsink_accum;
  auto results = [&]() {
    const at::Tensor dsinks = dsinks_from_slots(dsink_accum, f, sinks, q_in);
    at::Tensor dbias = at::empty({0}, q_in.options());
    if (bias_requires_grad) {
      const at::Tensor& bias = *attn_bias;
      if (dbias_full.defined()) {
        std::vector<int64_t> dims;
        for (int64_t d = 0; d < 4; ++d)
          if (bias.size(d) == 1) dims.push_back(d);
        dbias = (dims.empty() ? dbias_full : dbias_full.sum(dims, /*keepdim=*/true)).to(bias.scalar_type());
      } else {
        dbias = at::zeros(bias.sizes(), bias.options());
      }
    }
    return std::make_tuple(caller_head_dim(dq, s.head_dim), caller_head_dim(dk, s.head_dim),
                           caller_head_dim(dv, s.head_dim), dbias, dsinks);
  };
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0 || s.nheads == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return results();
  }
  const at::Tensor q = kernel_ready(q_in, hd), k = kernel_ready(k_in, hd), v = kernel_ready(v_in, hd);
  const at::Tensor out = kernel_ready(out_in, hd), dout = kernel_ready(dout_in, hd);
  // lse rows are read as float vectors and by bulk copies: contiguous and 16-byte aligned (a copy otherwise).
  const at::Tensor lse = reinterpret_cast<uintptr_t>(lse_in.data_ptr()) % 16 == 0 && lse_in.is_contiguous()
                             ? lse_in
                             : at::empty(lse_in.sizes(), lse_in.options()).copy_(lse_in);

  BwdParams params;
  fill_bwd_params(params, dout, q, k, v, out, lse, dq, dk, dv, s, scale, f, deterministic, props);
  const at::Tensor alibi = float_for_kernels(alibi_slopes), sinks_f32 = float_for_kernels(sinks);
  fill_score_mod_params(params, f, alibi, sinks_f32, scale);
  const at::Tensor bias = bias_for_kernels(attn_bias);
  fill_bias_params(params, bias, q);
  const at::Tensor rng = f.dropout_p > 0.0 ? dropout_rng->contiguous() : at::Tensor();
  fill_dropout_params(params, f, rng);
  // dbias: dS of every (batch, head, row, key) in float32 (zero where no tile ran: masked, or a key block no query
  // block sees), summed over the bias's broadcast dims below.
  if (bias_requires_grad) {
    TORCH_CHECK(s.seqlen_q * s.seqlen_k < std::numeric_limits<int32_t>::max(), "attn_bias's gradient on CUDA: "
                "seqlen_q * seqlen_k must be below 2^31, got ", fmt(s.seqlen_q), " x ", fmt(s.seqlen_k));
    dbias_full = at::zeros({s.batch, s.nheads, s.seqlen_q, s.seqlen_k}, q.options().dtype(at::kFloat));
    params.dbias_accum = dbias_full.data_ptr<float>();
  }
  if (f.has_sinks) {  // one float32 slot per (batch, head, key-side warp) (score_mod.cuh, dsink_slot)
    params.dsink_slots = static_cast<int>(kDsinkSlotsPer128Keys * ((s.seqlen_k + 127) / 128));
    dsink_accum = at::zeros({s.batch, s.nheads, params.dsink_slots}, q.options().dtype(at::kFloat));
    params.dsink_accum = dsink_accum.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // Workspace: dQ accumulated in float32, D = rowsum(dO * O). Both are written (zeroed) by the kernels.
  auto workspace = [&](int head_dim_rounded) {
    params.head_dim_rounded = head_dim_rounded;
    at::Tensor dq_accum = at::empty({s.batch, s.nheads, params.seqlen_q_rounded, head_dim_rounded},
                                    q.options().dtype(at::kFloat));
    at::Tensor dsoftmax_sum = at::empty({s.batch, s.nheads, params.seqlen_q_rounded}, q.options().dtype(at::kFloat));
    params.dq_accum = dq_accum.data_ptr<float>();
    params.dsoftmax_sum = dsoftmax_sum.data_ptr<float>();
    return std::make_pair(dq_accum, dsoftmax_sum);
  };

  bool launched = false;
#ifdef FLASH_EXT_WITH_SM90
  if (want_sm90(props)) {
    const int inst = round_head_dim(params.head_dim, kSm90BwdHeadDims, std::size(kSm90BwdHeadDims));
    if (inst > 0) {  // head dims above the largest sm90 backward instantiation run on sm80
      auto ws = workspace(inst);
      // lse * log2 e per query row (+inf where P = 0), written by the sm90 preprocess kernel.
      // 4 floats more: their first is the tile counter of the persistent causal kernel (zeroed by the kernels).
      const int64_t lse_rows = static_cast<int64_t>(s.batch) * s.nheads * params.seqlen_q_rounded;
      at::Tensor lse_log2 = at::empty({lse_rows + 4}, q.options().dtype(at::kFloat));
      params.lse_log2 = lse_log2.data_ptr<float>();
      params.tile_counter = reinterpret_cast<int*>(params.lse_log2 + lse_rows);
      // Deterministic mode: one int32 counter per 64 query rows orders the dQ adds (zeroed by the kernels).
      at::Tensor dq_semaphore;
      if (deterministic) {
        dq_semaphore = at::empty({s.batch, s.nheads, params.seqlen_q_rounded / 64}, q.options().dtype(at::kInt));
        params.dq_semaphore = dq_semaphore.data_ptr<int>();
      }
      if (sm90_bwd_supported(params)) {
        launched = dispatch_bwd_sm90(inst, params, stream);
        TORCH_CHECK(launched, "flash_ext: the sm90 backward did not take head_dim ", fmt(s.head_dim));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return results();
      }
    }
  }
#else
  want_sm90(props);
#endif
  const int inst = round_head_dim(params.head_dim, kSm80BwdHeadDims, std::size(kSm80BwdHeadDims));
  auto ws = workspace(inst);
  params.dq_semaphore = nullptr;  // sm80 uses none of them
  params.lse_log2 = nullptr;
  params.tile_counter = nullptr;
  launched = dispatch_bwd_sm80(inst, params, stream);
  TORCH_CHECK(launched, "flash_ext: no CUDA backward kernel for head_dim ", fmt(s.head_dim),
              " runs on this device (kernel head dim ", fmt(inst),
              "; its sm80 tiles need more shared memory per block than the device has, or FLASH_EXT_SM80_SMEM_LIMIT)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return results();
}

// Variable-length batches, forward: the general path of either family reads the sequences from cu_seqlens itself
// (csrc/kernels/seqinfo.cuh), one launch over (longest query blocks, heads, sequences), no host synchronization.
// The kernel writes lse in the caller's (nheads, total_q) layout (SeqInfo::lse_offset); rows of no sequence keep
// -inf.
std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k,
    std::optional<double> softmax_scale, bool causal, bool /*deterministic*/, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t attention_chunk,
    const std::optional<at::Tensor>& sinks) {
  const VarlenShape vs =
      check_varlen(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k);
  const AttnShape& s = vs.s;
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  const Features f = check_features(q_in, s, causal, window_left, window_right, softcap, alibi_slopes, std::nullopt,
                                    attention_chunk, sinks);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaDeviceProp* props = check_cuda_inputs(q_in, s);
  check_varlen_cuda(vs);

  const int64_t hd = kernel_head_dim(s.head_dim);
  // Zeros and -inf: rows of q outside every sequence (before cu_seqlens_q[0], past cu_seqlens_q[batch]) keep them,
  // as no kernel writes there.
  at::Tensor out = at::zeros({1, vs.total_q, s.nheads, hd}, q_in.options());
  at::Tensor lse = at::full({s.nheads, vs.total_q}, -std::numeric_limits<float>::infinity(),
                            q_in.options().dtype(at::kFloat));
  if (s.batch == 0 || vs.total_q == 0 || s.nheads == 0 || s.seqlen_q == 0) {
    return {caller_head_dim(out, s.head_dim).select(0, 0), lse};
  }
  if (vs.total_k == 0 || s.seqlen_k == 0) {  // no key anywhere: out 0, lse -inf (with sinks: the sink)
    if (f.has_sinks) lse.copy_(float_for_kernels(sinks).view({s.nheads, 1}).expand_as(lse));
    return {caller_head_dim(out, s.head_dim).select(0, 0), lse};
  }
  const at::Tensor q = kernel_ready(q_in.unsqueeze(0), hd), k = kernel_ready(k_in.unsqueeze(0), hd),
                   v = kernel_ready(v_in.unsqueeze(0), hd);
  FwdParams params;
  fill_fwd_params(params, q, k, v, out, lse, s, scale, f, props, /*varlen=*/true);
  const std::vector<at::Tensor> offsets = fill_varlen_params(params, vs, cu_seqlens_q, cu_seqlens_k, seqused_k);
  const at::Tensor alibi = float_for_kernels(alibi_slopes), sinks_f32 = float_for_kernels(sinks);
  fill_score_mod_params(params, f, alibi, sinks_f32, scale);
  launch_forward(params, props, c10::cuda::getCurrentCUDAStream().stream());
  return {caller_head_dim(out, s.head_dim).select(0, 0), lse};
}

// Variable-length batches, backward: the sm80 family's general path, one launch of each kernel over
// (longest blocks, heads, sequences), no host synchronization. lse is read in the caller's (nheads, total_q)
// layout; D and the dQ accumulator are (nheads, total_q + 128 batch) rows (csrc/kernels/seqinfo.cuh, ws_offset),
// not batch x longest. dq, dk, dv start as zeros: rows of no sequence (past cu_seqlens[batch], keys past
// seqused_k) get no kernel's write.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k, double softmax_scale,
    bool causal, bool deterministic, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, int64_t attention_chunk, const std::optional<at::Tensor>& sinks) {
  const VarlenShape vs =
      check_varlen(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k);
  const AttnShape& s = vs.s;
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  const Features f = check_features(q_in, s, causal, window_left, window_right, softcap, alibi_slopes, std::nullopt,
                                    attention_chunk, sinks);
  check_varlen_bwd_args(dout_in, q_in, out_in, lse_in, vs);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const cudaDeviceProp* props = check_cuda_inputs(q_in, s);
  check_varlen_cuda(vs);

  const int64_t hd = kernel_head_dim(s.head_dim);
  at::Tensor dq = at::zeros({1, vs.total_q, s.nheads, hd}, q_in.options());
  at::Tensor dk = at::zeros({1, vs.total_k, s.nheads_k, hd}, q_in.options());
  at::Tensor dv = at::zeros({1, vs.total_k, s.nheads_k, hd}, q_in.options());
  at::Tensor dsink_accum;  // the key-side kernels' dsinks terms (BwdParams::dsink_accum), summed in float64
  auto results = [&]() {
    const at::Tensor dsinks = dsinks_from_slots(dsink_accum, f, sinks, q_in);
    return std::make_tuple(caller_head_dim(dq, s.head_dim).select(0, 0), caller_head_dim(dk, s.head_dim).select(0, 0),
                           caller_head_dim(dv, s.head_dim).select(0, 0), dsinks);
  };
  if (s.batch == 0 || vs.total_q == 0 || vs.total_k == 0 || s.seqlen_q == 0 || s.seqlen_k == 0 || s.nheads == 0) {
    return results();
  }
  const at::Tensor q = kernel_ready(q_in.unsqueeze(0), hd), k = kernel_ready(k_in.unsqueeze(0), hd),
                   v = kernel_ready(v_in.unsqueeze(0), hd);
  const at::Tensor out = kernel_ready(out_in.unsqueeze(0), hd), dout = kernel_ready(dout_in.unsqueeze(0), hd);
  const at::Tensor lse = lse_in.contiguous();

  BwdParams params;
  fill_bwd_params(params, dout, q, k, v, out, lse, dq, dk, dv, s, scale, f, deterministic, props, /*varlen=*/true);
  const std::vector<at::Tensor> offsets = fill_varlen_params(params, vs, cu_seqlens_q, cu_seqlens_k, seqused_k);
  const at::Tensor alibi = float_for_kernels(alibi_slopes), sinks_f32 = float_for_kernels(sinks);
  fill_score_mod_params(params, f, alibi, sinks_f32, scale);
  if (f.has_sinks) {  // one float32 slot per (sequence, head, key-side warp) (score_mod.cuh, dsink_slot)
    params.dsink_slots = static_cast<int>(kDsinkSlotsPer128Keys * ((s.seqlen_k + 127) / 128));
    dsink_accum = at::zeros({s.batch, s.nheads, params.dsink_slots}, q.options().dtype(at::kFloat));
    params.dsink_accum = dsink_accum.data_ptr<float>();
  }
  // Workspaces: D and the dQ accumulator in (nheads, ws_rows) rows (SeqInfoT::ws_offset), written by the kernels.
  const int64_t ws_rows = varlen_ws_rows(vs.total_q, s.batch);  // (csrc/kernels/seqinfo.cuh)
  auto workspace = [&](int head_dim_rounded) {
    params.head_dim_rounded = head_dim_rounded;
    at::Tensor dq_accum = at::empty({s.nheads, ws_rows, head_dim_rounded}, q.options().dtype(at::kFloat));
    at::Tensor dsoftmax_sum = at::empty({s.nheads, ws_rows}, q.options().dtype(at::kFloat));
    params.dq_accum = dq_accum.data_ptr<float>();
    params.dsoftmax_sum = dsoftmax_sum.data_ptr<float>();
    return std::make_pair(dq_accum, dsoftmax_sum);
  };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
#ifdef FLASH_EXT_WITH_SM90
  // The sm90 varlen backward (head dims up to 128) is written but has not yet run on a GPU: it runs only with
  // FLASH_EXT_SM90_VARLEN_BWD=1 until the tests have passed on it (docs/ARCHITECTURE.md, "Variable-length batches").
  const char* sm90_bwd_env = std::getenv("FLASH_EXT_SM90_VARLEN_BWD");
  if (want_sm90(props) && sm90_bwd_env != nullptr && std::strcmp(sm90_bwd_env, "1") == 0) {
    const int inst = round_head_dim(params.head_dim, kSm90BwdHeadDims, std::size(kSm90BwdHeadDims));
    if (inst > 0 && inst <= 128) {
      auto ws = workspace(inst);
      // lse * log2 e per workspace row (+inf where P = 0), then the tile counter (4 floats), as in the dense call.
      at::Tensor lse_log2 = at::empty({s.nheads * ws_rows + 4}, q.options().dtype(at::kFloat));
      params.lse_log2 = lse_log2.data_ptr<float>();
      params.tile_counter = reinterpret_cast<int*>(params.lse_log2 + s.nheads * ws_rows);
      at::Tensor dq_semaphore;  // deterministic: one counter per 64 workspace rows
      if (deterministic) {
        dq_semaphore = at::empty({s.nheads, ws_rows / 64}, q.options().dtype(at::kInt));
        params.dq_semaphore = dq_semaphore.data_ptr<int>();
      }
      if (sm90_bwd_supported(params)) {
        TORCH_CHECK(dispatch_bwd_sm90(inst, params, stream), "flash_ext: the sm90 varlen backward did not take head_dim ",
                    fmt(s.head_dim));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return results();
      }
      params.lse_log2 = nullptr, params.tile_counter = nullptr, params.dq_semaphore = nullptr;
    }
  }
#endif
  want_sm90(props);  // (checks FLASH_EXT_BACKEND)
  const int inst = round_head_dim(params.head_dim, kSm80BwdHeadDims, std::size(kSm80BwdHeadDims));
  auto ws = workspace(inst);
  const bool launched = dispatch_bwd_sm80(inst, params, stream);
  TORCH_CHECK(launched, "flash_ext: no CUDA backward kernel for head_dim ", fmt(s.head_dim),
              " runs on this device (kernel head dim ", fmt(inst),
              "; its sm80 tiles need more shared memory per block than the device has, or FLASH_EXT_SM80_SMEM_LIMIT)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return results();
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_ext, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_varlen_forward", &attention_varlen_forward_cuda);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cuda);
}

}  // namespace flash_ext
