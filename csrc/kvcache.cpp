// attention_with_kvcache (issue 18; docs/ARCHITECTURE.md, "KV-cache attention"), step 1: one implementation for
// every device (CompositeExplicitAutograd), written with ATen operations and the varlen forward op, so it never
// synchronizes with the host and allocates nothing whose size depends on tensor values (CUDA-graph safe):
//   1. the new k / v (if given) are written into the cache in place at positions cache_seqlens[b] ..
//      (through block_table's pages when the cache is paged);
//   2. the keys of each batch row are gathered as one packed row per batch entry (no copy for a contiguous cache
//      without cache_batch_idx; the cache rows, or the pages of the block table, otherwise), and
//   3. attention_varlen_forward attends query row b to the first cache_seqlens[b] + seqlen_new keys of its row
//      (seqused_k), causal / window / ALiBi bottom-right aligned to them (the end of the updated cache).
// A split-KV decoding kernel reading the pages in place is the next step; this one reads each key once more for
// the gather where there is one, and decodes at the varlen kernel's speed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_checks.h"

namespace flash_ext {
namespace {

using OptTensor = std::optional<at::Tensor>;
using VarlenFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    const OptTensor&, std::optional<double>, bool, bool, int64_t, int64_t, double, const OptTensor&, int64_t,
    const OptTensor&);

struct CacheShape {
  int64_t batch, seqlen_q, nheads, nheads_k, head_dim;
  int64_t cache_rows;  // contiguous: batch_cache; paged: num_pages
  int64_t page;        // contiguous: seqlen_cache (one "page" per row); paged: page_size
  int64_t max_pages;   // contiguous: 1; paged: block_table.size(1)
  int64_t seqlen_new;  // rows of k / v (0 without)
  bool paged;
  int64_t capacity() const { return page * max_pages; }  // the keys a batch row can hold
};

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dims, int64_t batch) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
  TORCH_CHECK(t.dim() == dims && t.size(0) == batch, name, " must be a ", fmt(dims), "-D tensor with batch = ",
              fmt(batch), " rows, got shape ", fmt(t.sizes()));
}

CacheShape check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const OptTensor& k_new, const OptTensor& v_new, const OptTensor& cache_seqlens,
                         const OptTensor& cache_batch_idx, const OptTensor& block_table, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4, "q must be a 4-D tensor (batch, seqlen_q, nheads, head_dim), got ", fmt(q.dim()), "-D");
  const char* cache_layout = block_table.has_value() ? "(num_pages, page_size, nheads_k, head_dim)"
                                                     : "(batch_cache, seqlen_cache, nheads_k, head_dim)";
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be a 4-D tensor ", cache_layout, ", got ", fmt(k_cache.dim()), "-D");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", fmt(k_cache.sizes()),
              ", got ", fmt(v_cache.sizes()));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
  }
  CacheShape c;
  c.batch = q.size(0), c.seqlen_q = q.size(1), c.nheads = q.size(2), c.head_dim = q.size(3);
  c.nheads_k = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == c.head_dim, "k_cache must have the head_dim of q (", fmt(c.head_dim), "), got ",
              fmt(k_cache.size(3)));
  TORCH_CHECK(c.nheads_k > 0 && c.nheads % c.nheads_k == 0, "q's nheads (", fmt(c.nheads),
              ") must be a multiple of the cache's nheads_k (", fmt(c.nheads_k), ")");
  c.paged = block_table.has_value();
  c.cache_rows = k_cache.size(0);
  c.page = k_cache.size(1);
  c.max_pages = 1;
  if (c.paged) {
    check_index_tensor(*block_table, "block_table", q, 2, c.batch);
    TORCH_CHECK(c.page > 0, "k_cache's page_size (dim 1 of a paged cache) must be > 0, got 0");
    TORCH_CHECK(!cache_batch_idx.has_value(),
                "cache_batch_idx cannot be used with a paged cache (block_table maps each batch row to its pages)");
    c.max_pages = block_table->size(1);
  } else if (cache_batch_idx.has_value()) {
    check_index_tensor(*cache_batch_idx, "cache_batch_idx", q, 1, c.batch);
  } else {
    TORCH_CHECK(c.cache_rows == c.batch, "k_cache must have batch = ", fmt(c.batch),
                " rows (q's batch) without cache_batch_idx, got ", fmt(c.cache_rows));
  }
  if (cache_seqlens.has_value()) check_index_tensor(*cache_seqlens, "cache_seqlens", q, 1, c.batch);
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "k and v must be given together (the new tokens), got only ",
              k_new.has_value() ? "k" : "v");
  c.seqlen_new = 0;
  if (k_new.has_value()) {
    TORCH_CHECK(cache_seqlens.has_value(), "cache_seqlens must be given with k / v (where the new tokens go)");
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k_new, "k"}, {*v_new, "v"}}) {
      TORCH_CHECK(t.dim() == 4 && t.size(0) == c.batch && t.size(2) == c.nheads_k && t.size(3) == c.head_dim, name,
                  " must have shape (batch, seqlen_new, nheads_k, head_dim) = (", fmt(c.batch), ", *, ",
                  fmt(c.nheads_k), ", ", fmt(c.head_dim), "), got ", fmt(t.sizes()));
      TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
                  t.scalar_type());
      TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t.device());
    }
    TORCH_CHECK(v_new->size(1) == k_new->size(1), "v must have the seqlen_new of k (", fmt(k_new->size(1)), "), got ",
                fmt(v_new->size(1)));
    c.seqlen_new = k_new->size(1);
  }
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: chosen by a heuristic, 1: no split), got ",
              fmt(num_splits));
  return c;
}

