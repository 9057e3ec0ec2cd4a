// Small queries the Python layer uses to report what the CPU library was built with.
#include <omp.h>

#include "common/txfm_common.h"

TXFM_API int txfm_cpu_abi_version() { return 1; }

TXFM_API int txfm_cpu_max_threads() { return omp_get_max_threads(); }

// Which target_clones variant the loader picked: 2 = AVX-512, 1 = AVX2+FMA, 0 = portable.
TXFM_API int txfm_cpu_isa_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}
