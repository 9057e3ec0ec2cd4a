// Scalar math shared by several ops' per-element headers (host and device).
#pragma once
#include <stdint.h>
#include <string.h>

#include "common/txfm_common.h"

namespace txfm {

TXFM_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

TXFM_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Cephes logf's minimax polynomial P(f) on f = m - 1, m in [sqrt(1/2), sqrt(2)):
// log(1 + f) = f - f^2/2 + f^3 * P(f) (+ the exponent's part), ~1 ulp. Branch-free, so the
// CPU loops that call it vectorise (glibc's logf does not).
TXFM_HD float cephes_logf_poly(float f) {
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  return p;
}

}  // namespace txfm
