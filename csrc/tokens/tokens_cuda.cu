// CUDA kernels of the gene-token op (semantics in tokens_math.h; same math as tokens_cpu.cpp).
//
// Forward: one warp per output row (grid-stride); each lane assembles 16-byte chunks of the
// row (codebook elements, then the value) in registers and stores them with vector stores.
//
// Backward, deterministic: the Python layer sorts the token positions by gene id on the device
// (torch.sort, stable) and finds each gene's segment (torch.searchsorted); one warp per gene
// then sums its segment's gradient rows in position order into fp32 registers and writes the
// whole grad_codebook row (zeros for genes no token shows) - no separate zero-fill, no atomics.
// A gene shown by many tokens is summed by one warp alone (latency-bound, still correct).
// Non-deterministic: one warp per token atomically adds its row into an fp32 [V, D1] buffer
// that the caller zeroed.
//
// Out-of-range ids are never dereferenced: the forward writes a zero token, the atomic
// backward skips it, and the sorted backward never sees them (they sort outside every gene's
// segment).
// Entry points take a cudaStream_t as void*, launch on it, never synchronise, and return the
// launch's cudaError_t as int.
#include <cuda_runtime.h>

#include "tokens/tokens_math.h"

using namespace txfm_tokens;

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxD1 = 32 * 64;  // widest codebook row of the sorted backward (d <= 2049)

int grid_for(int64_t work, int per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks > (1 << 20)) blocks = 1 << 20;  // grid-stride loops cover the rest
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

// Elements per 16-byte chunk: a lane assembles one chunk of the output row in registers and
// stores it with one 16-byte store (when rows are 16-byte aligned, i.e. d * sizeof(T) % 16 == 0
// and the output is aligned; otherwise element by element). Codebook rows (d - 1 elements) are
// not aligned for the usual d, so their loads stay scalar; lanes still read contiguous bytes.
template <class T> struct chunk { static constexpr int n = 16 / sizeof(T); };

template <class T, class I, bool kVecStore>
__global__ void forward_kernel(const T* __restrict__ codebook, const I* __restrict__ ids,
                               const T* __restrict__ values, const T* __restrict__ cls,
                               const uint8_t* __restrict__ pad, T* __restrict__ out,
                               int64_t rows, int64_t T_, int64_t K, int64_t V, int64_t D1,
                               int has_cls) {
  constexpr int E = chunk<T>::n;
  const int lane = threadIdx.x & 31;
  const int64_t d = D1 + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       r < rows; r += stride) {
    const int64_t k = token_of_row(r, T_, K, has_cls);
    const T* src = cls;  // the CLS row: d elements from cls
    int64_t n_src = d;
    T value = T();
    if (k >= 0) {
      const int64_t g = (pad && pad[k]) ? -1 : static_cast<int64_t>(ids[k]);
      if (id_in_range(g, V)) {
        src = codebook + g * D1;
        n_src = D1;
        value = values[k];
      } else {  // padding (or a bad id): a zero token
        src = nullptr;
        n_src = 0;
      }
    }
    T* o = out + r * d;
    for (int64_t c0 = static_cast<int64_t>(lane) * E; c0 < d; c0 += 32 * E) {
      alignas(16) T buf[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t c = c0 + e;
        buf[e] = c < n_src ? src[c] : (c == D1 && n_src == D1 ? value : T());
      }
      if (kVecStore) {
        *reinterpret_cast<uint4*>(o + c0) = *reinterpret_cast<const uint4*>(buf);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e)
          if (c0 + e < d) o[c0 + e] = buf[e];
      }
    }
  }
}

