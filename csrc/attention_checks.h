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


// The masks and score modifiers of issue 15 (docs/ARCHITECTURE.md, "Masks and score modifiers"), checked
// once for every device. `window_left` / `window_right` are resolved: causal sets the right bound to 0.
struct Features {
  int64_t window_left = -1, window_right = -1;  // -1: unbounded on that side
  int64_t attention_chunk = 0;                  // 0: off
  double softcap = 0.0;                         // 0: off
  bool has_alibi = false, has_bias = false, has_sinks = false;
  bool bias_is_bool = false;
  // Whether the mask is the plain causal one or none at all: the only masks the kernels ran before issue 15.
  bool mask_is_plain() const { return window_left < 0 && attention_chunk == 0; }
  bool is_causal_only() const { return mask_is_plain() && window_right == 0; }
};

// A per-head (or per-(batch, head)) float vector argument: alibi_slopes, sinks.
inline void check_head_vector(const at::Tensor& t, const char* name, const at::Tensor& q, const AttnShape& s,
                              bool allow_batch) {
  const bool shape_ok = (t.dim() == 1 && t.size(0) == s.nheads) ||
                        (allow_batch && t.dim() == 2 && t.size(0) == s.batch && t.size(1) == s.nheads);
  if (allow_batch) {
    TORCH_CHECK(shape_ok, name, " must have shape (nheads,) = (", fmt(s.nheads), ") or (batch, nheads) = (",
                fmt(s.batch), ", ", fmt(s.nheads), "), got ", fmt(t.sizes()));
  } else {
    TORCH_CHECK(shape_ok, name, " must have shape (nheads,) = (", fmt(s.nheads), "), got ", fmt(t.sizes()));
  }
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == q.scalar_type(), name,
              " must be float32 or q's dtype (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
}

// attn_bias: 4-D, each dim 1 or the full size of (batch, nheads, seqlen_q, seqlen_k) (a full-size dim may have
// stride 0: it is read in place), bool or float32 or q's dtype, on q's device.
inline void check_bias(const at::Tensor& bias, const at::Tensor& q, const AttnShape& s) {
  const int64_t full[4] = {s.batch, s.nheads, s.seqlen_q, s.seqlen_k};
  bool ok = bias.dim() == 4;
  for (int d = 0; d < 4 && ok; ++d) ok = bias.size(d) == 1 || bias.size(d) == full[d];
  TORCH_CHECK(ok, "attn_bias must be a 4-D tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k) = (",
              fmt(s.batch), ", ", fmt(s.nheads), ", ", fmt(s.seqlen_q), ", ", fmt(s.seqlen_k),
              ") (each dim 1 or that size), got ", fmt(bias.sizes()));
  const auto t = bias.scalar_type();
  TORCH_CHECK(t == at::kBool || t == at::kFloat || t == q.scalar_type(),
              "attn_bias must be bool (a mask), float32 or q's dtype (", q.scalar_type(), "), got ", t);
  TORCH_CHECK(bias.device() == q.device(), "attn_bias must be on the device of q (", q.device(), "), got ",
              bias.device());
}

// Every check of the issue-15 arguments; returns them resolved (causal -> right bound 0).
inline Features check_features(const at::Tensor& q, const AttnShape& s, bool causal, int64_t window_left,
                               int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                               const std::optional<at::Tensor>& attn_bias, int64_t attention_chunk,
                               const std::optional<at::Tensor>& sinks, bool bias_requires_grad = false) {
  TORCH_CHECK(window_left >= -1, "window_left (window_size[0]) must be >= -1 (-1: unbounded), got ", fmt(window_left));
  TORCH_CHECK(window_right >= -1, "window_right (window_size[1]) must be >= -1 (-1: unbounded), got ",
              fmt(window_right));
  TORCH_CHECK(attention_chunk >= 0, "attention_chunk must be >= 0 (0: off), got ", fmt(attention_chunk));
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be a finite number >= 0 (0: off), got ",
              fmt(softcap));
  Features f;
  f.window_left = window_left;
  f.window_right = causal ? 0 : window_right;
  f.attention_chunk = attention_chunk;
  f.softcap = softcap;
  if (alibi_slopes.has_value()) {
    check_head_vector(*alibi_slopes, "alibi_slopes", q, s, /*allow_batch=*/true);
    f.has_alibi = true;
  }
  if (sinks.has_value()) {
    check_head_vector(*sinks, "sinks", q, s, /*allow_batch=*/false);
    f.has_sinks = true;
  }
  if (attn_bias.has_value()) {
    check_bias(*attn_bias, q, s);
    f.has_bias = true;
    f.bias_is_bool = attn_bias->scalar_type() == at::kBool;
  }
  TORCH_CHECK(!bias_requires_grad || (f.has_bias && !f.bias_is_bool),
              f.has_bias ? "bias_requires_grad: attn_bias is a bool mask, and a gradient of a bool mask does not exist"
                         : "bias_requires_grad needs an attn_bias (none was passed)");
  return f;
}

}  // namespace
}  // namespace flash_ext
