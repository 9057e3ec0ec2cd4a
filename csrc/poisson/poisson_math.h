// Per-element math of the Poisson NLL kernels, shared by the C++ CPU kernel and the CUDA kernel
// (TXFM_HD = __host__ __device__ under nvcc), so the CPU tests check the arithmetic the GPU runs.
//
// Three loss modes (the TxFM loss of arXiv:2605.31562 §4, and
// torch.nn.functional.poisson_nll_loss), per element with logit z and target x:
//
//   RTANH   phi = alpha * relu(tanh(z / beta)),  l = exp(phi) - phi * exp(x)
//           dl/dz = (alpha / beta) * sech^2(z / beta) * (exp(phi) - exp(x))  for z > 0, else 0
//   LOG     l = exp(z) - z * x,                   dl/dz = exp(z) - x           (log_input=True)
//   LINEAR  l = z - x * log(z + eps),             dl/dz = 1 - x / (z + eps)    (log_input=False)
//
// plus, for LOG/LINEAR with full=True, Stirling's term x*log(x) - x + 0.5*log(2*pi*x) where
// x > 1 (it does not depend on z).
//
// NaN rules follow torch: a NaN logit gives a NaN loss and gradient. Every branch is written
// as a select (`c ? a : b` on values already computed) so that the CPU loops vectorise; the
// comparisons are ordered so that NaN falls through to the computed (NaN) value, never to 0.
// RTANH needs |alpha| <= 80 (the Python layer checks it) so that exp(phi) needs no clamping.
//
// fp32 exp/log on the CPU are our own polynomials (glibc's expf/logf are not vectorised
// without -ffast-math); on the GPU they are the hardware approximations. fp64 uses libm.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/txfm_common.h"
#include "common/txfm_math.h"

// Arguments of the fused forward (txfm_poisson_fwd, txfm_poisson_fwd_cuda), mirrored field for
// field by PoissonArgs in txfm_kernels/poisson/native.py.
struct txfm_poisson_args {
  const void* z;             // [B, G] logits
  const void* x;             // [B, G] target
  int32_t z_dtype, x_dtype;  // txfm_dtype codes (supported pairs: see pick() in the kernels)
  int64_t B, G;
  int32_t mode, full;        // Mode; full: add Stirling's term (LOG / LINEAR only)
  double alpha, beta, eps;
  const uint8_t* mask;       // nullptr, or rows of G bytes (0 = leave the gene out)
  int64_t mask_stride;       // bytes between mask rows (0: one [G] row for every sample)
  const int64_t* ids;        // nullptr (mask row = b), or [B] mask row of sample b
  int64_t n_mask_rows;       // rows of `mask` that ids may name
  const double* row_scale;   // nullptr, or [B] weight of each row's loss and gradient
  double scale;              // weight when row_scale is nullptr
  void* grad;                // nullptr, or [B, G] weight * dl/dz in GradStore<logits' type>
  void* loss_elem;           // nullptr, or [B, G] per-element loss in the compute type
  void* loss_out;            // the reduced loss: one float (a double for fp64 data)
};

namespace txfm_poisson {

enum Mode : int { MODE_RTANH = 0, MODE_LOG = 1, MODE_LINEAR = 2 };
enum DType : int { DT_F32 = TXFM_F32, DT_BF16 = TXFM_BF16, DT_F16 = TXFM_F16, DT_F64 = TXFM_F64 };

// Storage types of 16-bit floats: raw bits, converted with integer ops (no hardware or
// library types needed, identical on host and device).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

using txfm::f2u;
using txfm::u2f;

// ---- 16-bit <-> fp32 conversions --------------------------------------------------------

TXFM_HD float to_float(float v) { return v; }
TXFM_HD double to_double(double v) { return v; }
TXFM_HD float to_float(bf16_t v) { return u2f(uint32_t(v.bits) << 16); }

// IEEE half -> float, exact for normals, subnormals, inf and NaN: shift the exponent/mantissa
// into place and rescale by 2^112 (which also normalises subnormals); inf/NaN get an all-ones
// exponent.
TXFM_HD float to_float(f16_t v) {
  const uint32_t h = v.bits;
  const uint32_t em = h & 0x7fffu;
  float mag = u2f(em << 13) * 5.192296858534828e+33f;  // 2^112
  mag = em >= 0x7c00u ? u2f((em << 13) | 0x7f800000u) : mag;
  return u2f(f2u(mag) | ((h & 0x8000u) << 16));
}

// float -> bf16, round to nearest even; NaN stays a (quiet) NaN.
TXFM_HD bf16_t to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{uint16_t(nan ? ((u >> 16) | 0x40u) : rounded)};
}

