// Pipeline state of an mbarrier ring: which of kStages shared-memory slots a role uses next and the
// parity its barriers are at. Every role (producer, consumers) keeps one per ring and advances it in one
// place; kernels never derive stage / phase from a counter of their own.
#pragma once

namespace flash_ext {
namespace sm90 {

template <int kStages>
struct PipelineState {
  int count = 0;  // slot uses so far on this ring

  PipelineState() = default;  // (no __device__: nvcc ignores it on a defaulted constructor, warning #20012)
  __device__ __forceinline__ explicit PipelineState(int count_) : count(count_) {}

  __device__ __forceinline__ int stage() const { return count % kStages; }
  __device__ __forceinline__ int phase() const { return (count / kStages) & 1; }
  // The state `n` uses later (n may be negative: an earlier slot).
  __device__ __forceinline__ PipelineState advanced(int n) const { return PipelineState(count + n); }
  __device__ __forceinline__ void advance(int n = 1) { count += n; }
};

}  // namespace sm90
}  // namespace flash_ext
