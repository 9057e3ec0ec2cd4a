// Host memory helpers shared by the CPU kernels.
#pragma once
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace txfm {

// Fresh output buffers from torch are untouched: first-touch page faults of 4 KiB pages cost
// about as much as the kernels' own work (~1 us per page, ~20 ms per 100 MB on the 2-core VM).
// Asking for transparent huge pages on the 2 MiB-aligned interior before the first write cuts
// the faults 512-fold where THP is in "madvise" mode. Advice only: ignored where THP is off,
// changes nothing else about the memory.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (p == nullptr || bytes < int64_t(4 * kHuge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace txfm
