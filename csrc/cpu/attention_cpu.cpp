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
//
// Masks and score modifiers (docs/ARCHITECTURE.md, "Masks and score modifiers"): every score tile goes through
// the same two steps, ScoreMods::apply then KeyRange::apply, in the forward and in both backward passes, so the
// three compute the same S. The
// window, causal and chunk masks give each row an interval of visible keys whose ends never decrease with the
// row (KeyRange): a query row block visits only the key blocks its rows can see, the backward's key-block pass
// only the query blocks that can see it, and only tiles that a boundary crosses pay for the per-element test.
// dbias is accumulated in float64 by pass 1; where the bias is broadcast over batch, heads or query rows, the
// pass-1 tasks that share its elements run one after another inside one task (for_each_block's `serial`),
// so every dbias element has one owner and the sum has a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../attention_checks.h"
#include "../kernels/dropout.h"
#include "../varlen_by_sequence.h"

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
// without autograd; each worker makes its own scratch tensors once (make_scratch()). The tasks that differ only
// in a dim marked in `serial` (batch, heads, blocks) run one after another, in increasing order, inside one
// parallel task: what they write in common has one owner.
struct Serial {
  bool batch = false, heads = false, blocks = false;
};
template <typename MakeScratch, typename Fn>
void for_each_block(int64_t batch, int64_t heads, int64_t blocks, MakeScratch make_scratch, Fn fn,
                    Serial serial = {}) {
  const int64_t pb = serial.batch ? 1 : batch, ph = serial.heads ? 1 : heads, pm = serial.blocks ? 1 : blocks;
  at::parallel_for(0, pb * ph * pm, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad_in_worker;
    auto scratch = make_scratch();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tm = task % pm, th = (task / pm) % ph, tb = task / (pm * ph);
      for (int64_t b = serial.batch ? 0 : tb; b < (serial.batch ? batch : tb + 1); ++b)
        for (int64_t h = serial.heads ? 0 : th; h < (serial.heads ? heads : th + 1); ++h)
          for (int64_t mb = serial.blocks ? 0 : tm; mb < (serial.blocks ? blocks : tm + 1); ++mb)
            fn(mb, h, b, scratch);
    }
  });
}

