// CUDA implementations of the flash_ext ops. The tensor-core kernels land with the sm80 issue; until
// then a CUDA tensor gets a clear NotImplementedError (never a silent copy to the CPU).
#include <torch/library.h>

#include "../attention_checks.h"

namespace flash_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, std::optional<double>, bool,
                                                          bool) {
  check_qkv(q, k, v);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "flash_ext: the CUDA attention kernels are not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor&, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor&, const at::Tensor&,
                                                                       double, bool, bool) {
  check_qkv(q, k, v);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "flash_ext: the CUDA attention kernels are not implemented yet");
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_ext, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace flash_ext