// One warp per gene (grid-stride): lanes fetch 32 of the segment's token positions at a time
// and broadcast each row offset with a shuffle; lane l accumulates columns l, l + 32, ... in
// fp32 registers, adding the rows in position order.
template <class T, int kCols>  // kCols columns per lane: D1 <= 32 * kCols
__global__ void backward_sorted_kernel(const T* __restrict__ grad, const int64_t* __restrict__ perm,
                                       const int64_t* __restrict__ offsets, T* __restrict__ grad_codebook,
                                       int64_t V, int64_t T_, int64_t K, int64_t D1, int has_cls) {
  typedef typename acc_of<T>::type A;
  const int lane = threadIdx.x & 31;
  const int64_t d = D1 + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); g < V;
       g += stride) {
    const int64_t s = offsets[g], e = offsets[g + 1];
    A acc[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[j] = A(0);
    for (int64_t base = s; base < e; base += 32) {
      const int n = static_cast<int>(e - base < 32 ? e - base : 32);
      const int64_t mine = lane < n ? row_of_token(perm[base + lane], T_, K, has_cls) * d : 0;
      for (int i = 0; i < n; ++i) {
        const T* row = grad + __shfl_sync(0xffffffffu, mine, i);
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const int64_t c = lane + 32 * j;
          if (c < D1) acc[j] += to_acc(row[c]);
        }
      }
    }
    T* dst = grad_codebook + g * D1;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t c = lane + 32 * j;
      if (c < D1) from_acc(acc[j], dst + c);
    }
  }
}

template <class T, class I>
__global__ void backward_atomic_kernel(const T* __restrict__ grad, const I* __restrict__ ids,
                                       const uint8_t* __restrict__ pad, float* __restrict__ acc,
                                       int64_t N, int64_t T_, int64_t K, int64_t V, int64_t D1,
                                       int has_cls) {
  const int lane = threadIdx.x & 31;
  const int64_t d = D1 + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); k < N;
       k += stride) {
    if (pad && pad[k]) continue;
    const int64_t g = static_cast<int64_t>(ids[k]);
    if (!id_in_range(g, V)) continue;
    const T* row = grad + row_of_token(k, T_, K, has_cls) * d;
    float* dst = acc + g * D1;
    for (int64_t c = lane; c < D1; c += 32) atomicAdd(dst + c, to_acc(row[c]));
  }
}

