// The one __global__ entry point of the Hopper kernels (the forward's FwdKernel, the backward's BwdKernel and its
// head-dim-256 variant): Kernel::run on the kernel's __grid_constant__ argument struct (FwdTmaArgs / BwdTmaArgs,
// which hold the TMA maps in parameter space).
//
// The body exists only in the sm_90a pass; an sm_80 pass (a build listing both) compiles an empty kernel that
// must never be launched (the API checks compute capability 9.0). Any other pass >= 9.0 (plain sm_90,
// sm_100, ...) would silently run nothing, so it is refused at compile time.
#pragma once
#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "csrc/kernels/sm90 needs -gencode=arch=compute_90a,code=sm_90a (wgmma, setmaxnreg), not plain sm_90 or newer"
#endif

namespace flash_ext {
namespace sm90 {

template <typename Kernel, typename Args>
__global__ void __launch_bounds__(Kernel::kNThreads, 1) sm90_kernel(const __grid_constant__ Args args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Kernel::run(args);
#endif
}

}  // namespace sm90
}  // namespace flash_ext
