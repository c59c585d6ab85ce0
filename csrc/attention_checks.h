// Argument checks shared by the CPU and CUDA implementations (torch-dependent; never included by
// csrc/kernels). Every failure names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

namespace flash_ext {
// Internal linkage: this header is compiled both by the host compiler (cpu/) and by nvcc (cuda/); one
// private copy per translation unit keeps the two from being merged as the same inline function.
namespace {

// Numbers in error messages are formatted here, not through std::ostream: with a compiler whose
// libstdc++ headers and runtime library differ (seen on the H200 image: /opt/gcc's g++ with GCC 13
// headers, linked with -Bsymbolic-functions), an `ostream << long` instantiated inside this library
// crashes. Strings, dtypes and devices go through c10's own formatting and are safe.
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
std::string fmt(Int v) {
  return std::to_string(v);
}
inline std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string fmt(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

struct AttnShape {
  int64_t batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim;
};

inline AttnShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must be a 4-D tensor (batch, seqlen_q, nheads, head_dim), got ", fmt(q.dim()),
              "-D");
  TORCH_CHECK(k.dim() == 4, "k must be a 4-D tensor (batch, seqlen_k, nheads_k, head_dim), got ", fmt(k.dim()),
              "-D");
  TORCH_CHECK(v.dim() == 4, "v must be a 4-D tensor (batch, seqlen_k, nheads_k, head_dim), got ", fmt(v.dim()),
              "-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the same dtype as q (", q.scalar_type(),
              "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have the same dtype as q (", q.scalar_type(),
              "), got ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on the same device as q (", q.device(), "), got ",
              k.device());
  TORCH_CHECK(v.device() == q.device(), "v must be on the same device as q (", q.device(), "), got ",
              v.device());
  AttnShape s;
  s.batch = q.size(0);
  s.seqlen_q = q.size(1);
  s.nheads = q.size(2);
  s.head_dim = q.size(3);
  s.seqlen_k = k.size(1);
  s.nheads_k = k.size(2);
  TORCH_CHECK(k.size(0) == s.batch, "k must have the batch size of q (", fmt(s.batch), "), got ", fmt(k.size(0)));
  TORCH_CHECK(v.size(0) == s.batch, "v must have the batch size of q (", fmt(s.batch), "), got ", fmt(v.size(0)));
  TORCH_CHECK(k.size(3) == s.head_dim, "k must have the head_dim of q (", fmt(s.head_dim), "), got ", fmt(k.size(3)));
  TORCH_CHECK(v.size(3) == s.head_dim, "v must have the head_dim of q (", fmt(s.head_dim), "), got ", fmt(v.size(3)));
  TORCH_CHECK(v.size(1) == s.seqlen_k && v.size(2) == s.nheads_k,
              "v must have the (seqlen_k, nheads_k) of k (", fmt(s.seqlen_k), ", ", fmt(s.nheads_k), "), got (",
              fmt(v.size(1)), ", ", fmt(v.size(2)), ")");
  TORCH_CHECK(s.head_dim > 0, "q must have head_dim > 0");
  TORCH_CHECK(s.nheads_k > 0 || s.nheads == 0, "k must have nheads_k > 0");
  TORCH_CHECK(s.nheads_k == 0 || s.nheads % s.nheads_k == 0, "q's nheads (", fmt(s.nheads),
              ") must be divisible by k's nheads_k (", fmt(s.nheads_k), ")");
  // Any strides are accepted: the CPU path reads strided tiles as they are, the CUDA path copies what its
  // kernels cannot read (csrc/cuda/attention_api.cu, kernel_ready).
  return s;
}

// Resolves the optional scale (default 1/sqrt(head_dim)) and rejects non-positive or non-finite ones.
inline double resolve_scale(std::optional<double> softmax_scale, int64_t head_dim) {
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(head_dim));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "softmax_scale must be a finite number > 0, got ", fmt(scale));
  return scale;
}

inline void check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                           const at::Tensor& lse, const AttnShape& s) {
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q ", fmt(q.sizes()), ", got ", fmt(dout.sizes()));
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", fmt(q.sizes()), ", got ", fmt(out.sizes()));
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "dout must have the dtype of q (", q.scalar_type(),
              "), got ", dout.scalar_type());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have the dtype of q (", q.scalar_type(),
              "), got ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.nheads && lse.size(2) == s.seqlen_q,
              "lse must have shape (batch, nheads, seqlen_q) = (", fmt(s.batch), ", ", fmt(s.nheads), ", ",
              fmt(s.seqlen_q), "), got ", fmt(lse.sizes()));
  TORCH_CHECK(dout.device() == q.device(), "dout must be on the device of q (", q.device(), "), got ",
              dout.device());
  TORCH_CHECK(out.device() == q.device(), "out must be on the device of q (", q.device(), "), got ",
              out.device());
  TORCH_CHECK(lse.device() == q.device(), "lse must be on the device of q (", q.device(), "), got ",
              lse.device());
}

}  // namespace
}  // namespace flash_ext
