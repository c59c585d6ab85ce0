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

// Instantiated sm80 head dim (32, 64, ..., 256: see launch.h). Binds `kHeadDim`; `rounded` must be one of
// them (the API rounds the real head dim up first).
#define HEADDIM_SWITCH(ROUNDED, ...)                                 \
  [&] {                                                              \
    switch (ROUNDED) {                                               \
      case 32: { constexpr static int kHeadDim = 32; return __VA_ARGS__(); }   \
      case 64: { constexpr static int kHeadDim = 64; return __VA_ARGS__(); }   \
      case 96: { constexpr static int kHeadDim = 96; return __VA_ARGS__(); }   \
      case 128: { constexpr static int kHeadDim = 128; return __VA_ARGS__(); } \
      case 160: { constexpr static int kHeadDim = 160; return __VA_ARGS__(); } \
      case 192: { constexpr static int kHeadDim = 192; return __VA_ARGS__(); } \
      case 224: { constexpr static int kHeadDim = 224; return __VA_ARGS__(); } \
      default: { constexpr static int kHeadDim = 256; return __VA_ARGS__(); }  \
    }                                                                \
  }()