template <class T>
cudaError_t launch_forward(const void* codebook, const void* ids, int id_bytes, const void* values,
                           const void* cls, const uint8_t* pad, void* out, int64_t B, int64_t K,
                           int64_t V, int64_t D1, int has_cls, cudaStream_t stream) {
  const int64_t T_ = K + has_cls, rows = B * T_;
  if (rows == 0) return cudaSuccess;
  const int grid = grid_for(rows, kWarpsPerBlock);
  const int block = 32 * kWarpsPerBlock;
  const bool vec = ((D1 + 1) * int64_t(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
#define TXFM_TOKENS_FWD(I, VEC)                                                              \
  forward_kernel<T, I, VEC><<<grid, block, 0, stream>>>((const T*)codebook, (const I*)ids,   \
                                                        (const T*)values, (const T*)cls, pad, \
                                                        (T*)out, rows, T_, K, V, D1, has_cls)
  if (id_bytes == 4) {
    if (vec) TXFM_TOKENS_FWD(int32_t, true); else TXFM_TOKENS_FWD(int32_t, false);
  } else {
    if (vec) TXFM_TOKENS_FWD(int64_t, true); else TXFM_TOKENS_FWD(int64_t, false);
  }
#undef TXFM_TOKENS_FWD
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_backward_sorted(const void* grad, const int64_t* perm, const int64_t* offsets,
                                   void* grad_codebook, int64_t K, int64_t V, int64_t D1,
                                   int has_cls, cudaStream_t stream) {
  const int grid = grid_for(V, kWarpsPerBlock), block = 32 * kWarpsPerBlock;
#define TXFM_TOKENS_BWD(COLS)                                                                  \
  backward_sorted_kernel<T, COLS><<<grid, block, 0, stream>>>((const T*)grad, perm, offsets,   \
                                                              (T*)grad_codebook, V, K + has_cls, \
                                                              K, D1, has_cls)
  if (D1 <= 32 * 4) TXFM_TOKENS_BWD(4);
  else if (D1 <= 32 * 8) TXFM_TOKENS_BWD(8);
  else if (D1 <= 32 * 12) TXFM_TOKENS_BWD(12);  // d = 384
  else if (D1 <= 32 * 16) TXFM_TOKENS_BWD(16);
  else if (D1 <= 32 * 24) TXFM_TOKENS_BWD(24);  // d = 768
  else if (D1 <= 32 * 32) TXFM_TOKENS_BWD(32);  // d = 1024
  else if (D1 <= kMaxD1) TXFM_TOKENS_BWD(64);
  else return cudaErrorInvalidValue;  // d > 2049: the Python layer picks another backend
#undef TXFM_TOKENS_BWD
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_backward_atomic(const void* grad, const void* ids, int id_bytes,
                                   const uint8_t* pad, float* acc, int64_t B, int64_t K,
                                   int64_t V, int64_t D1, int has_cls, cudaStream_t stream) {
  const int64_t N = B * K;
  if (N == 0) return cudaSuccess;
  const int grid = grid_for(N, kWarpsPerBlock);
  const int block = 32 * kWarpsPerBlock;
  if (id_bytes == 4)
    backward_atomic_kernel<T, int32_t><<<grid, block, 0, stream>>>(
        (const T*)grad, (const int32_t*)ids, pad, acc, N, K + has_cls, K, V, D1, has_cls);
  else
    backward_atomic_kernel<T, int64_t><<<grid, block, 0, stream>>>(
        (const T*)grad, (const int64_t*)ids, pad, acc, N, K + has_cls, K, V, D1, has_cls);
  return cudaGetLastError();
}

bool bad_args(const txfm_tokens_args* a, bool reads_ids) {
  return a == nullptr || a->B < 0 || a->K < 0 || a->V < 1 || a->D1 < 1 ||
         (a->has_cls != 0 && a->has_cls != 1) ||
         (reads_ids && a->id_bytes != 4 && a->id_bytes != 8);
}

}  // namespace

// Same arguments as txfm_tokens_forward (tokens_cpu.cpp), device pointers, plus the stream.
// dtype: DT_F32 or DT_BF16.
TXFM_API int txfm_tokens_forward_cuda(const txfm_tokens_args* a, void* stream) {
  if (bad_args(a, true) || (a->has_cls && !a->cls)) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a->dtype == DT_F32)
    return launch_forward<float>(a->codebook, a->ids, a->id_bytes, a->values, a->cls, a->pad,
                                 a->out, a->B, a->K, a->V, a->D1, a->has_cls, s);
  if (a->dtype == DT_BF16)
    return launch_forward<bf16>(a->codebook, a->ids, a->id_bytes, a->values, a->cls, a->pad,
                                a->out, a->B, a->K, a->V, a->D1, a->has_cls, s);
  return cudaErrorInvalidValue;
}

// grad_codebook [V, D1] (every row written) from grad [B, K + has_cls, D1 + 1], given the flat
// token indices sorted by gene (perm, int64) and each gene's segment [offsets[g], offsets[g+1]).
TXFM_API int txfm_tokens_backward_sorted_cuda(const txfm_tokens_args* a, void* stream) {
  if (bad_args(a, false)) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a->dtype == DT_F32)
    return launch_backward_sorted<float>(a->grad, a->perm, a->offsets, a->grad_codebook, a->K,
                                         a->V, a->D1, a->has_cls, s);
  if (a->dtype == DT_BF16)
    return launch_backward_sorted<bf16>(a->grad, a->perm, a->offsets, a->grad_codebook, a->K,
                                        a->V, a->D1, a->has_cls, s);
  return cudaErrorInvalidValue;
}

// grad_codebook [V, D1] fp32 (zeroed by the caller) += every non-padded token's gradient row, by
// atomics: fast, but the fp32 summation order (hence the last bits) varies from run to run.
TXFM_API int txfm_tokens_backward_atomic_cuda(const txfm_tokens_args* a, void* stream) {
  if (bad_args(a, true)) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* acc = static_cast<float*>(a->grad_codebook);
  if (a->dtype == DT_F32)
    return launch_backward_atomic<float>(a->grad, a->ids, a->id_bytes, a->pad, acc, a->B, a->K,
                                         a->V, a->D1, a->has_cls, s);
  if (a->dtype == DT_BF16)
    return launch_backward_atomic<bf16>(a->grad, a->ids, a->id_bytes, a->pad, acc, a->B, a->K,
                                        a->V, a->D1, a->has_cls, s);
  return cudaErrorInvalidValue;
}

TXFM_EXPORT_SIZEOF(txfm_tokens_args)