int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Which keys each query row sees under the window, causal and chunk masks: row i (i' = i + seqlen_k -
// seqlen_q, bottom-right aligned) sees the keys [lo(i), hi(i)). Both ends never decrease with i, so the keys
// some row of a block sees are [lo(first row), hi(last row)), and a key block is seen by a contiguous run of
// query blocks.
struct KeyRange {
  int64_t sq, sk, left, right, chunk;  // left / right: -1 unbounded (causal is right = 0); chunk: 0 off

  KeyRange(int64_t sq_, int64_t sk_, const Features& f)
      : sq(sq_), sk(sk_), left(f.window_left), right(f.window_right), chunk(f.attention_chunk) {
    // A bound beyond sq + sk hides nothing; capping it keeps the arithmetic below from overflowing.
    left = std::min(left, sq + sk);
    right = std::min(right, sq + sk);
  }
  bool plain() const { return left < 0 && right < 0 && chunk == 0; }
  bool has_left() const { return left >= 0 || chunk > 0; }
  int64_t lo(int64_t i) const {
    const int64_t r = i + sk - sq;
    int64_t v = 0;
    if (left >= 0) v = std::max(v, r - left);
    if (chunk > 0) v = std::max(v, floor_div(r, chunk) * chunk);
    return std::min(v, sk);
  }
  int64_t hi(int64_t i) const {
    const int64_t r = i + sk - sq;
    int64_t v = sk;
    if (right >= 0) v = std::min(v, r + right + 1);
    if (chunk > 0) v = std::min(v, (floor_div(r, chunk) + 1) * chunk);
    return std::max<int64_t>(v, 0);
  }
  // Keys [first, second) are seen by at least one row of [m0, m0 + mlen) (first == second: none).
  std::pair<int64_t, int64_t> keys(int64_t m0, int64_t mlen) const {
    if (plain()) return {0, sk};
    const int64_t a = lo(m0), b = hi(m0 + mlen - 1);
    return {a, std::max(a, b)};
  }
  // Whether every row of [m0, m0 + mlen) sees every key of [n0, n0 + nlen): the tile needs no test.
  bool full(int64_t m0, int64_t mlen, int64_t n0, int64_t nlen) const {
    return plain() || (n0 >= lo(m0 + mlen - 1) && n0 + nlen <= hi(m0));
  }
  // Sets S[r][c] = -inf where row m0 + r does not see key n0 + c.
  void apply(at::Tensor& S, int64_t m0, int64_t n0) const {
    const int64_t mlen = S.size(0), nlen = S.size(1);
    if (full(m0, mlen, n0, nlen)) return;
    const auto long_opts = S.options().dtype(at::kLong);
    at::Tensor his = at::empty({mlen, 1}, long_opts), los;
    int64_t* hp = his.data_ptr<int64_t>();
    for (int64_t r = 0; r < mlen; ++r) hp[r] = hi(m0 + r);
    const at::Tensor cols = at::arange(n0, n0 + nlen, long_opts).unsqueeze(0);
    at::Tensor hide = cols >= his;
    if (has_left()) {
      los = at::empty({mlen, 1}, long_opts);
      int64_t* lp = los.data_ptr<int64_t>();
      for (int64_t r = 0; r < mlen; ++r) lp[r] = lo(m0 + r);
      hide.logical_or_(cols < los);
    }
    S.masked_fill_(hide, -std::numeric_limits<double>::infinity());
  }
};

// The tiles a call visits. Without a block mask: row blocks of kBlockM queries, and each row block's key tiles of
// kBlockN keys aligned to kBlockN over the keys its rows can see (KeyRange::keys); the backward's column blocks have
// kBlockN keys. With a block mask (flash_ext.BlockMask: docs/ARCHITECTURE.md, "Block-sparse attention") every tile is
// one mask block: row blocks and column blocks of block_size, a row block's key tiles the blocks its list names
// (cut to the keys its rows can see), a column block's row blocks the ones its list names. The forward and both
// backward passes take their tiles from here, so each computes the same S for the same (row block, key block).
struct Tiles {
  bool sparse = false;
  int64_t bm = kBlockM, bn = kBlockN;  // row block, column block (the backward's second pass)
  at::Tensor kv, q;                    // the lists, contiguous int32 on the CPU (sparse only)
  int64_t n_qb = 0, n_kb = 0;

  Tiles(const BlockSparse& sp, const std::optional<at::Tensor>& block_kv, const std::optional<at::Tensor>& block_q) {
    if (!sp.on) return;
    sparse = true;
    bm = bn = sp.block_size;
    n_qb = sp.n_qb, n_kb = sp.n_kb;
    std::tie(kv, q) = check_block_lists_values(block_kv->to(at::kCPU), block_q->to(at::kCPU));
  }
  // List `row` of (b, h) in lists t of (Bm, Hm, rows, cols + 1): a size-1 batch or head dim is shared.
  static const int32_t* list(const at::Tensor& t, int64_t b, int64_t h, int64_t row) {
    const int64_t bb = t.size(0) == 1 ? 0 : b, hh = t.size(1) == 1 ? 0 : h;
    return t.data_ptr<int32_t>() + ((bb * t.size(1) + hh) * t.size(2) + row) * t.size(3);
  }
  // fn(n0, nlen) for each key tile of row block mb of (b, h) whose rows can see keys [range.first, range.second).
  template <typename Fn>
  void key_tiles(int64_t b, int64_t h, int64_t mb, std::pair<int64_t, int64_t> range, Fn fn) const {
    const auto [n_min, n_max] = range;
    if (!sparse) {
      for (int64_t n0 = n_min / kBlockN * kBlockN; n0 < n_max; n0 += kBlockN) fn(n0, std::min(kBlockN, n_max - n0));
      return;
    }
    const int32_t* l = list(kv, b, h, mb);
    for (int64_t i = 0; i < l[0]; ++i) {
      const int64_t n0 = int64_t(l[1 + i]) * bn;
      if (n0 >= n_max) break;  // ascending
      if (n0 + bn <= n_min) continue;
      fn(n0, std::min(bn, n_max - n0));
    }
  }
  // fn(mb) for each row block that may see column block nb of (b, h), in increasing order.
  template <typename Fn>
  void row_blocks(int64_t b, int64_t h, int64_t nb, int64_t n_mblocks, Fn fn) const {
    if (!sparse) {
      for (int64_t mb = 0; mb < n_mblocks; ++mb) fn(mb);
      return;
    }
    const int32_t* l = list(q, b, h, nb);
    for (int64_t i = 0; i < l[0]; ++i) fn(int64_t(l[1 + i]));
  }
};

// Attention dropout's factors for a tile (docs/ARCHITECTURE.md, "Dropout"; csrc/kernels/dropout.h): 1 / (1 - p) where
// the probability is kept, 0 where it is dropped, the same mask for the same (seed, offset) as every CUDA kernel.
struct DropoutTiles {
  bool on = false;
  DropoutRng rng;
  double scale = 1.0;

  DropoutTiles(bool on_, double p, const std::optional<at::Tensor>& dropout_rng, const AttnShape& s) : on(on_) {
    if (!on) return;
    const at::Tensor r = dropout_rng->to(at::kCPU);
    rng = DropoutRng(static_cast<uint64_t>(r.data_ptr<int64_t>()[0]), static_cast<uint64_t>(r.data_ptr<int64_t>()[1]),
                     s.nheads, s.seqlen_q, s.seqlen_k, p);
    scale = 1.0 / (1.0 - p);
  }
  // The (mlen x nlen) factors of rows m0.. and keys n0.. of (b, h), in `opts`' dtype. Each Philox call gives the
  // 2 x 2 elements (i, i + 8) x (j, j + 1) it covers.
  at::Tensor factors(int64_t b, int64_t h, int64_t m0, int64_t mlen, int64_t n0, int64_t nlen,
                     const at::TensorOptions& opts) const {
    at::Tensor f = at::empty({mlen, nlen}, opts.dtype(at::kDouble));
    double* fp = f.data_ptr<double>();
    const int64_t m1 = m0 + mlen, n1 = n0 + nlen;
    for (int64_t i16 = m0 / 16; i16 * 16 < m1; ++i16) {
      for (int64_t r = 0; r < 8; ++r) {
        for (int64_t j2 = n0 / 2; j2 * 2 < n1; ++j2) {
          const Philox4 w = rng.words(b, h, i16, r, j2);
          for (int u = 0; u < 2; ++u) {
            const int64_t i = 16 * i16 + 8 * u + r;
            if (i < m0 || i >= m1) continue;
            for (int v = 0; v < 2; ++v) {
              const int64_t j = 2 * j2 + v;
              if (j < n0 || j >= n1) continue;
              fp[(i - m0) * nlen + (j - n0)] = w.x[2 * u + v] >= rng.threshold ? scale : 0.0;
            }
          }
        }
      }
    }
    return f.to(opts.dtype());
  }
};

// The score modifiers, applied to a tile of scale * Q K^T in this order: softcap, ALiBi, attn_bias.
struct ScoreMods {
  int64_t sq = 0, sk = 0, nheads = 0;
  double softcap = 0.0;
  std::vector<double> slopes;  // ALiBi: nheads or batch * nheads entries (empty: off)
  bool slopes_per_batch = false;
  at::Tensor bias;  // 4-D, read in place with its strides (undefined: off)
  bool bias_is_bool = false;

  // The bias (or dbias) elements of tile (b, h, rows m0.., keys n0..): a view with size-1 dims where the
  // bias is broadcast.
  static at::Tensor tile_of(const at::Tensor& t, int64_t b, int64_t h, int64_t m0, int64_t mlen, int64_t n0,
                            int64_t nlen) {
    at::Tensor x = t.select(0, t.size(0) == 1 ? 0 : b).select(0, t.size(1) == 1 ? 0 : h);
    if (x.size(0) != 1) x = x.narrow(0, m0, mlen);
    if (x.size(1) != 1) x = x.narrow(1, n0, nlen);
    return x;
  }

  // s: the tile of rows m0.. and keys n0.. of (b, h). With softcap, `tanh_out` (if given, the shape of s)
  // gets t = tanh(S_raw / softcap), the backward's derivative factor 1 - t^2.
  void apply(at::Tensor& s, int64_t b, int64_t h, int64_t m0, int64_t n0, at::Tensor* tanh_out) const {
    const int64_t mlen = s.size(0), nlen = s.size(1);
    if (softcap > 0) {
      s.div_(softcap).tanh_();
      if (tanh_out != nullptr) tanh_out->copy_(s);
      s.mul_(softcap);
    }
    if (!slopes.empty()) {
      const double slope = slopes[slopes_per_batch ? b * nheads + h : h];
      const auto opts = s.options();
      const at::Tensor rows = at::arange(m0 + sk - sq, m0 + mlen + sk - sq, opts).unsqueeze(1);
      const at::Tensor cols = at::arange(n0, n0 + nlen, opts).unsqueeze(0);
      s.add_((rows - cols).abs_().mul_(-slope));
    }
    if (bias.defined()) {
      const at::Tensor t = tile_of(bias, b, h, m0, mlen, n0, nlen);
      if (bias_is_bool) s.masked_fill_(t.logical_not(), -std::numeric_limits<double>::infinity());
      else s.add_(t);
    }
  }
};

ScoreMods make_mods(const AttnShape& s, const Features& f, const std::optional<at::Tensor>& alibi_slopes,
                    const std::optional<at::Tensor>& attn_bias) {
  ScoreMods mods;
  mods.sq = s.seqlen_q, mods.sk = s.seqlen_k, mods.nheads = s.nheads;
  mods.softcap = f.softcap;
  if (alibi_slopes.has_value()) {
    const at::Tensor sl = alibi_slopes->detach().to(at::kDouble).contiguous();
    mods.slopes.assign(sl.data_ptr<double>(), sl.data_ptr<double>() + sl.numel());
    mods.slopes_per_batch = sl.dim() == 2;
  }
  if (attn_bias.has_value()) {
    mods.bias = attn_bias->detach();
    mods.bias_is_bool = f.bias_is_bool;
  }
  return mods;
}

// Sink logits per head in float64 (empty: no sinks).
std::vector<double> sink_values(const std::optional<at::Tensor>& sinks) {
  if (!sinks.has_value()) return {};
  const at::Tensor t = sinks->detach().to(at::kDouble).contiguous();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

// One more step of the online softmax for a sink: a column of logit `sink` and value 0. m is the running max,
// l the running sum of exp(S - m), o (if given) the output accumulator of that sum.
void fold_sink(at::Tensor& m, at::Tensor& l, at::Tensor* o, double sink) {
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor m_new = at::clamp_min(m, sink);
  const at::Tensor m_safe = m_new.masked_fill(m_new == -inf, 0.0);
  const at::Tensor alpha = (m - m_safe).exp_();
  l.mul_(alpha).add_((m_safe.neg() + sink).exp_());
  if (o != nullptr) o->mul_(alpha.unsqueeze(1));
  m = m_new;
}

void check_cpu_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float64, float32, bfloat16 or float16 on the CPU, got ", dtype);
}

// A contiguous (rows x cols) view on the front of a preallocated buffer, for mm_out.
at::Tensor front(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, std::optional<double> softmax_scale,
    bool causal, bool /*deterministic*/, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
    int64_t attention_chunk, const std::optional<at::Tensor>& sinks_in, const std::optional<at::Tensor>& block_kv,
    const std::optional<at::Tensor>& block_q, int64_t block_size, double dropout_p,
    const std::optional<at::Tensor>& dropout_rng) {
  const AttnShape s = check_qkv(q_in, k_in, v_in);
  const auto dtype = q_in.scalar_type();
  check_cpu_dtype(dtype);
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  const Features f = check_features(q_in, s, causal, window_left, window_right, softcap, alibi_slopes, attn_bias,
                                    attention_chunk, sinks_in);
  const Tiles tiles(check_block_sparse(q_in, s, block_kv, block_q, block_size), block_kv, block_q);
  const DropoutTiles dropout(check_dropout(q_in, dropout_p, dropout_rng), dropout_p, dropout_rng, s);

  at::Tensor out = at::empty({s.batch, s.seqlen_q, s.nheads, s.head_dim}, q_in.options());
  at::Tensor lse = at::empty({s.batch, s.nheads, s.seqlen_q}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.seqlen_k == 0) {  // no keys: every row sees nothing (but its sink)
    out.zero_();
    if (sinks_in.has_value()) lse.copy_(sinks_in->detach().to(at::kFloat).view({1, s.nheads, 1}).expand_as(lse));
    else lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  at::NoGradGuard no_grad;
  const auto acc = fwd_type(dtype, s);
  // Copies only where the type changes; strided layouts are read as they are.
  const at::Tensor q = q_in.detach().to(acc), k = k_in.detach().to(acc), v = v_in.detach().to(acc);
  at::Tensor out_acc = acc == dtype ? out : at::empty(out.sizes(), out.options().dtype(acc));
  const int64_t group = s.nheads / s.nheads_k;
  const int64_t n_mblocks = num_blocks(s.seqlen_q, tiles.bm);
  const double inf = std::numeric_limits<double>::infinity();
  const KeyRange mask(s.seqlen_q, s.seqlen_k, f);
  const ScoreMods mods = make_mods(s, f, alibi_slopes, attn_bias);
  const std::vector<double> sinks = sink_values(sinks_in);

  auto make_scratch = [&]() {
    return std::make_pair(at::empty({kBlockM, kBlockN}, q.options()), at::empty({kBlockM, s.head_dim}, q.options()));
  };
  for_each_block(s.batch, s.nheads, n_mblocks, make_scratch, [&](int64_t mb, int64_t h, int64_t b, auto& bufs) {
    at::Tensor& s_buf = bufs.first;
    at::Tensor& o_buf = bufs.second;
    const int64_t m0 = mb * tiles.bm, mlen = std::min(tiles.bm, s.seqlen_q - m0);
    // scale * Q_i (mlen x head_dim): the scale folded into Q as PyTorch's own attention does.
    const at::Tensor q_i = q.select(0, b).select(1, h).narrow(0, m0, mlen) * scale;
    const at::Tensor k_h = k.select(0, b).select(1, h / group);  // seqlen_k x head_dim
    const at::Tensor v_h = v.select(0, b).select(1, h / group);  // seqlen_k x head_dim
    at::Tensor o_i = front(o_buf, mlen, s.head_dim).zero_();
    at::Tensor m_i = at::full({mlen}, -inf, q.options());  // running max of S
    at::Tensor l_i = at::zeros({mlen}, q.options());       // running sum of exp(S - m)
    // The key tiles of the keys some row of this block sees (Tiles::key_tiles).
    tiles.key_tiles(b, h, mb, mask.keys(m0, mlen), [&](int64_t n0, int64_t nlen) {
      at::Tensor s_ij = front(s_buf, mlen, nlen);
      at::mm_out(s_ij, q_i, k_h.narrow(0, n0, nlen).t());
      mods.apply(s_ij, b, h, m0, n0, nullptr);
      mask.apply(s_ij, m0, n0);
      const at::Tensor m_new = at::maximum(m_i, s_ij.amax(1));
      // Rows that have seen no key yet keep m = -inf; subtract 0 there so exp gives 0, not NaN.
      const at::Tensor m_safe = m_new.masked_fill(m_new == -inf, 0.0);
      const at::Tensor alpha = (m_i - m_safe).exp_();
      s_ij.sub_(m_safe.unsqueeze(1)).exp_();  // s_ij now holds P
      l_i.mul_(alpha).add_(s_ij.sum(1));  // the normalization sums the probabilities before dropout
      if (dropout.on) s_ij.mul_(dropout.factors(b, h, m0, mlen, n0, nlen, s_ij.options()));
      o_i.mul_(alpha.unsqueeze(1)).addmm_(s_ij, v_h.narrow(0, n0, nlen));
      m_i = m_new;
    });
    if (!sinks.empty()) fold_sink(m_i, l_i, &o_i, sinks[h]);
    // Epilogue: O /= l, lse = m + log(l); a row that saw no key (and no sink) gets O = 0 and lse = -inf.
    const at::Tensor seen = l_i > 0;
    o_i.div_(at::where(seen, l_i, at::ones_like(l_i)).unsqueeze(1));
    out_acc.select(0, b).select(1, h).narrow(0, m0, mlen).copy_(o_i);
    lse.select(0, b).select(0, h).narrow(0, m0, mlen).copy_(at::where(seen, m_i + l_i.log(), -inf));
  });
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double softmax_scale, bool causal,
    bool /*deterministic: the CPU backward is always deterministic*/, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
    int64_t attention_chunk, const std::optional<at::Tensor>& sinks_in, bool bias_requires_grad,
    const std::optional<at::Tensor>& block_kv, const std::optional<at::Tensor>& block_q, int64_t block_size, double dropout_p,
    const std::optional<at::Tensor>& dropout_rng) {
  const AttnShape s = check_qkv(q_in, k_in, v_in);
  check_bwd_args(dout_in, q_in, out_in, lse_in, s);
  const auto dtype = q_in.scalar_type();
  check_cpu_dtype(dtype);
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  const Features f = check_features(q_in, s, causal, window_left, window_right, softcap, alibi_slopes, attn_bias,
                                    attention_chunk, sinks_in, bias_requires_grad);
  const Tiles tiles(check_block_sparse(q_in, s, block_kv, block_q, block_size), block_kv, block_q);
  const DropoutTiles dropout(check_dropout(q_in, dropout_p, dropout_rng), dropout_p, dropout_rng, s);

  const auto acc = kBwdAccType;
  at::Tensor dq = at::zeros({s.batch, s.seqlen_q, s.nheads, s.head_dim}, q_in.options().dtype(acc));
  at::Tensor dk = at::zeros({s.batch, s.seqlen_k, s.nheads_k, s.head_dim}, q_in.options().dtype(acc));
  at::Tensor dv = at::zeros({s.batch, s.seqlen_k, s.nheads_k, s.head_dim}, q_in.options().dtype(acc));
  // dbias: the bias's sizes (a dim of size 1 sums over the rows, keys, heads or batch it is broadcast over);
  // every element is written by one pass-1 task. Empty when not asked for, as dsinks without sinks.
  at::Tensor dbias = bias_requires_grad ? at::zeros(attn_bias->sizes(), q_in.options().dtype(acc))
                                        : at::empty({0}, q_in.options());
  at::Tensor dsinks = sinks_in.has_value() ? at::zeros({s.nheads}, q_in.options().dtype(acc))
                                           : at::empty({0}, q_in.options());
  auto finish = [&]() {
    return std::make_tuple(dq.to(dtype), dk.to(dtype), dv.to(dtype),
                           bias_requires_grad ? dbias.to(attn_bias->scalar_type()) : dbias,
                           sinks_in.has_value() ? dsinks.to(sinks_in->scalar_type()) : dsinks);
  };
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0 || s.nheads == 0) return finish();

  at::NoGradGuard no_grad;
  const at::Tensor q = q_in.detach().to(acc), k = k_in.detach().to(acc), v = v_in.detach().to(acc);
  // S is recomputed in the forward's compute type (float64, or float32 for bf16/fp16 and large float32).
  // With sinks S is computed in float64 too: dsinks sums exp(sink - lse) D over every row of a head, and the float32
  // S's rounding, added up over the rows, could exceed what PyTorch's float32 gradient gets (seen on 1023-row cases).
  const bool s_is_acc = fwd_type(dtype, s) == acc || sinks_in.has_value();
  const at::Tensor q_s = s_is_acc ? q : q_in.detach().to(fwd_type(dtype, s));
  const at::Tensor k_s = s_is_acc ? k : k_in.detach().to(fwd_type(dtype, s));
  const at::Tensor dout = dout_in.detach().to(acc);
  // Where the forward computed in float64, the saved float32 lse is too coarse for the gradients: pass 1
  // recomputes lse in float64 (one more sweep of S per row block) and P = exp(S - lse) is then exact to
  // float64, with P = 1 exactly for a row that sees one key. Otherwise S is rounded to float32 and the
  // saved lse is used, as the forward computed them.
  // With sinks it is recomputed in float32 S's case too: dsinks sums exp(sink - lse) D over every row of a head,
  // and the float32 lse's rounding, added up over the rows, exceeded what PyTorch's float32 gradient gets.
  const bool exact_lse = s_is_acc || sinks_in.has_value();
  // lse = -inf (a row that sees no key) would give exp(s - lse) = inf; +inf gives P = 0 instead.
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor lse = exact_lse ? at::empty({s.batch, s.nheads, s.seqlen_q}, q.options())
                                   : lse_in.detach().to(acc).masked_fill(lse_in == -inf, inf);
  // D = rowsum(dO * O) = sum_j P_ij dP_ij: batch x nheads x seqlen_q, filled by pass 1.
  at::Tensor D = at::empty({s.batch, s.nheads, s.seqlen_q}, q.options());
  const int64_t group = s.nheads / s.nheads_k;
  const int64_t n_mblocks = num_blocks(s.seqlen_q, tiles.bm), n_nblocks = num_blocks(s.seqlen_k, tiles.bn);
  const KeyRange mask(s.seqlen_q, s.seqlen_k, f);
  const ScoreMods mods = make_mods(s, f, alibi_slopes, attn_bias);
  const std::vector<double> sinks = sink_values(sinks_in);
  const bool has_softcap = f.softcap > 0;

  // Per-thread tiles: S in the score type, P and dP (later dS) in float64, tanh(S_raw / softcap) in the score type.
  struct Bufs {
    at::Tensor s, p, dp, t;
  };
  auto make_tiles = [&]() {
    return Bufs{at::empty({kBlockM, kBlockN}, q_s.options()), at::empty({kBlockM, kBlockN}, q.options()),
                 at::empty({kBlockM, kBlockN}, q.options()),
                 has_softcap ? at::empty({kBlockM, kBlockN}, q_s.options()) : at::Tensor()};
  };
  // S (mlen x nlen) for rows m0.. of head h and keys n0.., modified and masked as in the forward, in the score type.
  auto scores = [&](int64_t b, int64_t h, int64_t m0, int64_t mlen, int64_t n0, int64_t nlen, Bufs& t) {
    at::Tensor s_ij = front(t.s, mlen, nlen);
    at::mm_out(s_ij, q_s.select(0, b).select(1, h).narrow(0, m0, mlen) * scale,
               k_s.select(0, b).select(1, h / group).narrow(0, n0, nlen).t());
    at::Tensor t_ij;
    if (has_softcap) t_ij = front(t.t, mlen, nlen);
    mods.apply(s_ij, b, h, m0, n0, has_softcap ? &t_ij : nullptr);
    mask.apply(s_ij, m0, n0);
    return s_ij;
  };
  // Recomputes P and dP (mlen x nlen) for rows m0.. of head h and keys n0..: dP = dO V^T, times the dropout
  // factors F with dropout (the gradient of P through P o F; D = sum_j P dP stays dO . O).
  auto recompute = [&](int64_t b, int64_t h, int64_t m0, int64_t mlen, int64_t n0, int64_t nlen, Bufs& t) {
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
    if (dropout.on) dp.mul_(dropout.factors(b, h, m0, mlen, n0, nlen, dp.options()));
    return std::make_pair(p, dp);
  };
  // dS = P * (dP - D), in place of dP: the gradient of the score after the modifiers (dbias).
  auto make_ds = [&](int64_t b, int64_t h, int64_t m0, int64_t mlen, at::Tensor& p, at::Tensor& dp) {
    return dp.sub_(D.select(0, b).select(0, h).narrow(0, m0, mlen).unsqueeze(1)).mul_(p);
  };
  // dS_raw, the gradient of scale * Q K^T: through the softcap's tanh, dS * (1 - t^2), in place.
  auto raw_ds = [&](at::Tensor& ds, int64_t mlen, int64_t nlen, Bufs& t) {
    if (has_softcap) ds.mul_(front(t.t, mlen, nlen).square().neg_().add_(1.0));
  };

  // Pass 1, parallel over (batch, head, row block): D = sum_j P_ij dP_ij (self-consistent with the
  // recomputed P, so the rows of dS sum to zero, and to exactly zero for a row with one key), then dQ and dbias.
  // A bias broadcast over batch, heads or rows makes those dims serial (one owner per dbias element).
  Serial serial;
  if (bias_requires_grad) {
    serial.batch = dbias.size(0) == 1, serial.heads = dbias.size(1) == 1, serial.blocks = dbias.size(2) == 1;
  }
  for_each_block(s.batch, s.nheads, n_mblocks, make_tiles, [&](int64_t mb, int64_t h, int64_t b, Bufs& t) {
    const int64_t m0 = mb * tiles.bm, mlen = std::min(tiles.bm, s.seqlen_q - m0);
    const auto range = mask.keys(m0, mlen);
    if (exact_lse) {  // online max and sum over the row block's keys (and its sink), as in the forward
      at::Tensor m_i = at::full({mlen}, -inf, q.options()), l_i = at::zeros({mlen}, q.options());
      tiles.key_tiles(b, h, mb, range, [&](int64_t n0, int64_t nlen) {
        at::Tensor s_ij = scores(b, h, m0, mlen, n0, nlen, t);
        const at::Tensor m_new = at::maximum(m_i, s_ij.amax(1));
        const at::Tensor m_safe = m_new.masked_fill(m_new == -inf, 0.0);
        l_i.mul_((m_i - m_safe).exp_()).add_(s_ij.sub_(m_safe.unsqueeze(1)).exp_().sum(1));
        m_i = m_new;
      });
      if (!sinks.empty()) fold_sink(m_i, l_i, nullptr, sinks[h]);
      lse.select(0, b).select(0, h).narrow(0, m0, mlen).copy_(at::where(l_i > 0, m_i + l_i.log(), inf));
    }
    at::Tensor d_i = D.select(0, b).select(0, h).narrow(0, m0, mlen).zero_();
    tiles.key_tiles(b, h, mb, range, [&](int64_t n0, int64_t nlen) {
      auto [p, dp] = recompute(b, h, m0, mlen, n0, nlen, t);
      d_i.add_((p * dp).sum(1));
    });
    at::Tensor dq_i = dq.select(0, b).select(1, h).narrow(0, m0, mlen);
    tiles.key_tiles(b, h, mb, range, [&](int64_t n0, int64_t nlen) {
      auto [p, dp] = recompute(b, h, m0, mlen, n0, nlen, t);
      at::Tensor ds = make_ds(b, h, m0, mlen, p, dp);
      if (bias_requires_grad) {  // dbias += dS, summed over the dims the bias is broadcast over
        at::Tensor db = ScoreMods::tile_of(dbias, b, h, m0, mlen, n0, nlen);
        at::Tensor red = db.size(0) == 1 ? ds.sum(0, /*keepdim=*/true) : ds;
        if (db.size(1) == 1) red = red.sum(1, /*keepdim=*/true);
        db.add_(red);
      }
      raw_ds(ds, mlen, nlen, t);
      dq_i.addmm_(ds, k.select(0, b).select(1, h / group).narrow(0, n0, nlen), 1.0, scale);  // dQ += scale dS K
    });
  });

  // dsink_h = -sum over (batch, rows) of exp(sink_h - lse) * D: the sink's share of each row's denominator
  // times the row's dO . O. A row that sees nothing has D = 0.
  if (!sinks.empty()) {
    const at::Tensor sink = at::tensor(sinks, q.options()).view({1, s.nheads, 1});
    dsinks.copy_((sink - lse).exp_().mul_(D).sum(2).sum(0).neg_());
  }

  // Pass 2: dK and dV, parallel over (batch, K/V head, column block); sums over the group's heads, over the
  // query blocks that see the column block.
  for_each_block(s.batch, s.nheads_k, n_nblocks, make_tiles, [&](int64_t nb, int64_t hk, int64_t b, Bufs& t) {
    const int64_t n0 = nb * tiles.bn, nlen = std::min(tiles.bn, s.seqlen_k - n0);
    at::Tensor dk_j = dk.select(0, b).select(1, hk).narrow(0, n0, nlen);
    at::Tensor dv_j = dv.select(0, b).select(1, hk).narrow(0, n0, nlen);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      tiles.row_blocks(b, h, nb, n_mblocks, [&](int64_t mb) {
        const int64_t m0 = mb * tiles.bm, mlen = std::min(tiles.bm, s.seqlen_q - m0);
        const auto [k_min, k_max] = mask.keys(m0, mlen);
        if (k_max <= n0 || k_min >= n0 + nlen || k_min == k_max) return;  // no row of this block sees the keys
        // Pass 1's tile of this row block (cut at its k_max): the same operands give bitwise the same S and dP, so
        // dS = P * (dP - D) is exactly 0 where pass 1's is (a row that sees one key). Keys past k_max get nothing.
        const int64_t tlen = std::min(nlen, k_max - n0);
        auto [p, dp] = recompute(b, h, m0, mlen, n0, tlen, t);
        // dV += (P o F)^T dO (F: the dropout factors, 1 without dropout)
        const at::Tensor pf = dropout.on ? p * dropout.factors(b, h, m0, mlen, n0, tlen, p.options()) : p;
        dv_j.narrow(0, 0, tlen).addmm_(pf.t(), dout.select(0, b).select(1, h).narrow(0, m0, mlen));
        at::Tensor ds = make_ds(b, h, m0, mlen, p, dp);
        raw_ds(ds, mlen, tlen, t);
        dk_j.narrow(0, 0, tlen).addmm_(ds.t(), q.select(0, b).select(1, h).narrow(0, m0, mlen), 1.0, scale);  // dK
      });
    }
  });
  return finish();
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k,
    std::optional<double> softmax_scale, bool causal, bool deterministic, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t attention_chunk,
    const std::optional<at::Tensor>& sinks) {
  check_cpu_dtype(q.scalar_type());
  return varlen_forward_by_sequence(attention_forward_cpu, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, seqused_k, softmax_scale, causal, deterministic, window_left,
                                    window_right, softcap, alibi_slopes, attention_chunk, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& seqused_k, double softmax_scale, bool causal,
    bool deterministic, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, int64_t attention_chunk, const std::optional<at::Tensor>& sinks) {
  check_cpu_dtype(q.scalar_type());
  return varlen_backward_by_sequence(attention_backward_cpu, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, seqused_k, softmax_scale, causal, deterministic,
                                     window_left, window_right, softcap, alibi_slopes, attention_chunk, sinks);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_ext, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_varlen_forward", &attention_varlen_forward_cpu);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cpu);
}

}  // namespace flash_ext
