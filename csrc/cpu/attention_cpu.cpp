// CPU FlashAttention: the tiled algorithm of docs/ARCHITECTURE.md on the CPU.
//
// Forward: parallel over (batch, head, row block of Q). For each key/value column block the score
// tile S = Q_i K_j^T is computed with an ATen matmul, the online softmax keeps a running row max m
// and row sum l, and the output accumulator is rescaled by exp(m_old - m_new) before O += P V_j.
// The seqlen_q x seqlen_k matrix is never formed: working memory is one kBlockM x kBlockN tile per
// thread plus the kBlockM x head_dim accumulator.
//
// Backward: P is recomputed block by block from lse. Two passes keep every write owned by exactly one
// task (no atomics, deterministic): pass 1 is parallel over row blocks of Q, computes (in float64
// mode, see Precision) lse, then D = rowsum(dO * O) (as sum_j P_ij dP_ij) and accumulates dQ; pass 2 is
// parallel over column blocks of K/V and accumulates dK and dV over the query heads of the K/V head's
// group (GQA/MQA without repeating K/V).
//
// Precision: float64 inputs are computed in float64, bf16/fp16 inputs in float32 (upcast copies, linear
// in seqlen). float32 inputs are computed in float32 when the problem is large and in float64 when it is
// small (kFloat64Macs below); the gradients always accumulate in float64. Why both: the tests' rule
// (tests/reference.py) holds our error within 2x of PyTorch's own float32 error, and the rounding of S = scale * Q K^T,
// the dominant error of any float32 attention, is independent between two implementations. Where the
// maximum error is taken over few elements (a handful of rows, or rows that see one or two keys) the
// ratio of two such maxima is a noisy number: a float32 path missed the rule in ~0.3% of random small
// cases (measured: 6 of 1728 forward cases with seqlens <= 1023, all with fewer than 2^26 multiply-adds).
// Over many elements both maxima concentrate and float32 lands at 0.1-0.7 of the bound (measured on
// 1023 x 1023, 512 x 2048, 4096 x 1, 1 x 4096 with fwd + bwd). Small problems cost at most a few
// milliseconds in float64, so they take it; large ones take float32, whose speed the CPU benchmark
// measures.
// The backward recomputes S in the forward's compute type with the same tiles and accumulates the
// gradients in float64. Where that type is float32 it rounds S as the forward did and subtracts the
// saved float32 lse, so P reproduces the forward's normalization exactly; where it is float64 the saved
// float32 lse would cap P at float32 accuracy, so lse is recomputed in float64 first. Either way a row
// that sees a single key gets P = 1 exactly and dS = P * (dP - D) cancels to exactly 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../attention_checks.h"

namespace flash_ext {
namespace {

// Tile sizes: chosen, not swept. 128 x 512 keeps each ATen matmul large enough that the per-op
// overhead (a few microseconds) stays small next to the tile's arithmetic.
constexpr int64_t kBlockM = 128;
constexpr int64_t kBlockN = 512;

// float32 inputs with at most this many multiply-adds in S = Q K^T (batch * nheads * seqlen_q * seqlen_k *
// head_dim; 2^26: about 3 ms of float64 matmul on one core) are computed in float64.
constexpr int64_t kFloat64Macs = int64_t(1) << 26;

// Compute type of the forward (S, softmax statistics, P V, O) for an input dtype and shape; every
// gradient accumulates in float64.
at::ScalarType fwd_type(at::ScalarType t, const AttnShape& s) {
  if (t == at::kDouble) return at::kDouble;
  if (t == at::kFloat) {
    // Overflow-safe product: any factor above the limit decides it.
    double macs = 1.0;
    for (int64_t x : {s.batch, s.nheads, s.seqlen_q, s.seqlen_k, s.head_dim}) macs *= static_cast<double>(x);
    return macs <= static_cast<double>(kFloat64Macs) ? at::kDouble : at::kFloat;
  }
  return at::kFloat;
}
constexpr at::ScalarType kBwdAccType = at::kDouble;

int64_t num_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Runs fn(block, head, batch, scratch) for every task of a (batch, heads, blocks) grid over at::parallel_for,
// without autograd; each worker makes its own scratch tensors once (make_scratch()).
template <typename MakeScratch, typename Fn>
void for_each_block(int64_t batch, int64_t heads, int64_t blocks, MakeScratch make_scratch, Fn fn) {
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad_in_worker;
    auto scratch = make_scratch();
    for (int64_t task = begin; task < end; ++task)
      fn(task % blocks, (task / blocks) % heads, task / (blocks * heads), scratch);
  });
}

// Keys [0, key_end) are visible to at least one row of [m0, m0 + mlen); causal is bottom-right aligned.
int64_t key_end(int64_t m0, int64_t mlen, int64_t sq, int64_t sk, bool causal) {
  if (!causal) return sk;
  return std::clamp<int64_t>(m0 + mlen + sk - sq, 0, sk);
}