// The values' contract, checked where they can be read without a synchronization (the CPU); on CUDA it is the
// caller's: every index below is clamped into its tensor, so a broken value gives wrong numbers, never a bad access.
void check_kvcache_values(const CacheShape& c, const OptTensor& cache_seqlens, const OptTensor& cache_batch_idx,
                          const OptTensor& block_table) {
  if (!cache_seqlens.has_value()) return;
  const at::Tensor lens = cache_seqlens->contiguous();
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t n = lens.data_ptr<int32_t>()[b];
    TORCH_CHECK(n >= 0 && n + c.seqlen_new <= c.capacity(), "cache_seqlens[", fmt(b), "] = ", fmt(n),
                " with seqlen_new = ", fmt(c.seqlen_new), " must fit the cache: 0 <= cache_seqlens[b] and "
                "cache_seqlens[b] + seqlen_new <= ", fmt(c.capacity()),
                c.paged ? " (max_pages * page_size)" : " (seqlen_cache)");
    if (c.paged) {
      const at::Tensor bt = block_table->select(0, b).contiguous();
      const int64_t used_pages = (n + c.seqlen_new + c.page - 1) / c.page;
      for (int64_t p = 0; p < used_pages; ++p) {
        const int64_t page = bt.data_ptr<int32_t>()[p];
        TORCH_CHECK(page >= 0 && page < c.cache_rows, "block_table[", fmt(b), ", ", fmt(p), "] = ", fmt(page),
                    " must name a page of the cache, 0 <= page < num_pages = ", fmt(c.cache_rows));
      }
    }
  }
  if (cache_batch_idx.has_value()) {
    const at::Tensor idx = cache_batch_idx->contiguous();
    for (int64_t b = 0; b < c.batch; ++b) {
      const int64_t r = idx.data_ptr<int32_t>()[b];
      TORCH_CHECK(r >= 0 && r < c.cache_rows, "cache_batch_idx[", fmt(b), "] = ", fmt(r),
                  " must name a row of the cache, 0 <= row < batch_cache = ", fmt(c.cache_rows));
    }
  }
}

// (batch, n) int64 indices (page / cache row, slot) of the cache positions pos (batch, n), pos clamped to the
// capacity and every index into the cache.
std::pair<at::Tensor, at::Tensor> cache_index(const CacheShape& c, const at::Tensor& pos, const OptTensor& cache_batch_idx,
                                              const OptTensor& block_table) {
  const auto opts = pos.options();
  if (c.paged) {
    const at::Tensor page_of = block_table->to(at::kLong).gather(1, pos.div(c.page, "floor"));
    return {page_of.clamp(0, c.cache_rows - 1), pos.remainder(c.page)};
  }
  const at::Tensor rows = cache_batch_idx.has_value() ? cache_batch_idx->to(at::kLong).clamp(0, c.cache_rows - 1)
                                                      : at::arange(c.batch, opts);
  return {rows.unsqueeze(1).expand_as(pos), pos};
}

