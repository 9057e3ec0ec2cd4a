// Math of the masked sampler shared by the C++ CPU kernel and the CUDA kernel (TXFM_HD), and
// mirrored line for line by the Triton kernel and the torch reference (txfm_kernels/sample/
// triton.py and reference.py). Change one, change all four: tests check they agree bit for bit.
//
// Uniform draw of K of a row's n observable genes without replacement:
//   * a keyed bijection P of [0, 2^m) with 2^m >= max(n, 1024): an alternating unbalanced
//     Feistel network, kRounds rounds, round function = a 32-bit avalanche hash of
//     (right half ^ round key);
//   * the draw is the first min(K, n) values of P(0), P(1), P(2), ... that are < n, i.e. P
//     restricted to [0, n) in order ("filtering", the streaming form of cycle-walking). Every
//     value < n occurs exactly once among P(0..2^m-1), so the ids are distinct, and at most
//     max(2n, 1024) evaluations are needed (~K * 2^m / n on average);
//   * value v < n names the row dataset's v-th observable gene (sorted list).
// Integer-only (uint32 xor / shift / wrapping multiply), so every backend gets the same ids.
#pragma once
#include <stdint.h>
#include <string.h>

#include "common/txfm_common.h"
#include "common/txfm_math.h"

// Arguments of txfm_sample_cpu / txfm_sample_cuda, mirrored field for field by SampleArgs in
// txfm_kernels/sample/native.py.
struct txfm_sample_args {
  const int64_t* indptr;     // [B + 1] CSR row pointers
  const int32_t* indices;    // [nnz] gene ids, strictly increasing within a row
  const void* counts;        // [nnz] of count_type
  int32_t count_type;        // txfm_dtype: TXFM_F32, TXFM_I32, TXFM_I16, TXFM_U16 or TXFM_U8
  int32_t ds_is_64;          // dataset_ids are int64 (else int32)
  int64_t B, nnz, G;
  const int64_t* obs_indptr; // [n_datasets + 1], or nullptr: every gene observable
  const int32_t* obs_genes;  // each dataset's observable genes, sorted
  int64_t n_datasets;
  const void* dataset_ids;   // [B], or nullptr: dataset 0
  int64_t K;                 // genes drawn per row
  float target_sum;          // L of log1p(L * c / sum(c))
  uint32_t k0, k1;           // the call's key (derived from (seed, offset) on the host)
  int32_t* gene_ids;         // [B, K] outputs
  float* values;             // [B, K]
  uint8_t* pad;              // [B, K]
  float* target;             // [B, G], or nullptr: no target (CUDA: zeroed by the caller)
  float* libsize;            // [B] sum of each row's counts
};

namespace txfm_sample {

constexpr int kRounds = 6;
// Domains below 2^10 are padded up: Feistel networks on a few bits are far from uniform (a
// 3-bit one fails chi-square tests of the draw order badly, whatever the number of rounds),
// and filtering costs at most 1024 evaluations per row.
constexpr int kMinBits = 10;
constexpr uint32_t kRoundStep = 0x61C88647u;  // 2^32 / golden ratio, negated (< 2^31 for Triton)

// "lowbias32" (C. Wellons): a bijective 32-bit mixer with near-ideal avalanche.
TXFM_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// Row b of a call keyed by (k0, k1) (derived from (seed, offset) on the host) gets its own
// permutation: distinct rows have distinct row seeds because both steps are bijections of b.
TXFM_HD uint32_t row_seed(uint32_t k0, uint32_t k1, uint32_t row) {
  return hash32(k0 ^ hash32(row ^ k1));
}

TXFM_HD uint32_t round_key(uint32_t row_seed_value, int round) {
  return hash32(row_seed_value + static_cast<uint32_t>(round + 1) * kRoundStep);
}

// Smallest m >= kMinBits with 2^m >= n (n <= 2^31).
TXFM_HD int domain_bits(uint32_t n) {
  int m = kMinBits;
  while (m < 31 && (1u << m) < n) ++m;
  return m;
}

// The bijection of [0, 2^m), m = la + lb with la = m / 2: x = L (la bits) : R (lb bits).
// A round maps (L, R) to (R, L ^ F(R)) and the halves swap widths, so each round is
// invertible whatever the widths and m may be odd.
TXFM_HD uint32_t feistel(uint32_t x, const uint32_t* keys, int la, int lb) {
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    const uint32_t left = x >> lb;
    const uint32_t right = x & ((1u << lb) - 1u);
    const uint32_t f = hash32(right ^ keys[i]) & ((1u << la) - 1u);
    x = (right << la) | (left ^ f);
    const int t = la;
    la = lb;
    lb = t;
  }
  return x;
}

// log1p(x) for x >= 0 (finite), branch-free so GCC vectorises it: log(1 + x) with the Cephes
// logf polynomial on the mantissa (~1 ulp) plus the rounding error of 1 + x as a first-order
// correction (x - (u - 1)) / u. Exact 0 at x = 0.
TXFM_HD float log1p_nonneg(float x) {
  const float u = 1.0f + x;
  const float corr = (x - (u - 1.0f)) / u;
  const uint32_t bits = txfm::f2u(u);
  int e = static_cast<int>(bits >> 23) - 127;
  float m = txfm::u2f((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;  // [sqrt(1/2), sqrt(2))
  e += big ? 1 : 0;
  const float f = m - 1.0f;
  const float z = f * f;
  const float p = txfm::cephes_logf_poly(f);
  const float fe = static_cast<float>(e);
  float y = f * z * p;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * fe + corr;
}

// Normalisation factor L / sum(counts) in fp64; a row without counts gets 0 so its values are 0,
// not NaN. The sum is accumulated in fp64 by every backend: fp32 sums of large libraries
// (> 2^24 counts) would depend on the summation order, fp64 ones round to the same fp32 value.
// The factor stays fp64 because it can exceed fp32's range (a row of tiny float counts, or a
// huge target_sum) while every normalised value L * c / S <= L still fits.
TXFM_HD double norm_scale(float target_sum, double row_sum) {
  return row_sum > 0.0 ? static_cast<double>(target_sum) / row_sum : 0.0;
}

constexpr float kFp32Max = 3.40282347e38f;

// Whether the factor rounded to fp32 is finite (else L / S exceeds fp32's range).
TXFM_HD bool scale_fits(float scale32) { return scale32 <= kFp32Max; }

// L * c / S of one count (already read as fp32): the fp32 product with the factor rounded to
// fp32, as every backend computes it, unless that factor overflows fp32; then the product is
// formed in fp64 and rounded once (it is <= L, so it fits).
TXFM_HD float normalised(float count, double scale) {
  const float sf = static_cast<float>(scale);
  const float wide = static_cast<float>(static_cast<double>(count) * scale);
  return scale_fits(sf) ? count * sf : wide;
}

}  // namespace txfm_sample
