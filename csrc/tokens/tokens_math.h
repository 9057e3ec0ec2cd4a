// Per-element math of the gene-token op, shared by the C++ CPU kernel and the CUDA kernel.
//
// The op writes out[b, t, :] for t in [0, T), T = K + has_cls:
//   t == 0 and has_cls   -> cls[0:d]
//   pad[b, t - has_cls]  -> zeros(d)
//   otherwise            -> [codebook[ids[b, k], 0:d-1] ; values[b, k]],  k = t - has_cls
// and its backward reduces the rows of grad_out that show gene g into grad_codebook[g] in a
// fixed order (the tokens' flat index order), accumulating in fp32 (fp64 for fp64 inputs).
//
// Element types: float, double, and bf16 stored as raw uint16_t bits. Conversions are done by
// bit manipulation so that the CPU and the GPU round identically to torch's `.to(bfloat16)`.
#pragma once
#include <stdint.h>
#include <string.h>

#include "common/txfm_common.h"
#include "common/txfm_math.h"

// Arguments of every entry point of the op (CPU and CUDA, forward and backward), mirrored field
// for field by TokensArgs in txfm_kernels/tokens/native.py. Each entry point reads its own.
struct txfm_tokens_args {
  const void* codebook;    // [V, D1]                       forward
  const void* ids;         // [B, K] int32 or int64 (id_bytes 4 or 8)
  const void* values;      // [B, K]                        forward
  const void* cls;         // [D1 + 1] or nullptr            forward
  const uint8_t* pad;      // [B, K] or nullptr, 1 = padding
  void* out;               // [B, K + has_cls, D1 + 1]       forward: the tokens
  const void* grad;        // [B, K + has_cls, D1 + 1]       backward: dL/dtokens
  void* grad_codebook;     // [V, D1]                        backward (atomic CUDA: fp32 sums)
  void* grad_values;       // [B, K]                         CPU backward
  const int64_t* perm;     // [B * K] positions sorted by gene   sorted CUDA backward
  const int64_t* offsets;  // [V + 1] each gene's segment       sorted CUDA backward
  int64_t B, K, V, D1;
  int32_t id_bytes, has_cls;
  int32_t dtype;           // txfm_dtype of codebook, values, cls, out, grad, grad_*
};

namespace txfm_tokens {

// Element type codes of the C ABI (txfm_dtype).
enum dtype_code : int { DT_F32 = TXFM_F32, DT_BF16 = TXFM_BF16, DT_F64 = TXFM_F64 };

struct bf16 {
  uint16_t bits;
};


TXFM_HD float bf16_to_float(uint16_t h) { return txfm::u2f(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN stays a (quiet) NaN: the same result as c10::BFloat16(float).
TXFM_HD uint16_t float_to_bf16(float f) {
  uint32_t u = txfm::f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Accumulator type of each element type: fp32, except fp64 stays fp64 (gradcheck).
template <class T> struct acc_of { typedef float type; };
template <> struct acc_of<double> { typedef double type; };

TXFM_HD float to_acc(float x) { return x; }
TXFM_HD double to_acc(double x) { return x; }
TXFM_HD float to_acc(bf16 x) { return bf16_to_float(x.bits); }

TXFM_HD void from_acc(float a, float* dst) { *dst = a; }
TXFM_HD void from_acc(double a, double* dst) { *dst = a; }
TXFM_HD void from_acc(float a, bf16* dst) { dst->bits = float_to_bf16(a); }

// One unsigned compare covers negative ids too.
TXFM_HD bool id_in_range(int64_t id, int64_t n_genes) {
  return static_cast<uint64_t>(id) < static_cast<uint64_t>(n_genes);
}

// Output row r = b * T + t of the [B, T, d] tokens -> flat index b * K + k of the gene token it
// shows, or -1 for the CLS row.
TXFM_HD int64_t token_of_row(int64_t r, int64_t T, int64_t K, int has_cls) {
  const int64_t b = r / T, t = r - b * T;
  return (has_cls && t == 0) ? -1 : b * K + (t - has_cls);
}

// Flat token index b * K + k -> row of the [B, T, d] tokens (and of their gradient).
TXFM_HD int64_t row_of_token(int64_t tok, int64_t T, int64_t K, int has_cls) {
  const int64_t b = tok / K;
  return b * T + (tok - b * K) + has_cls;
}

}  // namespace txfm_tokens
