// Shared by every native kernel of txfm_kernels: the C-ABI export macro, host/device
// qualifiers and the CPU dispatch attribute.
//
// Per-element math of each op lives in a header next to it (csrc/<op>/<op>_math.h) written
// with TXFM_HD so that the CUDA kernel and the C++ CPU kernel run the very same code, and the
// CPU tests therefore check the arithmetic the GPU runs.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define TXFM_HD __host__ __device__ __forceinline__
#else
#define TXFM_HD inline __attribute__((always_inline))
#endif

// Every exported symbol: plain C linkage so ctypes can call it without torch's C++ ABI.
#define TXFM_API extern "C" __attribute__((visibility("default")))

// One binary, best clone picked at load time: AVX-512, AVX2+FMA, or portable.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TXFM_CPU_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TXFM_CPU_DISPATCH
#endif

// Element type codes of every op's C ABI; txfm_kernels/_common.py (DTYPE_CODE) mirrors them.
enum txfm_dtype : int {
  TXFM_F32 = 0, TXFM_BF16 = 1, TXFM_F16 = 2, TXFM_F64 = 3,
  TXFM_I32 = 4, TXFM_I16 = 5, TXFM_U16 = 6, TXFM_U8 = 7,
};

// Every entry point takes its arguments as one struct (`txfm_<op>_args`, declared in
// csrc/<op>/<op>_math.h) that a ctypes.Structure in txfm_kernels/<op>/native.py mirrors.
// This exports `int64_t <struct>_size(void)`: the Python side compares it with its mirror
// before the first call, so a library built from other sources is an error, not garbage.
#define TXFM_EXPORT_SIZEOF(T) \
  TXFM_API int64_t T##_size(void) { return static_cast<int64_t>(sizeof(T)); }

// Status codes returned by every CPU entry point (CUDA entry points return cudaError_t).
enum txfm_status : int {
  TXFM_OK = 0,
  TXFM_ERR_BAD_ARG = 1,   // a size/pointer argument the Python layer should have rejected
  TXFM_ERR_BAD_INPUT = 2, // data-dependent invalid input (e.g. an out-of-range id)
};
