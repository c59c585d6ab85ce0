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
#include <vector>
#include <algorithm>
#include <iterator>
#include <utility>

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

// A variable-length batch (attention_varlen_*): q (total_q, nheads, head_dim), k / v (total_k, nheads_k, head_dim),
// cu_seqlens_q / cu_seqlens_k int32 (batch + 1,), seqused_k int32 (batch,) or none, max_seqlen_q / max_seqlen_k the
// longest sequence of each (> 0, or 0 when that total is 0). `s` has batch = the sequence count and seqlen_q /
// seqlen_k = the max lengths, so that the feature checks (alibi_slopes of (batch, nheads)) apply unchanged. The
// values inside cu_seqlens / seqused_k are not read here (on CUDA that would synchronize): the CPU path checks
// them (check_varlen_values).
struct VarlenShape {
  AttnShape s;
  int64_t total_q, total_k;
};

inline void check_seqlen_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t len) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be a 1-D tensor, got ", fmt(t.dim()), "-D");
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
  if (len >= 0) TORCH_CHECK(t.size(0) == len, name, " must have ", fmt(len), " elements (batch), got ", fmt(t.size(0)));
}

inline VarlenShape check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k) {
  TORCH_CHECK(q.dim() == 3, "q must be a 3-D tensor (total_q, nheads, head_dim) in attention_varlen, got ",
              fmt(q.dim()), "-D");
  TORCH_CHECK(k.dim() == 3, "k must be a 3-D tensor (total_k, nheads_k, head_dim) in attention_varlen, got ",
              fmt(k.dim()), "-D");
  TORCH_CHECK(v.dim() == 3, "v must be a 3-D tensor (total_k, nheads_k, head_dim) in attention_varlen, got ",
              fmt(v.dim()), "-D");
  TORCH_CHECK(v.size(0) == k.size(0), "v must have the total_k of k (", fmt(k.size(0)), "), got ", fmt(v.size(0)));
  check_seqlen_tensor(cu_seqlens_q, "cu_seqlens_q", q, -1);
  TORCH_CHECK(cu_seqlens_q.size(0) >= 1, "cu_seqlens_q must have batch + 1 >= 1 elements, got 0");
  check_seqlen_tensor(cu_seqlens_k, "cu_seqlens_k", q, cu_seqlens_q.size(0));
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  if (seqused_k.has_value()) check_seqlen_tensor(*seqused_k, "seqused_k", q, batch);
  // The dense checks on (1, total, heads, head_dim) views: dtypes, devices, head dims, the GQA ratio.
  AttnShape s = check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0));
  VarlenShape vs{s, q.size(0), k.size(0)};
  TORCH_CHECK(max_seqlen_q > 0 || (max_seqlen_q == 0 && vs.total_q == 0),
              "max_seqlen_q must be > 0 (the longest query sequence; 0 only when q has no rows), got ",
              fmt(max_seqlen_q));
  TORCH_CHECK(max_seqlen_k > 0 || (max_seqlen_k == 0 && vs.total_k == 0),
              "max_seqlen_k must be > 0 (the longest key sequence; 0 only when k has no rows), got ",
              fmt(max_seqlen_k));
  vs.s.batch = batch;
  vs.s.seqlen_q = max_seqlen_q;
  vs.s.seqlen_k = max_seqlen_k;
  return vs;
}

// One sequence of a variable-length batch, from the values of cu_seqlens / seqused_k (CPU).
struct VarlenSeq {
  int64_t q0, seqlen_q, k0, seqlen_k;
};

