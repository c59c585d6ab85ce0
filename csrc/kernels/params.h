// Plain parameter structs passed by value (as __grid_constant__) to every kernel.
// Torch-free: the API layer (csrc/cuda/attention_api.cu) fills them from tensors.
// All strides are in elements. Offsets into the tensors are computed in int64_t.
#pragma once
#include <cstdint>

namespace flash_ext {

// BwdParams::dsink_accum's slots per 128 keys of each (batch, head) row.
constexpr int kDsinkSlotsPer128Keys = 16;

struct FwdParams {
  // Inputs.
  const void* q;  // batch x seqlen_q x nheads x head_dim
  const void* k;  // batch x seqlen_k x nheads_k x head_dim
  const void* v;  // batch x seqlen_k x nheads_k x head_dim
  // Outputs.
  void* out;      // batch x seqlen_q x nheads x head_dim
  float* lse;     // batch x nheads x seqlen_q (contiguous), natural log

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  int batch, seqlen_q, seqlen_k, nheads, nheads_k;
  int head_dim;        // the real head dim (multiple of 8); kernels run on kHeadDim >= head_dim
  int h_h_k_ratio;     // nheads / nheads_k: query head h reads K/V head h / h_h_k_ratio

  float scale_softmax;       // softmax scale (natural units)
  float scale_softmax_log2;  // softmax scale * log2(e): exp(x*scale) == exp2(x*scale_log2)

  bool is_bf16;   // element type of q/k/v/out/dout/dq/dk/dv: bf16 if true, else fp16
  bool is_causal; // bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q
  // The general path runs when set: the local mask policy (Mask<IsCausal, true> of mask.cuh: a sliding window
  // and/or chunks) and the score modifiers below, all at run time. It sits in the padding after is_causal, so no
  // earlier field moves.
  bool is_local;
  int num_sm;     // multiprocessor count of the device (for grid sizing)
  // Local mask only (is_local): with i' = i + seqlen_k - seqlen_q, query i sees keys
  // [i' - window_left, i' + window_right] in the chunk of i' (attention_chunk > 0). The API layer folds causal
  // into window_right = 0 and an unbounded side into seqlen_q + seqlen_k, so both bounds are >= 0 here.
  int window_left, window_right;
  int attention_chunk;  // 0: no chunks
  // Score modifiers (csrc/kernels/score_mod.cuh), general path only (is_local): the raw score s = q.k becomes
  //   softcap_out * tanh(s * softcap_in)        softcap_in = scale / softcap, softcap_out = softcap / scale
  // (0, 0: no softcap), plus -slope / scale * |i' - j| with slope alibi_slopes[b * alibi_batch_stride + h]
  // (float32; nullptr: no ALiBi). Both stay in raw units, so the softmax, the lse and the backward's scale
  // are those of the plain path.
  float softcap_in, softcap_out;
  const float* alibi_slopes;
  int64_t alibi_batch_stride;  // 0: one slope per head for every batch entry
  // Attention sinks (general path only): float32, one logit per query head, joining each row's softmax
  // denominator (softmax.cuh, finalize_row_with_sink); nullptr: none. The backward needs nothing of them: its P
  // comes from the sink-aware lse; the key-side backward kernels add up the sinks' gradient terms
  // (BwdParams::dsink_accum).
  const float* sinks;
  // Attention bias (general path only; score_mod.cuh): element (b, h, i, j) at attn_bias + b * bias_batch_stride +
  // h * bias_head_stride + i * bias_row_stride + j * bias_col_stride (elements; 0 on a broadcast dim), h the query
  // head. bias_kind: 0 none, 1 bool (1 byte; false hides the key), 2 float32, 3 the inputs' element type. A float
  // bias is added to the scaled score (raw units: bias / scale).
  const void* attn_bias;
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;
  int bias_kind;
  // Variable-length batches (general path only; seqinfo.cuh): with cu_seqlens_q set, entry b's query rows are
  // cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of the packed q / out (total_q rows), its keys cu_seqlens_k[b] .. + (seqused_k[b] or
  // cu_seqlens_k[b + 1] - cu_seqlens_k[b]) of k / v (total_k rows); batch, seqlen_q and seqlen_k are then the
  // sequence count and the longest lengths (the grid), and the per-row float arrays (lse) keep their dense
  // batch x nheads x seqlen_q layout. nullptr: a dense batch.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  const int* seqused_k;
  int total_q, total_k;
  // Attention dropout (general path only; csrc/kernels/dropout.cuh): (seed, offset) as two int64 on the device (the
  // op's dropout_rng, drawn from torch's generator without a host sync); nullptr: no dropout. An element is kept
  // iff its Philox word >= dropout_threshold = floor(p 2^32); kept probabilities are scaled by dropout_scale =
  // 1 / (1 - p). Dense batches only (the counters use batch, nheads, seqlen_q, seqlen_k above).
  const int64_t* dropout_rng;
  uint32_t dropout_threshold;
  float dropout_scale;
};

struct BwdParams : public FwdParams {
  const void* dout;  // batch x seqlen_q x nheads x head_dim
  void* dq;          // batch x seqlen_q x nheads x head_dim
  void* dk;          // batch x seqlen_k x nheads_k x head_dim
  void* dv;          // batch x seqlen_k x nheads_k x head_dim
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  // Workspace allocated by the API layer (float32, contiguous).
  float* dq_accum;  // batch x nheads x seqlen_q_rounded x head_dim_rounded; uninitialized: run_bwd zeroes it
  float* dsoftmax_sum;  // D = rowsum(dO * O): batch x nheads x seqlen_q_rounded
  int seqlen_q_rounded;  // seqlen_q rounded up to a multiple of 128
  int head_dim_rounded;  // kHeadDim of the instantiation that runs (multiple of 32)