// Writes new (batch, seqlen_new, nheads_k, head_dim) into cache at positions cache_seqlens[b] + j. A token past
// the capacity (a broken contract on CUDA) is not written: its write is turned into one that every other write to
// the same (clamped) slot repeats with the same value, so duplicate indices never race with different values.
void append(at::Tensor& cache, const at::Tensor& fresh, const CacheShape& c, const at::Tensor& lens,
            const OptTensor& cache_batch_idx, const OptTensor& block_table) {
  const auto opts = lens.options().dtype(at::kLong);
  const at::Tensor j = at::arange(c.seqlen_new, opts).unsqueeze(0);  // (1, n)
  const at::Tensor pos = lens.to(at::kLong).unsqueeze(1) + j;        // (batch, n)
  const at::Tensor pos_c = pos.clamp(0, c.capacity() - 1);
  const at::Tensor src = j - (pos - pos_c);  // the token whose position is the clamped one (< 0: none)
  const at::Tensor has_src = src.ge(0).logical_and(src.lt(c.seqlen_new));
  auto [row, slot] = cache_index(c, pos_c, cache_batch_idx, block_table);
  const at::Tensor bidx = at::arange(c.batch, opts).unsqueeze(1).expand_as(pos);
  const at::Tensor values = fresh.index({bidx, src.clamp(0, c.seqlen_new - 1)});  // (batch, n, nheads_k, head_dim)
  const at::Tensor old = cache.index({row, slot});
  cache.index_put_({row, slot}, at::where(has_src.unsqueeze(2).unsqueeze(3), values, old));
}

// The keys of each batch row as (batch * capacity, nheads_k, head_dim) rows: the cache itself where it already is
// that (contiguous, no cache_batch_idx), else the gathered rows / pages.
at::Tensor packed_keys(const at::Tensor& cache, const CacheShape& c, const OptTensor& cache_batch_idx,
                       const OptTensor& block_table) {
  at::Tensor rows = cache;
  if (c.paged) {
    rows = cache.index_select(0, block_table->reshape({-1}).to(at::kLong).clamp(0, c.cache_rows - 1));
  } else if (cache_batch_idx.has_value()) {
    rows = cache.index_select(0, cache_batch_idx->to(at::kLong).clamp(0, c.cache_rows - 1));
  }
  return rows.reshape({c.batch * c.capacity(), c.nheads_k, c.head_dim});
}

std::tuple<at::Tensor, at::Tensor> attention_with_kvcache(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const OptTensor& k_new, const OptTensor& v_new,
    const OptTensor& cache_seqlens, const OptTensor& cache_batch_idx, const OptTensor& block_table,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& alibi_slopes, int64_t num_splits) {
  const CacheShape c =
      check_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table, num_splits);
  if (q.device().is_cpu()) check_kvcache_values(c, cache_seqlens, cache_batch_idx, block_table);
  const auto int_opts = q.options().dtype(at::kInt);
  if (c.seqlen_new > 0 && c.batch > 0 && c.capacity() > 0) {
    append(k_cache, *k_new, c, *cache_seqlens, cache_batch_idx, block_table);
    append(v_cache, *v_new, c, *cache_seqlens, cache_batch_idx, block_table);
  }
  // Keys per batch row: the cached ones and the new ones, within the capacity.
  const at::Tensor used = cache_seqlens.has_value()
                              ? (*cache_seqlens + static_cast<int32_t>(c.seqlen_new)).clamp(0, c.capacity())
                              : at::full({c.batch}, c.capacity(), int_opts);
  const at::Tensor cu_q = at::arange(c.batch + 1, int_opts).mul_(static_cast<int32_t>(c.seqlen_q));
  const at::Tensor cu_k = at::arange(c.batch + 1, int_opts).mul_(static_cast<int32_t>(c.capacity()));
  static auto varlen =
      c10::Dispatcher::singleton().findSchemaOrThrow("flash_ext::attention_varlen_forward", "").typed<VarlenFwdSig>();
  const at::Tensor k_rows = packed_keys(k_cache, c, cache_batch_idx, block_table);
  const at::Tensor v_rows = packed_keys(v_cache, c, cache_batch_idx, block_table);
  auto [out, lse] = varlen.call(q.reshape({c.batch * c.seqlen_q, c.nheads, c.head_dim}), k_rows, v_rows, cu_q, cu_k,
                                c.seqlen_q, c.batch > 0 ? c.capacity() : 0, used, softmax_scale, causal,
                                /*deterministic=*/false, window_left, window_right, softcap, alibi_slopes,
                                /*attention_chunk=*/0, /*sinks=*/std::nullopt);
  return {out.view({c.batch, c.seqlen_q, c.nheads, c.head_dim}),
          lse.view({c.nheads, c.batch, c.seqlen_q}).permute({1, 0, 2}).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_ext, CompositeExplicitAutograd, m) {
  m.impl("attention_with_kvcache", &attention_with_kvcache);
}

}  // namespace flash_ext