// The values' contract (checked on the CPU, the caller's on CUDA): cu_seqlens non-decreasing from >= 0 to at most
// the total, every length <= its max_seqlen, 0 <= seqused_k[b] <= cu_seqlens_k[b + 1] - cu_seqlens_k[b].
inline std::vector<VarlenSeq> check_varlen_values(const VarlenShape& vs, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& cu_seqlens_k,
                                                  const std::optional<at::Tensor>& seqused_k) {
  const at::Tensor cq = cu_seqlens_q.to(at::kCPU).contiguous(), ck = cu_seqlens_k.to(at::kCPU).contiguous();
  const int32_t* q_off = cq.data_ptr<int32_t>();
  const int32_t* k_off = ck.data_ptr<int32_t>();
  at::Tensor used;
  if (seqused_k.has_value()) used = seqused_k->to(at::kCPU).contiguous();
  auto check_offsets = [](const int32_t* off, int64_t batch, int64_t total, int64_t max_len, const char* name,
                          const char* max_name) {
    TORCH_CHECK(off[0] >= 0, name, "[0] must be >= 0, got ", fmt(off[0]));
    TORCH_CHECK(off[batch] <= total, name, "[batch] = ", fmt(off[batch]), " must not exceed the total rows ",
                fmt(total));
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(off[b + 1] >= off[b], name, " must be non-decreasing, got ", fmt(off[b]), " then ",
                  fmt(off[b + 1]), " at index ", fmt(b));
      TORCH_CHECK(off[b + 1] - off[b] <= max_len, "sequence ", fmt(b), " has ", fmt(off[b + 1] - off[b]),
                  " rows in ", name, ", more than ", max_name, " = ", fmt(max_len));
    }
  };
  const int64_t batch = vs.s.batch;
  check_offsets(q_off, batch, vs.total_q, vs.s.seqlen_q, "cu_seqlens_q", "max_seqlen_q");
  // With seqused_k the cu_seqlens_k spans may exceed max_seqlen_k (a padded key buffer); the used keys may not.
  check_offsets(k_off, batch, vs.total_k, used.defined() ? vs.total_k : vs.s.seqlen_k, "cu_seqlens_k", "max_seqlen_k");
  std::vector<VarlenSeq> seqs(batch);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t len_k = k_off[b + 1] - k_off[b];
    if (used.defined()) {
      const int64_t u = used.data_ptr<int32_t>()[b];
      TORCH_CHECK(u >= 0 && u <= len_k, "seqused_k[", fmt(b), "] = ", fmt(u), " must be in [0, ", fmt(len_k),
                  "] (cu_seqlens_k[b + 1] - cu_seqlens_k[b])");
      TORCH_CHECK(u <= vs.s.seqlen_k, "sequence ", fmt(b), " uses ", fmt(u), " keys (seqused_k), more than max_seqlen_k = ",
                  fmt(vs.s.seqlen_k));
      len_k = u;
    }
    seqs[b] = {q_off[b], q_off[b + 1] - q_off[b], k_off[b], len_k};
  }
  return seqs;
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

// The varlen backward's dout / out / lse against q and the batch (lse: (nheads, total_q)).
inline void check_varlen_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                                  const at::Tensor& lse, const VarlenShape& vs) {
  AttnShape s1 = vs.s;
  s1.batch = 1;
  s1.seqlen_q = vs.total_q;
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == vs.s.nheads && lse.size(1) == vs.total_q,
              "lse must have shape (nheads, total_q) = (", fmt(vs.s.nheads), ", ", fmt(vs.total_q), "), got ",
              fmt(lse.sizes()));
  check_bwd_args(dout.unsqueeze(0), q.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0), s1);
}