// Sets S[r][c] = -inf where key n0 + c is in the causal future of query m0 + r; tiles the diagonal
// does not cross are left untouched.
void mask_causal_tile(at::Tensor& S, int64_t m0, int64_t n0, int64_t sq, int64_t sk) {
  const int64_t mlen = S.size(0), nlen = S.size(1);
  // Key col is visible to row r iff n0 + c <= m0 + r + sk - sq.
  if (n0 + nlen - 1 <= m0 + sk - sq) return;
  auto cols = at::arange(n0, n0 + nlen, S.options().dtype(at::kLong));
  auto limits = at::arange(m0 + sk - sq, m0 + mlen + sk - sq, S.options().dtype(at::kLong));
  S.masked_fill_(cols.unsqueeze(0) > limits.unsqueeze(1), -std::numeric_limits<double>::infinity());
}

void check_cpu_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float64, float32, bfloat16 or float16 on the CPU, got ", dtype);
}

// A contiguous (rows x cols) view on the front of a preallocated buffer, for mm_out.
at::Tensor front(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in,
                                                         std::optional<double> softmax_scale, bool causal,
                                                         bool /*deterministic*/) {
  const AttnShape s = check_qkv(q_in, k_in, v_in);
  const auto dtype = q_in.scalar_type();
  check_cpu_dtype(dtype);
  const double scale = resolve_scale(softmax_scale, s.head_dim);

  at::Tensor out = at::empty({s.batch, s.seqlen_q, s.nheads, s.head_dim}, q_in.options());
  at::Tensor lse = at::empty({s.batch, s.nheads, s.seqlen_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.seqlen_k == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  at::NoGradGuard no_grad;
  const auto acc = fwd_type(dtype, s);
  // Copies only where the type changes; strided layouts are read as they are.
  const at::Tensor q = q_in.detach().to(acc), k = k_in.detach().to(acc), v = v_in.detach().to(acc);
  at::Tensor out_acc = acc == dtype ? out : at::empty(out.sizes(), out.options().dtype(acc));
  const int64_t group = s.nheads / s.nheads_k;
  const int64_t n_mblocks = num_blocks(s.seqlen_q, kBlockM);
  const double inf = std::numeric_limits<double>::infinity();

  auto make_scratch = [&]() {
    return std::make_pair(at::empty({kBlockM, kBlockN}, q.options()), at::empty({kBlockM, s.head_dim}, q.options()));
  };
  for_each_block(s.batch, s.nheads, n_mblocks, make_scratch, [&](int64_t mb, int64_t h, int64_t b, auto& bufs) {
    at::Tensor& s_buf = bufs.first;
    at::Tensor& o_buf = bufs.second;
    const int64_t m0 = mb * kBlockM, mlen = std::min(kBlockM, s.seqlen_q - m0);
    // scale * Q_i (mlen x head_dim): the scale folded into Q as PyTorch's own attention does.
    const at::Tensor q_i = q.select(0, b).select(1, h).narrow(0, m0, mlen) * scale;
    const at::Tensor k_h = k.select(0, b).select(1, h / group);  // seqlen_k x head_dim
    const at::Tensor v_h = v.select(0, b).select(1, h / group);  // seqlen_k x head_dim
    at::Tensor o_i = front(o_buf, mlen, s.head_dim).zero_();
    at::Tensor m_i = at::full({mlen}, -inf, q.options());  // running max of S
    at::Tensor l_i = at::zeros({mlen}, q.options());       // running sum of exp(S - m)
    const int64_t n_end = key_end(m0, mlen, s.seqlen_q, s.seqlen_k, causal);
    for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
      const int64_t nlen = std::min(kBlockN, n_end - n0);
      at::Tensor s_ij = front(s_buf, mlen, nlen);
      at::mm_out(s_ij, q_i, k_h.narrow(0, n0, nlen).t());
      if (causal) mask_causal_tile(s_ij, m0, n0, s.seqlen_q, s.seqlen_k);
      const at::Tensor m_new = at::maximum(m_i, s_ij.amax(1));
      // Rows that have seen no key yet keep m = -inf; subtract 0 there so exp gives 0, not NaN.
      const at::Tensor m_safe = m_new.masked_fill(m_new == -inf, 0.0);
      const at::Tensor alpha = (m_i - m_safe).exp_();
      s_ij.sub_(m_safe.unsqueeze(1)).exp_();  // s_ij now holds P
      l_i.mul_(alpha).add_(s_ij.sum(1));
      o_i.mul_(alpha.unsqueeze(1)).addmm_(s_ij, v_h.narrow(0, n0, nlen));
      m_i = m_new;
    }
    // Epilogue: O /= l, lse = m + log(l); a row that saw no key gets O = 0 and lse = -inf.
    const at::Tensor seen = l_i > 0;
    o_i.div_(at::where(seen, l_i, at::ones_like(l_i)).unsqueeze(1));
    out_acc.select(0, b).select(1, h).narrow(0, m0, mlen).copy_(o_i);
    lse.select(0, b).select(0, h).narrow(0, m0, mlen).copy_(at::where(seen, m_i + l_i.log(), -inf));
  });
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double softmax_scale, bool causal,
    bool /*deterministic: the CPU backward is always deterministic*/) {
  const AttnShape s = check_qkv(q_in, k_in, v_in);
  check_bwd_args(dout_in, q_in, out_in, lse_in, s);
  const auto dtype = q_in.scalar_type();
  check_cpu_dtype(dtype);
  const double scale = resolve_scale(softmax_scale, s.head_dim);

  const auto acc = kBwdAccType;
  at::Tensor dq = at::zeros({s.batch, s.seqlen_q, s.nheads, s.head_dim}, q_in.options().dtype(acc));
  at::Tensor dk = at::zeros({s.batch, s.seqlen_k, s.nheads_k, s.head_dim}, q_in.options().dtype(acc));
  at::Tensor dv = at::zeros({s.batch, s.seqlen_k, s.nheads_k, s.head_dim}, q_in.options().dtype(acc));
  auto finish = [&]() {
    return std::make_tuple(dq.to(dtype), dk.to(dtype), dv.to(dtype));
  };
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0 || s.nheads == 0) return finish();

  at::NoGradGuard no_grad;
  const at::Tensor q = q_in.detach().to(acc), k = k_in.detach().to(acc), v = v_in.detach().to(acc);
  // S is recomputed in the forward's compute type (float64, or float32 for bf16/fp16 and large float32).
  const bool s_is_acc = fwd_type(dtype, s) == acc;
  const at::Tensor q_s = s_is_acc ? q : q_in.detach().to(fwd_type(dtype, s));
  const at::Tensor k_s = s_is_acc ? k : k_in.detach().to(fwd_type(dtype, s));
  const at::Tensor dout = dout_in.detach().to(acc);
  // Where the forward computed in float64, the saved float32 lse is too coarse for the gradients: pass 1
  // recomputes lse in float64 (one more sweep of S per row block) and P = exp(S - lse) is then exact to
  // float64, with P = 1 exactly for a row that sees one key. Otherwise S is rounded to float32 and the
  // saved lse is used, as the forward computed them.
  const bool exact_lse = s_is_acc;
  // lse = -inf (a row that sees no key) would give exp(s - lse) = inf; +inf gives P = 0 instead.
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor lse = exact_lse ? at::empty({s.batch, s.nheads, s.seqlen_q}, q.options())
                                   : lse_in.detach().to(acc).masked_fill(lse_in == -inf, inf);
  // D = rowsum(dO * O) = sum_j P_ij dP_ij: batch x nheads x seqlen_q, filled by pass 1.
  at::Tensor D = at::empty({s.batch, s.nheads, s.seqlen_q}, q.options());
  const int64_t group = s.nheads / s.nheads_k;
  const int64_t n_mblocks = num_blocks(s.seqlen_q, kBlockM), n_nblocks = num_blocks(s.seqlen_k, kBlockN);

  // Per-thread tiles: S in the score type, P and dP (later dS) in float64.
  struct Tiles {
    at::Tensor s, p, dp;
  };
  auto make_tiles = [&]() {
    return Tiles{at::empty({kBlockM, kBlockN}, q_s.options()), at::empty({kBlockM, kBlockN}, q.options()),
                 at::empty({kBlockM, kBlockN}, q.options())};
  };
  // S (mlen x nlen) for rows m0.. of head h and keys n0.., masked, in the score type.
  auto scores = [&](int64_t b, int64_t h, int64_t m0, int64_t mlen, int64_t n0, int64_t nlen, Tiles& t) {
    at::Tensor s_ij = front(t.s, mlen, nlen);
    at::mm_out(s_ij, q_s.select(0, b).select(1, h).narrow(0, m0, mlen) * scale,
               k_s.select(0, b).select(1, h / group).narrow(0, n0, nlen).t());
    if (causal) mask_causal_tile(s_ij, m0, n0, s.seqlen_q, s.seqlen_k);
    return s_ij;
  };
  // Recomputes P and dP = dO V^T (mlen x nlen) for rows m0.. of head h and keys n0...
  auto recompute = [&](int64_t b, int64_t h, int64_t m0, int64_t mlen, int64_t n0, int64_t nlen, Tiles& t) {
    const at::Tensor s_ij = scores(b, h, m0, mlen, n0, nlen, t);
    // Exact lse: S as computed. Saved lse: S rounded to float32 as the forward's was, so a row with one
    // visible key gets P = 1 exactly.
    at::Tensor p = front(t.p, mlen, nlen);
    if (exact_lse) p.copy_(s_ij);
    else p.copy_(s_ij.to(at::kFloat));
    p.sub_(lse.select(0, b).select(0, h).narrow(0, m0, mlen).unsqueeze(1)).exp_();
    at::Tensor dp = front(t.dp, mlen, nlen);
    at::mm_out(dp, dout.select(0, b).select(1, h).narrow(0, m0, mlen),
               v.select(0, b).select(1, h / group).narrow(0, n0, nlen).t());
    return std::make_pair(p, dp);
  };
  // dS = P * (dP - D), in place of dP.
  auto make_ds = [&](int64_t b, int64_t h, int64_t m0, int64_t mlen, at::Tensor& p, at::Tensor& dp) {
    return dp.sub_(D.select(0, b).select(0, h).narrow(0, m0, mlen).unsqueeze(1)).mul_(p);
  };

  // Pass 1, parallel over (batch, head, row block): D = sum_j P_ij dP_ij (self-consistent with the
  // recomputed P, so the rows of dS sum to zero, and to exactly zero for a row with one key), then dQ.
  for_each_block(s.batch, s.nheads, n_mblocks, make_tiles, [&](int64_t mb, int64_t h, int64_t b, Tiles& t) {
    const int64_t m0 = mb * kBlockM, mlen = std::min(kBlockM, s.seqlen_q - m0);
    const int64_t n_end = key_end(m0, mlen, s.seqlen_q, s.seqlen_k, causal);
    if (exact_lse) {  // online max and sum over the row block's keys, as in the forward
      at::Tensor m_i = at::full({mlen}, -inf, q.options()), l_i = at::zeros({mlen}, q.options());
      for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
        at::Tensor s_ij = scores(b, h, m0, mlen, n0, std::min(kBlockN, n_end - n0), t);
        const at::Tensor m_new = at::maximum(m_i, s_ij.amax(1));
        const at::Tensor m_safe = m_new.masked_fill(m_new == -inf, 0.0);
        l_i.mul_((m_i - m_safe).exp_()).add_(s_ij.sub_(m_safe.unsqueeze(1)).exp_().sum(1));
        m_i = m_new;
      }
      lse.select(0, b).select(0, h).narrow(0, m0, mlen).copy_(at::where(l_i > 0, m_i + l_i.log(), inf));
    }
    at::Tensor d_i = D.select(0, b).select(0, h).narrow(0, m0, mlen).zero_();
    for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
      auto [p, dp] = recompute(b, h, m0, mlen, n0, std::min(kBlockN, n_end - n0), t);
      d_i.add_((p * dp).sum(1));
    }
    at::Tensor dq_i = dq.select(0, b).select(1, h).narrow(0, m0, mlen);
    for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
      const int64_t nlen = std::min(kBlockN, n_end - n0);
      auto [p, dp] = recompute(b, h, m0, mlen, n0, nlen, t);
      const at::Tensor ds = make_ds(b, h, m0, mlen, p, dp);
      dq_i.addmm_(ds, k.select(0, b).select(1, h / group).narrow(0, n0, nlen), 1.0, scale);  // dQ += scale dS K
    }
  });

  // Pass 2: dK and dV, parallel over (batch, K/V head, column block); sums over the group's heads.
  for_each_block(s.batch, s.nheads_k, n_nblocks, make_tiles, [&](int64_t nb, int64_t hk, int64_t b, Tiles& t) {
    const int64_t n0 = nb * kBlockN, nlen = std::min(kBlockN, s.seqlen_k - n0);
    at::Tensor dk_j = dk.select(0, b).select(1, hk).narrow(0, n0, nlen);
    at::Tensor dv_j = dv.select(0, b).select(1, hk).narrow(0, n0, nlen);
    // Causal: the first query row that sees key n0 is n0 - (sk - sq).
    const int64_t m_start = causal ? std::clamp<int64_t>(n0 - (s.seqlen_k - s.seqlen_q), 0, s.seqlen_q) : 0;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t m0 = (m_start / kBlockM) * kBlockM; m0 < s.seqlen_q; m0 += kBlockM) {
        const int64_t mlen = std::min(kBlockM, s.seqlen_q - m0);
        auto [p, dp] = recompute(b, h, m0, mlen, n0, nlen, t);
        dv_j.addmm_(p.t(), dout.select(0, b).select(1, h).narrow(0, m0, mlen));  // dV += P^T dO
        const at::Tensor ds = make_ds(b, h, m0, mlen, p, dp);
        dk_j.addmm_(ds.t(), q.select(0, b).select(1, h).narrow(0, m0, mlen), 1.0, scale);  // dK += scale dS^T Q
      }
    }
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_ext, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace flash_ext
