// flash_ext op schemas (one TORCH_LIBRARY block), the device-independent `attention` op, and the
// Python module init stub. Device implementations live in cpu/ and cuda/; autograd and fake (meta)
// kernels are registered from Python (flash_ext/ops.py).
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace flash_ext {

TORCH_LIBRARY(flash_ext, m) {
  // out: (batch, seqlen_q, nheads, head_dim) in q's dtype; lse: (batch, nheads, seqlen_q) float32,
  // natural-log log-sum-exp of the scaled scores (-inf for a row that sees no key).
  // `deterministic` is not used by the forward (always deterministic); autograd passes it on to
  // attention_backward.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "bool deterministic=False) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float softmax_scale, bool causal, bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)");
  // What users call: returns out and is differentiable through attention_forward's autograd.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False, "
      "bool deterministic=False) -> Tensor");
}

static at::Tensor attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      std::optional<double> softmax_scale, bool causal,
                                      bool deterministic) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("flash_ext::attention_forward", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            std::optional<double>, bool, bool)>();
  return std::get<0>(fwd.call(q, k, v, softmax_scale, causal, deterministic));
}

TORCH_LIBRARY_IMPL(flash_ext, CompositeImplicitAutograd, m) {
  m.impl("attention", &attention_composite);
}

// torch.autocast: like SDPA, the ops run in the autocast dtype (float16 / bfloat16): floating inputs other than
// float64 are cast to it (lse stays float32), then the op runs with autocast off. `attention` needs no entry of
// its own: it goes through attention_forward. The casts are recorded by autograd, so gradients reach float32
// leaves in float32.
template <c10::DeviceType kDevice>
static std::tuple<at::Tensor, at::Tensor> attention_forward_autocast(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v,
                                                                     std::optional<double> softmax_scale,
                                                                     bool causal, bool deterministic) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flash_ext::attention_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, std::optional<double>, bool, bool)>();
  return op.call(at::autocast::cached_cast(to, q, kDevice), at::autocast::cached_cast(to, k, kDevice),
                 at::autocast::cached_cast(to, v, kDevice), softmax_scale, causal, deterministic);
}

template <c10::DeviceType kDevice>
static std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_autocast(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale, bool causal, bool deterministic) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("flash_ext::attention_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double, bool, bool)>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(to, t, kDevice); };
  return op.call(cast(dout), cast(q), cast(k), cast(v), cast(out), lse, softmax_scale, causal, deterministic);
}

TORCH_LIBRARY_IMPL(flash_ext, AutocastCUDA, m) {
  m.impl("attention_forward", &attention_forward_autocast<c10::DeviceType::CUDA>);
  m.impl("attention_backward", &attention_backward_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(flash_ext, AutocastCPU, m) {
  m.impl("attention_forward", &attention_forward_autocast<c10::DeviceType::CPU>);
  m.impl("attention_backward", &attention_backward_autocast<c10::DeviceType::CPU>);
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
