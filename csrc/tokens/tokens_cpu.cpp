// C++/OpenMP kernels of the gene-token op (see tokens_math.h for the exact semantics).
//
// Forward: one pass over the B * T output rows, split statically between threads so that each
// thread writes one contiguous stretch of the output; a row is one memcpy of the codebook row
// (d - 1 elements) plus the value, so the loop runs at memory speed.
//
// Backward, deterministic by construction: a counting sort buckets the token positions by gene
// id (stable, so each bucket lists its tokens in position order), then threads take genes and
// sum each gene's gradient rows in that order in fp32, writing the whole grad_codebook row,
// zeros for genes no token shows. The result does not depend on the thread count, and the only
// buffers are the int64 offsets [V + 1] and positions [B * K].
#include <omp.h>

#include <vector>

#include "common/txfm_memory.h"
#include "tokens/tokens_math.h"

using namespace txfm_tokens;

namespace {

// Row accumulation, the hot loop of the backward (vectorised, best ISA picked at load time).
TXFM_CPU_DISPATCH void add_row(float* __restrict acc, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
}
TXFM_CPU_DISPATCH void add_row(double* __restrict acc, const double* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
}
TXFM_CPU_DISPATCH void add_row(float* __restrict acc, const bf16* __restrict src, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) acc[i] += bf16_to_float(s[i]);
}
TXFM_CPU_DISPATCH void set_row(float* __restrict acc, const bf16* __restrict src, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) acc[i] = bf16_to_float(s[i]);
}
TXFM_CPU_DISPATCH void store_row(bf16* __restrict dst, const float* __restrict acc, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(acc[i]);
}

template <class T, class I>
int forward(const T* codebook, const I* ids, const T* values, const T* cls, const uint8_t* pad,
            T* out, int64_t B, int64_t K, int64_t V, int64_t D1, int has_cls) {
  const int64_t T_ = K + has_cls, d = D1 + 1, rows = B * T_;
  txfm::advise_huge_pages(out, rows * d * int64_t(sizeof(T)));
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * d;
    const int64_t k = token_of_row(r, T_, K, has_cls);
    if (k < 0) {
      memcpy(o, cls, d * sizeof(T));
      continue;
    }
    if (pad && pad[k]) {
      memset(o, 0, d * sizeof(T));
      continue;
    }
    const int64_t g = static_cast<int64_t>(ids[k]);
    if (!id_in_range(g, V)) {  // Python raises; the row is still written (zeros)
      memset(o, 0, d * sizeof(T));
      bad = 1;
      continue;
    }
    memcpy(o, codebook + g * D1, D1 * sizeof(T));
    o[D1] = values[k];
  }
  return bad ? TXFM_ERR_BAD_INPUT : TXFM_OK;
}

// acc <- first row, acc += the others, in the order given; acc may alias the output row.
template <class T>
struct Reducer {
  typedef typename acc_of<T>::type A;
  static void set(A* acc, const T* src, int64_t n) { memcpy(acc, src, n * sizeof(T)); }
  static void add(A* acc, const T* src, int64_t n) { add_row(acc, src, n); }
  static void store(T* dst, const A* acc, int64_t n) {
    if (reinterpret_cast<const void*>(dst) != reinterpret_cast<const void*>(acc))
      memcpy(dst, acc, n * sizeof(T));
  }
  static constexpr bool in_place = true;  // fp32 / fp64: accumulate straight into the output
};
template <>
struct Reducer<bf16> {
  typedef float A;
  static void set(float* acc, const bf16* src, int64_t n) { set_row(acc, src, n); }
  static void add(float* acc, const bf16* src, int64_t n) { add_row(acc, src, n); }
  static void store(bf16* dst, const float* acc, int64_t n) { store_row(dst, acc, n); }
  static constexpr bool in_place = false;
};

