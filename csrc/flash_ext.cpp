// flash_ext op schemas (one TORCH_LIBRARY block), the device-independent `attention` op, and the
// Python module init stub. Device implementations live in cpu/ and cuda/; autograd and fake (meta)
// kernels are registered from Python (flash_ext/ops.py).
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_checks.h"
#include "kernels/dropout.h"

namespace flash_ext {

// The arguments after `deterministic` are the masks and score modifiers of issue 15; their meaning, in the
// order they act on a score, is in docs/ARCHITECTURE.md ("Masks and score modifiers"). Defaults mean "off".
#define FLASH_EXT_FEATURE_ARGS                                                                             \
  "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, "              \
  "Tensor? attn_bias=None, int attention_chunk=0, Tensor? sinks=None"
// Block-sparse attention (docs/ARCHITECTURE.md, "Block-sparse attention"): a flash_ext.BlockMask's lists, the
// dense ops' last arguments (block_kv per query block, block_q per key block, both int32; block_size 64 or 128).
#define FLASH_EXT_BLOCK_ARGS "Tensor? block_kv=None, Tensor? block_q=None, int block_size=0"
// Attention dropout (docs/ARCHITECTURE.md, "Dropout"): the probability and the (seed, offset) int64 pair drawn from
// torch's generator (flash_ext/interface.py), which the backward gets again to regenerate the mask.
#define FLASH_EXT_DROPOUT_ARGS "float dropout_p=0.0, Tensor? dropout_rng=None"
// The varlen ops' features: those of the dense ops without attn_bias.
#define FLASH_EXT_VARLEN_FEATURE_ARGS                                                                      \
  "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, "              \
  "int attention_chunk=0, Tensor? sinks=None"

TORCH_LIBRARY(flash_ext, m) {
  // out: (batch, seqlen_q, nheads, head_dim) in q's dtype; lse: (batch, nheads, seqlen_q) float32,
  // natural-log log-sum-exp of the scores (with sinks: including exp(sink); -inf for a row that sees no key
  // and has no sink). `deterministic` is not used by the forward (always deterministic); autograd passes it
  // on to attention_backward.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "bool deterministic=False, " FLASH_EXT_FEATURE_ARGS ", " FLASH_EXT_BLOCK_ARGS ", " FLASH_EXT_DROPOUT_ARGS ") -> (Tensor out, Tensor lse)");
  // dbias: attn_bias's sizes and dtype when bias_requires_grad, else empty (numel 0); dsinks: sinks' shape
  // and dtype when sinks are given, else empty.
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float softmax_scale, bool causal, bool deterministic=False, " FLASH_EXT_FEATURE_ARGS
      ", bool bias_requires_grad=False, " FLASH_EXT_BLOCK_ARGS ", " FLASH_EXT_DROPOUT_ARGS
      ") -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias, Tensor dsinks)");
  // What users call: returns out and is differentiable through attention_forward's autograd.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "bool deterministic=False, " FLASH_EXT_FEATURE_ARGS ", " FLASH_EXT_BLOCK_ARGS ", " FLASH_EXT_DROPOUT_ARGS ") -> Tensor");
  // Variable-length batches (docs/ARCHITECTURE.md, "Variable-length batches"): q (total_q, nheads, head_dim), k / v
  // (total_k, nheads_k, head_dim); sequence b's rows are cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q and
  // cu_seqlens_k[b] .. + (seqused_k[b] or cu_seqlens_k[b + 1] - cu_seqlens_k[b]) of k / v; out (total_q, nheads,
  // head_dim), lse (nheads, total_q). Every feature of the dense op but attn_bias; dsinks as in attention_backward.
  m.def(
      "attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? seqused_k=None, float? softmax_scale=None, bool causal=False, "
      "bool deterministic=False, " FLASH_EXT_VARLEN_FEATURE_ARGS ") -> (Tensor out, Tensor lse)");
  m.def(
      "attention_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? seqused_k, "
      "float softmax_scale, bool causal, bool deterministic=False, " FLASH_EXT_VARLEN_FEATURE_ARGS
      ") -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)");
  m.def(
      "attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? seqused_k=None, float? softmax_scale=None, bool causal=False, "
      "bool deterministic=False, " FLASH_EXT_VARLEN_FEATURE_ARGS ") -> Tensor");
  // The keep mask (batch, nheads, seqlen_q, seqlen_k) bool that attention with dropout_p and dropout_rng uses
  // (csrc/kernels/dropout.h), on dropout_rng's device: a testing hook for small shapes (computed on the CPU).
  m.def("dropout_mask(Tensor dropout_rng, int batch, int nheads, int seqlen_q, int seqlen_k, float dropout_p) -> Tensor");
  // KV-cache attention (docs/ARCHITECTURE.md, "KV-cache attention"; csrc/kvcache.cpp), inference only: q (batch,
  // seqlen_q, nheads, head_dim) against the first cache_seqlens[b] (+ seqlen_new) keys of a contiguous cache
  // (batch_cache, seqlen_cache, nheads_k, head_dim) or a paged one (num_pages, page_size, nheads_k, head_dim) with
  // block_table (batch, max_pages); k / v (batch, seqlen_new, nheads_k, head_dim), when given, are written into the
  // caches in place at cache_seqlens[b]. out (batch, seqlen_q, nheads, head_dim), lse (batch, nheads, seqlen_q).
  m.def(
      "attention_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k=None, Tensor? v=None, "
      "Tensor? cache_seqlens=None, Tensor? cache_batch_idx=None, Tensor? block_table=None, "
      "float? softmax_scale=None, bool causal=False, int window_left=-1, int window_right=-1, float softcap=0.0, "
      "Tensor? alibi_slopes=None, int num_splits=0) -> (Tensor out, Tensor lse)");
}

