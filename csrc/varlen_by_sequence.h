// Variable-length batches run one sequence at a time: each sequence is the dense op's batch of one on its rows
// (views, any strides), with its row of (batch, nheads) ALiBi slopes. Used by the CPU path (the CUDA kernels read
// the sequences themselves: docs/ARCHITECTURE.md, "Variable-length batches").
// Rows of q that no sequence covers get out 0 and lse -inf; the backward gives them, and k / v rows of no
// sequence or past seqused_k, zero gradients. The values of cu_seqlens / seqused_k are checked here
// (check_varlen_values). Torch-dependent; never included by csrc/kernels.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_checks.h"

namespace flash_ext {
namespace {

inline std::optional<at::Tensor> seq_slopes(const std::optional<at::Tensor>& alibi_slopes, int64_t b) {
  if (!alibi_slopes.has_value() || alibi_slopes->dim() == 1) return alibi_slopes;
  return alibi_slopes->narrow(0, b, 1);
}

// Fwd: the device's dense attention_forward implementation.
template <typename Fwd>
std::tuple<at::Tensor, at::Tensor> varlen_forward_by_sequence(
    Fwd fwd, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k,
    std::optional<double> softmax_scale, bool causal, bool deterministic, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t attention_chunk,
    const std::optional<at::Tensor>& sinks) {
  const VarlenShape vs = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k);
  resolve_scale(softmax_scale, vs.s.head_dim);
  check_features(q, vs.s, causal, window_left, window_right, softcap, alibi_slopes, std::nullopt, attention_chunk,
                 sinks);
  const std::vector<VarlenSeq> seqs = check_varlen_values(vs, cu_seqlens_q, cu_seqlens_k, seqused_k);
  at::Tensor out = at::zeros({vs.total_q, vs.s.nheads, vs.s.head_dim}, q.options());
  at::Tensor lse = at::full({vs.s.nheads, vs.total_q}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < vs.s.batch; ++b) {
    const VarlenSeq& sq = seqs[b];
    if (sq.seqlen_q == 0) continue;
    auto [o, l] = fwd(q.narrow(0, sq.q0, sq.seqlen_q).unsqueeze(0), k.narrow(0, sq.k0, sq.seqlen_k).unsqueeze(0),
                      v.narrow(0, sq.k0, sq.seqlen_k).unsqueeze(0), softmax_scale, causal, deterministic, window_left,
                      window_right, softcap, seq_slopes(alibi_slopes, b), std::nullopt, attention_chunk, sinks,
                      std::nullopt, std::nullopt, 0, 0.0, std::nullopt);
    out.narrow(0, sq.q0, sq.seqlen_q).copy_(o.select(0, 0));
    lse.narrow(1, sq.q0, sq.seqlen_q).copy_(l.select(0, 0));
  }
  return {out, lse};
}

// Bwd: the device's dense attention_backward implementation. dK / dV of key rows that several sequences share are
// summed; dsinks is summed over the sequences in float64.
template <typename Bwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_by_sequence(
    Bwd bwd, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k, double softmax_scale,
    bool causal, bool deterministic, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, int64_t attention_chunk, const std::optional<at::Tensor>& sinks) {
  const VarlenShape vs = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k);
  check_varlen_bwd_args(dout, q, out, lse, vs);
  check_features(q, vs.s, causal, window_left, window_right, softcap, alibi_slopes, std::nullopt, attention_chunk,
                 sinks);
  const std::vector<VarlenSeq> seqs = check_varlen_values(vs, cu_seqlens_q, cu_seqlens_k, seqused_k);
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  at::Tensor dsinks_acc =
      sinks.has_value() ? at::zeros(sinks->sizes(), sinks->options().dtype(at::kDouble)) : at::Tensor();
  for (int64_t b = 0; b < vs.s.batch; ++b) {
    const VarlenSeq& sq = seqs[b];
    if (sq.seqlen_q == 0 || sq.seqlen_k == 0) continue;  // no pair: zero gradients (a sink alone has D = 0)
    auto rows_q = [&](const at::Tensor& t) { return t.narrow(0, sq.q0, sq.seqlen_q).unsqueeze(0); };
    auto rows_k = [&](const at::Tensor& t) { return t.narrow(0, sq.k0, sq.seqlen_k).unsqueeze(0); };
    auto [dq_b, dk_b, dv_b, dbias_b, dsinks_b] =
        bwd(rows_q(dout), rows_q(q), rows_k(k), rows_k(v), rows_q(out),
            lse.narrow(1, sq.q0, sq.seqlen_q).unsqueeze(0), softmax_scale, causal, deterministic, window_left,
            window_right, softcap, seq_slopes(alibi_slopes, b), std::nullopt, attention_chunk, sinks, false,
            std::nullopt, std::nullopt, 0, 0.0, std::nullopt);
    dq.narrow(0, sq.q0, sq.seqlen_q).copy_(dq_b.select(0, 0));
    dk.narrow(0, sq.k0, sq.seqlen_k).add_(dk_b.select(0, 0));
    dv.narrow(0, sq.k0, sq.seqlen_k).add_(dv_b.select(0, 0));
    if (dsinks_acc.defined()) dsinks_acc.add_(dsinks_b.to(at::kDouble));
  }
  at::Tensor dsinks = dsinks_acc.defined() ? dsinks_acc.to(sinks->scalar_type()) : at::empty({0}, q.options());
  return {dq, dk, dv, dsinks};
}

}  // namespace
}  // namespace flash_ext