// float -> half, round to nearest even (branch-free form of F. Giesen's float_to_half_rtne).
TXFM_HD f16_t to_f16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Overflow / inf / NaN.
  const uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Subnormal results: let the FPU round by adding a magic number.
  const float denorm_magic = u2f(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const uint32_t sub = f2u(u2f(a) + denorm_magic) - f2u(denorm_magic);
  // Normal results: rebias the exponent and round the 13 dropped bits to nearest even.
  const uint32_t norm = (a + (uint32_t(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t h = a >= ((127u + 16u) << 23) ? special : (a < (113u << 23) ? sub : norm);
  return f16_t{uint16_t(h | sign)};
}

template <typename S> TXFM_HD S from_float(float v);
template <> TXFM_HD float from_float<float>(float v) { return v; }
template <> TXFM_HD bf16_t from_float<bf16_t>(float v) { return to_bf16(v); }
template <> TXFM_HD f16_t from_float<f16_t>(float v) { return to_f16(v); }

// Load a storage value into the compute type C (float, or double for fp64 data).
template <typename C, typename S> TXFM_HD C load(const S* p, int64_t i) { return C(to_float(p[i])); }
template <> TXFM_HD double load<double, double>(const double* p, int64_t i) { return p[i]; }

template <typename S, typename C> TXFM_HD S store_value(C v) { return from_float<S>(float(v)); }
template <> TXFM_HD double store_value<double, double>(double v) { return v; }

// Storage type of the gradient buffer for logits stored as ZS: their own, but fp32 for fp16.
// The buffer holds weight * dl/dz and the backward multiplies it by grad_output. In fp16 the
// "mean" weight 1 / (B * kept) puts most values under fp16's normal range (6e-5), where they
// lose their bits or flush to 0 before a loss scale of 2^16 can lift them, and a value that
// fits only once scaled down overflows. bf16 has fp32's range: one more rounding, no more.
template <typename ZS> struct GradStore { typedef ZS type; };
template <> struct GradStore<f16_t> { typedef float type; };

// ---- exp / log ------------------------------------------------------------------------

// exp(x) in fp32. Host: Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, and Cephes' expf
// polynomial for expm1(r) (about 1 ulp); n is read straight from the bits of the rounding
// shifter and 2^(n-1) is built from it, so overflow to inf comes out of the final multiply.
// Results below ~1e-38 flush to 0 (no subnormals: they are slow and irrelevant to the loss).
// The core takes x already clamped to [-87.5, 89] (or NaN, which propagates) and also returns
// expm1(x), exact to a few ulp for small x, which tanh needs.
struct ExpM1 {
  float e;    // exp(x)
  float em1;  // exp(x) - 1
};

TXFM_HD ExpM1 exp_core(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float q = p * (r * r) + r;                         // expm1(r)
  const float half_scale = u2f((f2u(t) + 126u) << 23);     // 2^(n-1): low bits of t hold n
  const float e = half_scale * (q * 2.0f + 2.0f);          // 2^n * (1 + q)
  return {e, n == 0.0f ? q : e - 1.0f};
}

// exp for arguments known to lie in [-87.5, 89] (or NaN).
TXFM_HD float exp_in_range(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return exp_core(x).e;
#endif
}

// exp over the whole float range: inf above ~88.72, 0 below ~-87.3, NaN stays NaN.
TXFM_HD float exp_c(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  float xc = x > 89.0f ? 89.0f : x;  // NaN compares false and passes through
  xc = xc < -87.5f ? -87.5f : xc;
  return exp_core(xc).e;
#endif
}
TXFM_HD double exp_c(double x) { return exp(x); }
TXFM_HD double exp_in_range(double x) { return exp(x); }

// log(x) in fp32. Device: the SFU approximation. Host: Cephes' logf (x = m * 2^e with
// m in [sqrt(1/2), sqrt(2)), degree-9 polynomial in m - 1, about 1 ulp); subnormals are
// rescaled first; x < 0 -> NaN, 0 -> -inf, inf -> inf, NaN -> NaN.
TXFM_HD float log_c(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  const bool tiny = x < 1.17549435e-38f;
  const float xs = tiny ? x * 8388608.0f : x;  // 2^23
  const uint32_t u = f2u(xs);
  int32_t e = int32_t((u >> 23) & 0xffu) - 126;
  e = tiny ? e - 23 : e;
  const float m = u2f((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  const float f = low ? (m + m) - 1.0f : m - 1.0f;
  const float ef = float(low ? e - 1 : e);
  const float z = f * f;
  float y = txfm::cephes_logf_poly(f) * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = (f + y) + ef * 0.693359375f;
  r = x == INFINITY ? INFINITY : r;
  r = x == 0.0f ? -INFINITY : r;
  r = x < 0.0f ? NAN : r;
  return x != x ? x : r;
#endif
}
TXFM_HD double log_c(double x) { return log(x); }

// ---- per-element loss and gradient ----------------------------------------------------

template <typename C> struct Params {
  C alpha;            // rectified-tanh amplitude
  C inv_beta;         // 1 / beta
  C alpha_over_beta;  // alpha / beta
  C eps;              // LINEAR mode: log(z + eps)
};

// Loss and dl/dz of one element, returned by value: locals whose address is taken
// (out-parameters) can stop the CPU loop from vectorising.
template <typename C> struct LossGrad {
  C loss;
  C dz;
};

// tanh(u) and sech^2(u) for u = z / beta > 0 (callers zero the result for z <= 0), returned
// as {tanh, sech^2}, from one exp. Up to u = 40, m = expm1(2u) and r = 1 / (m + 2): tanh =
// m * r, sech^2 = 4r(1 - r), accurate for small u (m has no cancellation), with nothing
// overflowing or going subnormal. Beyond, w = exp(-2u): tanh = 1 and sech^2 = 4w, so sech^2
// decays with u as it should (a saturated logit's gradient decays with it; a cap on u would
// leave a constant). Past u ~ 43.5 the host exp flushes w to 0 (no subnormals): sech^2 is
// then exactly 0 where its true value is below ~1.2e-38; the device's __expf keeps
// subnormals (built with --ftz=false). NaN propagates.
template <typename C> TXFM_HD LossGrad<C> tanh_sech2(C u);

template <> TXFM_HD LossGrad<float> tanh_sech2<float>(float u) {
  const float uc = u < 0.0f ? 0.0f : u;  // NaN compares false and passes through
  const bool far = uc > 40.0f;
  float v = far ? -2.0f * uc : 2.0f * uc;
  v = v < -87.5f ? -87.5f : v;
#if defined(__CUDA_ARCH__)
  const float m = expm1f(v), e = __expf(v);
#else
  const ExpM1 ex = exp_core(v);
  const float m = ex.em1, e = ex.e;
#endif
  const float r = 1.0f / (m + 2.0f);
  // far: e = exp(-2u) < 2e-35, so tanh = 1 and sech^2 = 4e / (1 + e)^2 = 4e in fp32
  return {far ? 1.0f : m * r, far ? 4.0f * e : 4.0f * r * (1.0f - r)};
}

template <> TXFM_HD LossGrad<double> tanh_sech2<double>(double u) {
  const double c = cosh(u);
  return {tanh(u), 1.0 / (c * c)};  // cosh overflows to inf for large u: sech^2 -> 0
}

// RTANH (arXiv:2605.31562 §4).
template <typename C> TXFM_HD LossGrad<C> rtanh_elem(C z, C x, const Params<C>& p) {
  const LossGrad<C> ts = tanh_sech2(z * p.inv_beta);
  const C phi = z <= C(0) ? C(0) : p.alpha * ts.loss;  // NaN z: tanh is NaN, so phi is NaN
  const C ephi = exp_in_range(phi);  // phi in [0, alpha]
  const C y = exp_c(x);
  const C d = p.alpha_over_beta * ts.dz * (ephi - y);
  return {ephi - phi * y, z <= C(0) ? C(0) : d};
}

// LOG (log_input=True), as torch: exp(z) - x * z.
template <typename C> TXFM_HD LossGrad<C> log_elem(C z, C x) {
  const C ez = exp_c(z);
  return {ez - x * z, ez - x};
}

// LINEAR (log_input=False), as torch: z - x * log(z + eps).
template <typename C> TXFM_HD LossGrad<C> linear_elem(C z, C x, const Params<C>& p) {
  const C ze = z + p.eps;
  return {z - x * log_c(ze), C(1) - x / ze};
}

// Stirling approximation of log(x!) where x > 1, as torch's masked_fill(target <= 1, 0):
// a NaN target keeps its NaN.
template <typename C> TXFM_HD C stirling(C x) {
  const C s = x * log_c(x) - x + C(0.5) * log_c(C(6.283185307179586) * x);
  return x <= C(1) ? C(0) : s;
}

template <int MODE, bool FULL, typename C> TXFM_HD LossGrad<C> elem(C z, C x, const Params<C>& p) {
  LossGrad<C> r = MODE == MODE_RTANH ? rtanh_elem(z, x, p)
                  : MODE == MODE_LOG ? log_elem(z, x)
                                     : linear_elem(z, x, p);
  if (FULL) r.loss += stirling(x);
  return r;
}

// ---- which instantiation runs a call -----------------------------------------------------

// The supported (mode, logits dtype, target dtype) combinations, shared by the CPU and the
// CUDA dispatch: K<MODE, FULL, ZS, XS, C>::get() is that backend's function for logits stored
// as ZS, targets as XS, computed in C; nullptr for an unsupported combination.
// RTANH: logits fp32/bf16/fp16 with target fp32/bf16, or both fp64 (no Stirling term).
// LOG/LINEAR (the drop-in poisson_nll_loss): input and target of one dtype.
template <template <int, bool, typename, typename, typename> class K, int MODE, bool FULL>
auto pick_same_dtype(int zt, int xt) -> decltype(K<MODE, FULL, float, float, float>::get()) {
  if (zt != xt) return nullptr;
  switch (zt) {
    case DT_F32: return K<MODE, FULL, float, float, float>::get();
    case DT_BF16: return K<MODE, FULL, bf16_t, bf16_t, float>::get();
    case DT_F16: return K<MODE, FULL, f16_t, f16_t, float>::get();
    case DT_F64: return K<MODE, FULL, double, double, double>::get();
  }
  return nullptr;
}

template <template <int, bool, typename, typename, typename> class K>
auto pick(int mode, bool full, int zt, int xt) -> decltype(K<0, false, float, float, float>::get()) {
  if (mode == MODE_RTANH) {
    if (full) return nullptr;
    if (zt == DT_F64 || xt == DT_F64)
      return zt == xt ? K<MODE_RTANH, false, double, double, double>::get() : nullptr;
    if (xt != DT_F32 && xt != DT_BF16) return nullptr;
    const bool xf = xt == DT_F32;
    switch (zt) {
      case DT_F32:
        return xf ? K<MODE_RTANH, false, float, float, float>::get()
                  : K<MODE_RTANH, false, float, bf16_t, float>::get();
      case DT_BF16:
        return xf ? K<MODE_RTANH, false, bf16_t, float, float>::get()
                  : K<MODE_RTANH, false, bf16_t, bf16_t, float>::get();
      case DT_F16:
        return xf ? K<MODE_RTANH, false, f16_t, float, float>::get()
                  : K<MODE_RTANH, false, f16_t, bf16_t, float>::get();
    }
    return nullptr;
  }
  if (mode == MODE_LOG)
    return full ? pick_same_dtype<K, MODE_LOG, true>(zt, xt)
                : pick_same_dtype<K, MODE_LOG, false>(zt, xt);
  if (mode == MODE_LINEAR)
    return full ? pick_same_dtype<K, MODE_LINEAR, true>(zt, xt)
                : pick_same_dtype<K, MODE_LINEAR, false>(zt, xt);
  return nullptr;
}

}  // namespace txfm_poisson