using OptTensor = std::optional<at::Tensor>;
using FwdResult = std::tuple<at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FwdSig = FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<double>, bool, bool,
                         int64_t, int64_t, double, const OptTensor&, const OptTensor&, int64_t, const OptTensor&,
                         const OptTensor&, const OptTensor&, int64_t, double, const OptTensor&);
using BwdSig = BwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, double, bool, bool, int64_t, int64_t, double,
                         const OptTensor&, const OptTensor&, int64_t, const OptTensor&, bool, const OptTensor&,
                         const OptTensor&, int64_t, double, const OptTensor&);

using VarlenFwdSig = FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, int64_t, const OptTensor&, std::optional<double>, bool,
                               bool, int64_t, int64_t, double, const OptTensor&, int64_t, const OptTensor&);
using VarlenBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using VarlenBwdSig = VarlenBwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     int64_t, int64_t, const OptTensor&, double, bool, bool, int64_t, int64_t, double,
                                     const OptTensor&, int64_t, const OptTensor&);

static at::Tensor attention_varlen_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                             int64_t max_seqlen_q, int64_t max_seqlen_k, const OptTensor& seqused_k,
                                             std::optional<double> softmax_scale, bool causal, bool deterministic,
                                             int64_t window_left, int64_t window_right, double softcap,
                                             const OptTensor& alibi_slopes, int64_t attention_chunk,
                                             const OptTensor& sinks) {
  static auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("flash_ext::attention_varlen_forward", "").typed<VarlenFwdSig>();
  return std::get<0>(fwd.call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                              softmax_scale, causal, deterministic, window_left, window_right, softcap, alibi_slopes,
                              attention_chunk, sinks));
}

static at::Tensor attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      std::optional<double> softmax_scale, bool causal, bool deterministic,
                                      int64_t window_left, int64_t window_right, double softcap,
                                      const OptTensor& alibi_slopes, const OptTensor& attn_bias,
                                      int64_t attention_chunk, const OptTensor& sinks, const OptTensor& block_kv,
                                      const OptTensor& block_q, int64_t block_size, double dropout_p,
                                      const OptTensor& dropout_rng) {
  static auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("flash_ext::attention_forward", "").typed<FwdSig>();
  return std::get<0>(fwd.call(q, k, v, softmax_scale, causal, deterministic, window_left, window_right, softcap,
                              alibi_slopes, attn_bias, attention_chunk, sinks, block_kv, block_q, block_size, dropout_p, dropout_rng));
}

static at::Tensor dropout_mask(const at::Tensor& dropout_rng, int64_t batch, int64_t nheads, int64_t seqlen_q,
                               int64_t seqlen_k, double dropout_p) {
  check_dropout(dropout_rng, dropout_p, dropout_rng);
  TORCH_CHECK(batch >= 0 && nheads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
              "dropout_mask: batch, nheads, seqlen_q and seqlen_k must be >= 0");
  const at::Tensor r = dropout_rng.to(at::kCPU);
  const DropoutRng rng(static_cast<uint64_t>(r.data_ptr<int64_t>()[0]), static_cast<uint64_t>(r.data_ptr<int64_t>()[1]),
                       nheads, seqlen_q, seqlen_k, dropout_p);
  at::Tensor mask = at::empty({batch, nheads, seqlen_q, seqlen_k}, r.options().dtype(at::kBool));
  bool* mp = mask.data_ptr<bool>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < nheads; ++h)
      for (int64_t i = 0; i < seqlen_q; ++i)
        for (int64_t j = 0; j < seqlen_k; ++j) *mp++ = rng.keep(b, h, i, j);
  return mask.to(dropout_rng.device());
}

TORCH_LIBRARY_IMPL(flash_ext, CompositeExplicitAutograd, m) {
  m.impl("dropout_mask", &dropout_mask);
}

TORCH_LIBRARY_IMPL(flash_ext, CompositeImplicitAutograd, m) {
  m.impl("attention", &attention_composite);
  m.impl("attention_varlen", &attention_varlen_composite);
}

