// Bind run-time values to constexpr names, so one call site instantiates each variant once.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// Mask policy (mask.cuh): binds CAUSAL_NAME and LOCAL_NAME. The local policy runs in the kernels' non-causal
// configuration (its work per query block is nearly uniform), so (IsCausal, IsLocal) is one of (false, false),
// (true, false) and (false, true).
#define MASK_SWITCH(IS_CAUSAL, IS_LOCAL, CAUSAL_NAME, LOCAL_NAME, ...) \
  [&] {                                                                \
    if (IS_LOCAL) {                                                    \
      constexpr static bool CAUSAL_NAME = false;                       \
      constexpr static bool LOCAL_NAME = true;                         \
      return __VA_ARGS__();                                            \
    } else {                                                           \
      constexpr static bool LOCAL_NAME = false;                        \
      return BOOL_SWITCH(IS_CAUSAL, CAUSAL_NAME, __VA_ARGS__);         \
    }                                                                  \
  }()

// MASK_SWITCH and dropout: binds DROPOUT_NAME as well, true only with the local policy (the general path; the API
// layer turns it on for dropout). The general path with dropout is an instantiation of its own, so that the kernels
// without it keep their machine code (csrc/kernels/dropout.cuh).
#define VARIANT_SWITCH(IS_CAUSAL, IS_LOCAL, HAS_DROPOUT, CAUSAL_NAME, LOCAL_NAME, DROPOUT_NAME, ...) \
  [&] {                                                                                           \
    if (IS_LOCAL) {                                                                               \
      constexpr static bool CAUSAL_NAME = false;                                                  \
      constexpr static bool LOCAL_NAME = true;                                                    \
      return BOOL_SWITCH(HAS_DROPOUT, DROPOUT_NAME, __VA_ARGS__);                                 \
    } else {                                                                                      \
      constexpr static bool LOCAL_NAME = false;                                                   \
      constexpr static bool DROPOUT_NAME = false;                                                 \
      return BOOL_SWITCH(IS_CAUSAL, CAUSAL_NAME, __VA_ARGS__);                                    \
    }                                                                                             \
  }()

// Element type: bf16 or fp16. Binds `elem_type`.
#define DTYPE_SWITCH(IS_BF16, ...)          \
  [&] {                                     \
    if (IS_BF16) {                          \
      using elem_type = __nv_bfloat16;      \
      return __VA_ARGS__();                 \
    } else {                                \
      using elem_type = __half;             \
      return __VA_ARGS__();                 \
    }                                       \
  }()