  bool deterministic;  // dq bitwise reproducible run to run (sm80: no float atomics in dq; sm90: ordered adds)
  // sm80 backward: the shared memory per block its launcher may assume (bytes); 0 = the device's opt-in limit.
  // Below what the main tile configuration needs, the launcher takes the smaller fallback configuration (an
  // A100's limit on a Hopper GPU: FLASH_EXT_SM80_SMEM_LIMIT, so the tests run the fallback kernels there).
  // It sits in the padding after `deterministic`, so no other field's offset (nor any kernel's code) moves.
  int sm80_smem_limit;
  // sm90 deterministic backward only (nullptr otherwise): one int32 counter per 64 query rows,
  // batch x nheads x (seqlen_q_rounded / 64), uninitialized: the sm90 preprocess kernel zeroes it.
  int* dq_semaphore;
  // sm90 backward only (nullptr otherwise): batch x nheads x seqlen_q_rounded, lse * log2(e), +inf for rows past
  // seqlen_q and rows that see no key (so P = 0 there); uninitialized: the sm90 preprocess kernel writes it, the
  // main kernel's producer copies it to shared memory with one bulk copy per step.
  float* lse_log2;
  // sm90 backward only (nullptr otherwise): one int32, the tile counter of the persistent causal kernel's dynamic
  // schedule; uninitialized: the sm90 preprocess kernel zeroes it (the API places it after lse_log2's rows).
  int* tile_counter;
  // dbias (a float bias that requires grad): batch x nheads x seqlen_q x seqlen_k float32, zeroed by the API layer;
  // the key-side backward kernel writes dS of every tile it visits (each element once), the API layer sums it over
  // the bias's broadcast dims. nullptr: no dbias.
  float* dbias_accum;
  // dsinks (with sinks): batch x nheads x dsink_slots float32, zeroed by the API layer. Warp w of the key-side
  // backward kernel's CTA for key block n adds, in slot n * (its warps) + w of (b, h), its terms
  // exp(sink_h - lse_i) P_ij dP_ij (P_ij dP_ij summed over keys is D_i in float32, not D from the 16-bit O);
  // dsink_h = -(sum of the (b, h) slots over b), reduced by the API layer. One writer per slot, so the sum is
  // reproducible in every mode. dsink_slots = kDsinkSlotsPer128Keys * ceil(seqlen_k / 128) (score_mod.cuh, dsink_slot).
  float* dsink_accum;
  int dsink_slots;
};

}  // namespace flash_ext