// torch.autocast: like SDPA, the ops run in the autocast dtype (float16 / bfloat16): q, k, v (and dout, out in
// the backward) other than float64 are cast to it (lse stays float32), then the op runs with autocast off.
// alibi_slopes, attn_bias and sinks are passed as they are: float32 is always legal for them (and so is a bias
// in q's pre-autocast dtype when that was float32). `attention` needs no entry of its own: it goes through
// attention_forward. The casts are recorded by autograd, so gradients reach float32 leaves in float32.
template <c10::DeviceType kDevice>
static FwdResult attention_forward_autocast(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            std::optional<double> softmax_scale, bool causal, bool deterministic,
                                            int64_t window_left, int64_t window_right, double softcap,
                                            const OptTensor& alibi_slopes, const OptTensor& attn_bias,
                                            int64_t attention_chunk, const OptTensor& sinks,
                                            const OptTensor& block_kv, const OptTensor& block_q, int64_t block_size,
                                            double dropout_p, const OptTensor& dropout_rng) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flash_ext::attention_forward", "").typed<FwdSig>();
  return op.call(at::autocast::cached_cast(to, q, kDevice), at::autocast::cached_cast(to, k, kDevice),
                 at::autocast::cached_cast(to, v, kDevice), softmax_scale, causal, deterministic, window_left,
                 window_right, softcap, alibi_slopes, attn_bias, attention_chunk, sinks, block_kv, block_q, block_size, dropout_p, dropout_rng);
}

template <c10::DeviceType kDevice>
static BwdResult attention_backward_autocast(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                             double softmax_scale, bool causal, bool deterministic,
                                             int64_t window_left, int64_t window_right, double softcap,
                                             const OptTensor& alibi_slopes, const OptTensor& attn_bias,
                                             int64_t attention_chunk, const OptTensor& sinks,
                                             bool bias_requires_grad, const OptTensor& block_kv,
                                             const OptTensor& block_q, int64_t block_size, double dropout_p,
                                      const OptTensor& dropout_rng) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flash_ext::attention_backward", "").typed<BwdSig>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(to, t, kDevice); };
  return op.call(cast(dout), cast(q), cast(k), cast(v), cast(out), lse, softmax_scale, causal, deterministic,
                 window_left, window_right, softcap, alibi_slopes, attn_bias, attention_chunk, sinks,
                 bias_requires_grad, block_kv, block_q, block_size, dropout_p, dropout_rng);
}

template <c10::DeviceType kDevice>
static FwdResult attention_varlen_forward_autocast(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                   const OptTensor& seqused_k, std::optional<double> softmax_scale,
                                                   bool causal, bool deterministic, int64_t window_left,
                                                   int64_t window_right, double softcap, const OptTensor& alibi_slopes,
                                                   int64_t attention_chunk, const OptTensor& sinks) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("flash_ext::attention_varlen_forward", "").typed<VarlenFwdSig>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(to, t, kDevice); };
  return op.call(cast(q), cast(k), cast(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
                 softmax_scale, causal, deterministic, window_left, window_right, softcap, alibi_slopes,
                 attention_chunk, sinks);
}

template <c10::DeviceType kDevice>
static VarlenBwdResult attention_varlen_backward_autocast(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const OptTensor& seqused_k, double softmax_scale, bool causal, bool deterministic,
    int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes, int64_t attention_chunk,
    const OptTensor& sinks) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flash_ext::attention_varlen_backward", "")
                       .typed<VarlenBwdSig>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(to, t, kDevice); };
  return op.call(cast(dout), cast(q), cast(k), cast(v), cast(out), lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, seqused_k, softmax_scale, causal, deterministic, window_left, window_right, softcap,
                 alibi_slopes, attention_chunk, sinks);
}

TORCH_LIBRARY_IMPL(flash_ext, AutocastCUDA, m) {
  m.impl("attention_forward", &attention_forward_autocast<c10::DeviceType::CUDA>);
  m.impl("attention_backward", &attention_backward_autocast<c10::DeviceType::CUDA>);
  m.impl("attention_varlen_forward", &attention_varlen_forward_autocast<c10::DeviceType::CUDA>);
  m.impl("attention_varlen_backward", &attention_varlen_backward_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(flash_ext, AutocastCPU, m) {
  m.impl("attention_forward", &attention_forward_autocast<c10::DeviceType::CPU>);
  m.impl("attention_backward", &attention_backward_autocast<c10::DeviceType::CPU>);
  m.impl("attention_varlen_forward", &attention_varlen_forward_autocast<c10::DeviceType::CPU>);
  m.impl("attention_varlen_backward", &attention_varlen_backward_autocast<c10::DeviceType::CPU>);
}

}  // namespace flash_ext

#ifndef FLASH_EXT_WITH_CUDA
#define FLASH_EXT_WITH_CUDA 0
#endif

// Importing flash_ext._C loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "with_cuda", FLASH_EXT_WITH_CUDA);
  }
  return module;
}
