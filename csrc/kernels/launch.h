// Entry points of the CUDA kernels, one per (direction, instantiated head dim).
// Each is defined in its own instantiations/*.cu file so the build compiles them in parallel;
// each dispatches on params.is_bf16 and params.is_causal internally, and returns whether it launched
// (false: a shape it does not take; the API layer raises then, never returns unwritten outputs).
#pragma once
#include <cuda_runtime.h>
#include "instantiations/head_dims.h"  // kSm80FwdHeadDims, ...: tools/generate_instantiations.py
#include "params.h"

namespace flash_ext {

template <int kHeadDim> bool run_fwd_sm80(const FwdParams& params, cudaStream_t stream);
template <int kHeadDim> bool run_bwd_sm80(const BwdParams& params, cudaStream_t stream);

}  // namespace flash_ext
