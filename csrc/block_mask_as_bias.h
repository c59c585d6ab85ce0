// Block-sparse attention on CUDA until its kernels walk the lists (docs/ARCHITECTURE.md, "Block-sparse attention",
// step 2): the block mask is expanded into an element mask and folded into attn_bias, which the kernels' general
// path reads in place (csrc/kernels/score_mod.cuh). Exact, with every feature, but it costs what a bias costs and
// (Bm, Hm, seqlen_q, seqlen_k) elements of memory; the skipped blocks are not skipped. Torch-dependent (ATen only).
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <optional>

#include "attention_checks.h"

namespace flash_ext {
namespace {

// (Bm, Hm, seqlen_q, seqlen_k) bool: True where the block lists (block_kv, check_block_sparse) compute the element.
// Built on the device from the lists without reading them on the host: no synchronization. Entries past a list's
// count are ignored; an out-of-range index (a caller's broken list) is clamped, never read out of bounds.
inline at::Tensor block_mask_elements(const at::Tensor& block_kv, const AttnShape& s, const BlockSparse& sp) {
  const auto long_opts = block_kv.options().dtype(at::kLong);
  const int64_t n_kb = sp.n_kb;
  const at::Tensor counts = block_kv.select(3, 0).unsqueeze(3).to(at::kLong);      // (Bm, Hm, n_qb, 1)
  const at::Tensor slots = at::arange(n_kb, long_opts).view({1, 1, 1, n_kb});      // list positions
  const at::Tensor used = slots < counts;                                           // (Bm, Hm, n_qb, n_kb)
  const at::Tensor idx = at::where(used, block_kv.narrow(3, 1, n_kb).to(at::kLong), at::zeros_like(slots))
                             .clamp(0, n_kb - 1);
  // Added, not scattered: an unused slot's 0 at index 0 never overwrites a used entry's 1.
  const at::Tensor blocks = at::zeros(used.sizes(), block_kv.options()).scatter_add_(3, idx, used.to(at::kInt)) > 0;
  const at::Tensor rows = at::arange(s.seqlen_q, long_opts).div_(sp.block_size, "floor");
  const at::Tensor cols = at::arange(s.seqlen_k, long_opts).div_(sp.block_size, "floor");
  return blocks.index_select(2, rows).index_select(3, cols);
}

// attn_bias with the block mask folded in: the element mask alone (no bias), the bias and the mask (a bool bias), or
// the bias with -inf where the mask hides (a float bias, in float32 so that its gradient, summed back to the
// caller's broadcast shape by block_dbias, is not rounded twice).
inline at::Tensor block_mask_as_bias(const at::Tensor& block_kv, const std::optional<at::Tensor>& attn_bias,
                                     const AttnShape& s, const BlockSparse& sp) {
  const at::Tensor elems = block_mask_elements(block_kv, s, sp);
  if (!attn_bias.has_value()) return elems;
  if (attn_bias->scalar_type() == at::kBool) return at::logical_and(*attn_bias, elems);
  return at::where(elems, attn_bias->to(at::kFloat), -std::numeric_limits<float>::infinity());
}

// The gradient of the caller's bias from that of the folded bias: summed over the dims the caller's bias broadcasts.
inline at::Tensor block_dbias(const at::Tensor& folded_dbias, const at::Tensor& attn_bias) {
  return folded_dbias.sum_to_size(attn_bias.sizes()).to(attn_bias.scalar_type());
}

}  // namespace
}  // namespace flash_ext