// The masks and score modifiers of issue 15 (docs/ARCHITECTURE.md, "Masks and score modifiers"), checked
// once for every device. `window_left` / `window_right` are resolved: causal sets the right bound to 0.
struct Features {
  int64_t window_left = -1, window_right = -1;  // -1: unbounded on that side
  int64_t attention_chunk = 0;                  // 0: off
  double softcap = 0.0;                         // 0: off
  bool has_alibi = false, has_bias = false, has_sinks = false;
  bool bias_is_bool = false;
  double dropout_p = 0.0;  // 0: off (set by the CUDA API layer after check_dropout; the general path runs it)
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

// Attention dropout (docs/ARCHITECTURE.md, "Dropout"): dropout_p in [0, 1); dropout_rng int64 (2,) on q's device, the
// (seed, offset) of csrc/kernels/dropout.h, drawn from torch's generator by flash_ext.attention.
inline bool check_dropout(const at::Tensor& q, double dropout_p, const std::optional<at::Tensor>& dropout_rng) {
  TORCH_CHECK(!std::isnan(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              fmt(dropout_p));
  if (dropout_rng.has_value()) {
    const at::Tensor& r = *dropout_rng;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.size(0) == 2,
                "dropout_rng must be an int64 tensor of 2 elements (seed, offset), got ", r.scalar_type(), " of shape ",
                fmt(r.sizes()));
    TORCH_CHECK(r.device() == q.device(), "dropout_rng must be on the device of q (", q.device(), "), got ",
                r.device());
  }
  TORCH_CHECK(dropout_p == 0.0 || dropout_rng.has_value(),
              "dropout_rng must be given with dropout_p > 0 (the (seed, offset) pair; flash_ext.attention draws it)");
  return dropout_p > 0.0;
}

// Block-sparse attention (docs/ARCHITECTURE.md, "Block-sparse attention"): the compressed lists of a
// flash_ext.BlockMask. block_kv: int32 (Bm, Hm, n_qb, n_kb + 1), row (b, h, query block m) = [count, key blocks in
// ascending order, unused]; block_q: int32 (Bm, Hm, n_kb, n_qb + 1), the same lists per key block (the backward's).
// Bm is 1 or batch, Hm 1 or nheads (a size-1 dim is shared), n_qb = ceil(seqlen_q / block_size), n_kb likewise.
// The values are the caller's contract on CUDA (reading them would synchronize): flash_ext.BlockMask builds them;
// the CPU path checks them (check_block_lists_values).
constexpr int64_t kBlockSparseSizes[] = {64, 128};

struct BlockSparse {
  bool on = false;
  int64_t block_size = 0, n_qb = 0, n_kb = 0;
};

inline void check_block_list(const at::Tensor& t, const char* name, const at::Tensor& q, const AttnShape& s,
                             int64_t rows, int64_t cols, const char* rows_name, const char* cols_name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
  const bool ok = t.dim() == 4 && (t.size(0) == 1 || t.size(0) == s.batch) &&
                  (t.size(1) == 1 || t.size(1) == s.nheads) && t.size(2) == rows && t.size(3) == cols + 1;
  TORCH_CHECK(ok, name, " must have shape (1 or batch = ", fmt(s.batch), ", 1 or nheads = ", fmt(s.nheads), ", ",
              rows_name, " = ", fmt(rows), ", ", cols_name, " + 1 = ", fmt(cols + 1),
              ") for this call's seqlens and block_size (a BlockMask built for other seqlens?), got ", fmt(t.sizes()));
}

inline BlockSparse check_block_sparse(const at::Tensor& q, const AttnShape& s,
                                      const std::optional<at::Tensor>& block_kv,
                                      const std::optional<at::Tensor>& block_q, int64_t block_size) {
  BlockSparse bs;
  TORCH_CHECK(block_kv.has_value() == block_q.has_value(),
              "block_kv and block_q must be given together (a flash_ext.BlockMask's lists), got only ",
              block_kv.has_value() ? "block_kv" : "block_q");
  if (!block_kv.has_value()) return bs;
  const bool size_ok = std::find(std::begin(kBlockSparseSizes), std::end(kBlockSparseSizes), block_size) !=
                       std::end(kBlockSparseSizes);
  TORCH_CHECK(size_ok, "block_size must be 64 or 128 (the block sizes the kernels take), got ", fmt(block_size));
  bs.on = true;
  bs.block_size = block_size;
  bs.n_qb = (s.seqlen_q + block_size - 1) / block_size;
  bs.n_kb = (s.seqlen_k + block_size - 1) / block_size;
  check_block_list(*block_kv, "block_kv", q, s, bs.n_qb, bs.n_kb, "ceil(seqlen_q / block_size)",
                   "ceil(seqlen_k / block_size)");
  check_block_list(*block_q, "block_q", q, s, bs.n_kb, bs.n_qb, "ceil(seqlen_k / block_size)",
                   "ceil(seqlen_q / block_size)");
  TORCH_CHECK(block_q->size(0) == block_kv->size(0) && block_q->size(1) == block_kv->size(1),
              "block_q must have the (batch, heads) dims of block_kv ", fmt(block_kv->sizes().slice(0, 2)), ", got ",
              fmt(block_q->sizes().slice(0, 2)));
  return bs;
}

// The block mask (Bm, Hm, rows, cols) bool of one list tensor (CPU, contiguous int32), after checking every list:
// count in [0, cols], entries strictly ascending in [0, cols).
inline at::Tensor block_lists_to_dense(const at::Tensor& lists_cpu, const char* name) {
  const int64_t bm = lists_cpu.size(0), hm = lists_cpu.size(1), rows = lists_cpu.size(2), cols = lists_cpu.size(3) - 1;
  at::Tensor dense = at::zeros({bm, hm, rows, cols}, lists_cpu.options().dtype(at::kBool));
  const int32_t* p = lists_cpu.data_ptr<int32_t>();
  bool* d = dense.data_ptr<bool>();
  for (int64_t r = 0; r < bm * hm * rows; ++r) {
    const int32_t* row = p + r * (cols + 1);
    const int64_t count = row[0];
    TORCH_CHECK(count >= 0 && count <= cols, name, ": list ", fmt(r), " has count ", fmt(count), ", expected 0..",
                fmt(cols));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t blk = row[1 + i];
      TORCH_CHECK(blk >= 0 && blk < cols && (i == 0 || blk > row[i]), name, ": list ", fmt(r),
                  " must hold distinct block indices in ascending order in [0, ", fmt(cols), "), got ", fmt(blk),
                  " at position ", fmt(i));
      d[r * cols + blk] = true;
    }
  }
  return dense;
}

// The CPU's check of the lists' values: each list valid, and block_q the transpose of block_kv (the backward's
// lists name the same blocks as the forward's). Returns the lists, contiguous on the CPU.
inline std::pair<at::Tensor, at::Tensor> check_block_lists_values(const at::Tensor& block_kv,
                                                                  const at::Tensor& block_q) {
  at::Tensor kv = block_kv.contiguous(), qq = block_q.contiguous();
  const at::Tensor a = block_lists_to_dense(kv, "block_kv"), b = block_lists_to_dense(qq, "block_q");
  TORCH_CHECK(at::equal(a, b.transpose(2, 3)),
              "block_q must list, for each key block, the query blocks whose block_kv lists name it (the transpose "
              "of block_kv; flash_ext.BlockMask builds both)");
  return {kv, qq};
}

}  // namespace
}  // namespace flash_ext
