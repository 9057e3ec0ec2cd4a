// Masked sampler, CUDA: one thread block per CSR row, the same steps as sample_cpu.cpp.
//
//   1. block-reduce the row's counts to its library size S (fp64);
//   2. with a target (zeroed beforehand by the caller): scatter log1p(c * L / S), barrier;
//   3. draw: each pass evaluates the Feistel bijection at kThreads consecutive points, keeps
//      those < n and places them in draw order with a block-wide prefix count (warp ballots);
//      values come from the target row just written, or by binary search in the CSR row;
//   4. pad slots beyond min(K, n).
// Unvalidated input stays in bounds: row bounds, dataset ids and gene ids are clamped.
#include <cuda_runtime.h>

#include "common/txfm_common.h"
#include "sample/sample_math.h"

using namespace txfm_sample;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename C>
__global__ void __launch_bounds__(kThreads)
masked_sample_kernel(const int64_t* __restrict__ indptr, const int32_t* __restrict__ indices,
                     const C* __restrict__ counts, int64_t nnz, int64_t G,
                     const int64_t* __restrict__ obs_indptr, const int32_t* __restrict__ obs_genes,
                     int64_t n_datasets, const void* __restrict__ dataset_ids, int ds_is_64,
                     int64_t K, float L, uint32_t k0, uint32_t k1, int32_t* __restrict__ gene_ids,
                     float* __restrict__ values, uint8_t* __restrict__ pad,
                     float* __restrict__ target, float* __restrict__ libsize) {
  __shared__ double s_part[kWarps];
  __shared__ int s_count[kWarps];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t start = clamp64(indptr[b], 0, nnz);
  const int64_t end = clamp64(indptr[b + 1], start, nnz);

  double s = 0.0;
  for (int64_t i = start + tid; i < end; i += kThreads) s += static_cast<double>(counts[i]);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
  if (lane == 0) s_part[warp] = s;
  __syncthreads();
  double sum = 0.0;
  for (int w = 0; w < kWarps; ++w) sum += s_part[w];
  const double scale = norm_scale(L, sum);

  float* trow = target ? target + b * G : nullptr;
  if (trow) {  // zeroed by the caller (a full-bandwidth memset)
    for (int64_t i = start + tid; i < end; i += kThreads) {
      const int32_t g = indices[i];
      if (g >= 0 && g < G) {
        trow[g] = log1p_nonneg(normalised(static_cast<float>(counts[i]), scale));
      }
    }
    __syncthreads();
  }

  int64_t n = G, o0 = 0;
  if (obs_indptr) {
    int64_t ds = 0;
    if (dataset_ids)
      ds = ds_is_64 ? static_cast<const int64_t*>(dataset_ids)[b]
                    : static_cast<const int32_t*>(dataset_ids)[b];
    ds = clamp64(ds, 0, n_datasets - 1);
    o0 = obs_indptr[ds];
    n = obs_indptr[ds + 1] - o0;
  }
  const int m = domain_bits(static_cast<uint32_t>(n));
  const int la = m / 2, lb = m - la;
  const int64_t domain = int64_t(1) << m;
  const uint32_t rs = row_seed(k0, k1, static_cast<uint32_t>(b));
  uint32_t keys[kRounds];
#pragma unroll
  for (int i = 0; i < kRounds; ++i) keys[i] = round_key(rs, i);
  const int64_t kk = n < K ? n : K;
  int32_t* ids = gene_ids + b * K;
  float* vals = values + b * K;
  uint8_t* pads = pad + b * K;

  int64_t cnt = 0;  // identical in every thread, so the loop and its barriers are uniform
  for (int64_t j0 = 0; cnt < kk && j0 < domain; j0 += kThreads) {
    const int64_t j = j0 + tid;
    const uint32_t y = feistel(static_cast<uint32_t>(j), keys, la, lb);
    const bool keep = j < domain && y < n;
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, keep);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? s_count[w] : 0;
      total += s_count[w];
    }
    const int64_t pos = cnt + before + __popc(ballot & ((1u << lane) - 1u));
    if (keep && pos < kk) {
      int32_t g = obs_genes ? obs_genes[o0 + y] : static_cast<int32_t>(y);
      g = g < 0 ? 0 : (g >= G ? static_cast<int32_t>(G - 1) : g);
      float v;
      if (trow) {
        v = trow[g];
      } else {  // lower_bound in the sorted row
        int64_t lo = start, hi = end;
        while (lo < hi) {
          const int64_t mid = (lo + hi) >> 1;
          if (indices[mid] < g) lo = mid + 1; else hi = mid;
        }
        v = (lo < end && indices[lo] == g)
                ? log1p_nonneg(normalised(static_cast<float>(counts[lo]), scale)) : 0.0f;
      }
      ids[pos] = g;
      vals[pos] = v;
      pads[pos] = 0;
    }
    cnt += total;
    __syncthreads();  // s_count is rewritten by the next pass
  }
  for (int64_t p = kk + tid; p < K; p += kThreads) {
    ids[p] = 0;
    vals[p] = 0.0f;
    pads[p] = 1;
  }
  if (tid == 0) libsize[b] = static_cast<float>(sum);
}

template <typename C>
cudaError_t launch(const txfm_sample_args& a, cudaStream_t stream) {
  masked_sample_kernel<C><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
      a.indptr, a.indices, static_cast<const C*>(a.counts), a.nnz, a.G, a.obs_indptr,
      a.obs_genes, a.n_datasets, a.dataset_ids, a.ds_is_64, a.K, a.target_sum, a.k0, a.k1,
      a.gene_ids, a.values, a.pad, a.target, a.libsize);
  return cudaGetLastError();
}

}  // namespace

// Same arguments as txfm_sample_cpu minus validation, plus the stream; returns a cudaError_t.
// target (if not null) must be all zeros: only the non-zeros are written.
TXFM_API int txfm_sample_cuda(const txfm_sample_args* a, void* stream) {
  if (a == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (a->B <= 0) return cudaSuccess;
  if (a->B > 0x7FFFFFFF || a->K < 1 || a->G < 1) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (a->count_type) {
    case TXFM_F32: return static_cast<int>(launch<float>(*a, s));
    case TXFM_I32: return static_cast<int>(launch<int32_t>(*a, s));
    case TXFM_I16: return static_cast<int>(launch<int16_t>(*a, s));
    case TXFM_U16: return static_cast<int>(launch<uint16_t>(*a, s));
    case TXFM_U8: return static_cast<int>(launch<uint8_t>(*a, s));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

TXFM_EXPORT_SIZEOF(txfm_sample_args)