template <class T, class I>
int backward(const T* grad, const I* ids, const uint8_t* pad, T* grad_codebook, T* grad_values,
             int64_t B, int64_t K, int64_t V, int64_t D1, int has_cls) {
  typedef Reducer<T> R;
  typedef typename R::A A;
  const int64_t N = B * K, T_ = K + has_cls, d = D1 + 1;
  txfm::advise_huge_pages(grad_codebook, V * D1 * int64_t(sizeof(T)));

  // Counting sort of the non-padded token positions by gene id (serial: O(N + V), ~1 ms).
  std::vector<int64_t> off(V + 1, 0);
  for (int64_t k = 0; k < N; ++k) {
    if (pad && pad[k]) {
      grad_values[k] = T();  // padded tokens give no gradient
      continue;
    }
    const int64_t g = static_cast<int64_t>(ids[k]);
    if (!id_in_range(g, V)) return TXFM_ERR_BAD_INPUT;
    ++off[g + 1];
  }
  for (int64_t g = 0; g < V; ++g) off[g + 1] += off[g];
  std::vector<int64_t> pos(off[V]);
  for (int64_t k = 0; k < N; ++k) {
    if (pad && pad[k]) continue;
    pos[off[static_cast<int64_t>(ids[k])]++] = k;
  }
  for (int64_t g = V; g > 0; --g) off[g] = off[g - 1];  // the fill advanced each start by one bucket
  off[0] = 0;

#pragma omp parallel
  {
    std::vector<A> scratch(R::in_place ? 0 : D1);
#pragma omp for schedule(dynamic, 128)
    for (int64_t g = 0; g < V; ++g) {
      T* dst = grad_codebook + g * D1;
      const int64_t s = off[g], e = off[g + 1];
      if (s == e) {
        memset(dst, 0, D1 * sizeof(T));
        continue;
      }
      A* acc = R::in_place ? reinterpret_cast<A*>(dst) : scratch.data();
      for (int64_t i = s; i < e; ++i) {
        const int64_t k = pos[i];
        const T* row = grad + row_of_token(k, T_, K, has_cls) * d;
        if (i + 1 < e) __builtin_prefetch(grad + row_of_token(pos[i + 1], T_, K, has_cls) * d);
        if (i == s)
          R::set(acc, row, D1);
        else
          R::add(acc, row, D1);
        grad_values[k] = row[D1];
      }
      R::store(dst, acc, D1);
    }
  }
  return TXFM_OK;
}

// The entry points' dispatch on the id width.
template <class T>
int forward_ids(const txfm_tokens_args& a) {
  if (a.id_bytes == 4)
    return forward<T, int32_t>((const T*)a.codebook, (const int32_t*)a.ids, (const T*)a.values,
                               (const T*)a.cls, a.pad, (T*)a.out, a.B, a.K, a.V, a.D1, a.has_cls);
  if (a.id_bytes == 8)
    return forward<T, int64_t>((const T*)a.codebook, (const int64_t*)a.ids, (const T*)a.values,
                               (const T*)a.cls, a.pad, (T*)a.out, a.B, a.K, a.V, a.D1, a.has_cls);
  return TXFM_ERR_BAD_ARG;
}

template <class T>
int backward_ids(const txfm_tokens_args& a) {
  if (a.id_bytes == 4)
    return backward<T, int32_t>((const T*)a.grad, (const int32_t*)a.ids, a.pad,
                                (T*)a.grad_codebook, (T*)a.grad_values, a.B, a.K, a.V, a.D1,
                                a.has_cls);
  if (a.id_bytes == 8)
    return backward<T, int64_t>((const T*)a.grad, (const int64_t*)a.ids, a.pad,
                                (T*)a.grad_codebook, (T*)a.grad_values, a.B, a.K, a.V, a.D1,
                                a.has_cls);
  return TXFM_ERR_BAD_ARG;
}

bool bad_sizes(const txfm_tokens_args* a) {
  return a == nullptr || a->B < 0 || a->K < 0 || a->V < 1 || a->D1 < 1 ||
         (a->has_cls != 0 && a->has_cls != 1);
}

}  // namespace

// tokens out [B, K + has_cls, D1 + 1] <- codebook [V, D1], ids [B, K] (int32/int64 by id_bytes),
// values [B, K], cls [D1 + 1] (if has_cls), pad [B, K] uint8 or NULL. All contiguous, codebook,
// values, cls and out of element type `dtype` (DT_F32, DT_BF16, DT_F64).
// Returns TXFM_ERR_BAD_INPUT if a non-padded id lies outside [0, V).
TXFM_API int txfm_tokens_forward(const txfm_tokens_args* a) {
  if (bad_sizes(a) || (a->has_cls && !a->cls)) return TXFM_ERR_BAD_ARG;
  switch (a->dtype) {
    case DT_F32: return forward_ids<float>(*a);
    case DT_BF16: return forward_ids<bf16>(*a);
    case DT_F64: return forward_ids<double>(*a);
    default: return TXFM_ERR_BAD_ARG;
  }
}

// grad_codebook [V, D1] (every row written) and grad_values [B, K] (0 at padding) <- grad
// [B, K + has_cls, D1 + 1]. Deterministic: each gene's rows are summed in token order.
TXFM_API int txfm_tokens_backward(const txfm_tokens_args* a) {
  if (bad_sizes(a)) return TXFM_ERR_BAD_ARG;
  switch (a->dtype) {
    case DT_F32: return backward_ids<float>(*a);
    case DT_BF16: return backward_ids<bf16>(*a);
    case DT_F64: return backward_ids<double>(*a);
    default: return TXFM_ERR_BAD_ARG;
  }
}

TXFM_EXPORT_SIZEOF(txfm_tokens_args)
