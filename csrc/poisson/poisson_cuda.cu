// Fused Poisson NLL forward (+ dlogits) on CUDA: the same algorithm and per-element math
// (poisson_math.h) as the C++ CPU kernel.
//
// One block per (row, 4096-column tile): every thread loads kUnroll elements of logits,
// target (and mask) before computing, so each thread keeps several coalesced loads in flight;
// it writes dlogits already scaled by its row's weight and the block writes one partial sum
// (row weight included) to a [B * n_tiles] fp64 workspace. A second one-block kernel adds the
// partials in a fixed order: deterministic, no floating-point atomics. Traffic: one read of
// logits and target (and mask bytes), one write of dlogits (and of the per-element loss for
// reduction="none").
//
// A dataset id outside [0, n_mask_rows) is not checked on the host (that would need a sync):
// its row's loss and gradient become NaN instead of reading out of bounds.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/txfm_common.h"
#include "poisson/poisson_math.h"

namespace {

using namespace txfm_poisson;

constexpr int kThreads = 256;
constexpr int kUnroll = 8;  // elements per thread in flight: enough bytes to cover HBM latency
constexpr int64_t kTileCols = int64_t(kThreads) * kUnroll * 2;  // 4096 columns per block
constexpr int kReduceThreads = 1024;

// The entry point's arguments plus the workspace of the (row, column tile) blocks.
struct Args : txfm_poisson_args {
  double* partials;  // [B * n_tiles]
  int64_t n_tiles;
};

// Deterministic block sum (fixed shuffle tree, then warp 0 over the warp sums).
template <typename C> __device__ C block_sum(C v) {
  __shared__ C warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < n_warps ? warp_sums[threadIdx.x] : C(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // valid in thread 0
}

template <int MODE, bool FULL, typename ZS, typename XS, typename C>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Args a) {
  const int64_t item = blockIdx.x;
  const int64_t b = item / a.n_tiles;
  const int64_t g0 = (item % a.n_tiles) * kTileCols;
  const int64_t g1 = a.G < g0 + kTileCols ? a.G : g0 + kTileCols;
  const int64_t row = b * a.G;
  const ZS* __restrict__ z = static_cast<const ZS*>(a.z) + row;
  const XS* __restrict__ x = static_cast<const XS*>(a.x) + row;
  using GS = typename GradStore<ZS>::type;
  GS* __restrict__ grad = a.grad ? static_cast<GS*>(a.grad) + row : nullptr;
  C* __restrict__ loss_elem = a.loss_elem ? static_cast<C*>(a.loss_elem) + row : nullptr;
  const uint8_t* __restrict__ mrow = nullptr;
  bool row_ok = true;
  if (a.mask) {
    const int64_t r = a.ids ? a.ids[b] : b;
    row_ok = r >= 0 && r < (a.ids ? a.n_mask_rows : a.B);
    mrow = a.mask + (row_ok ? r : 0) * a.mask_stride;
  }
  const C scale = C(a.row_scale ? a.row_scale[b] : a.scale);
  const Params<C> p{C(a.alpha), C(1.0 / a.beta), C(a.alpha / a.beta), C(a.eps)};
  const C bad = row_ok ? C(0) : C(NAN);

  C acc = C(0);
  for (int64_t base = g0 + threadIdx.x; base < g1; base += int64_t(kThreads) * kUnroll) {
    C zv[kUnroll], xv[kUnroll];
    bool keep[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = base + int64_t(u) * kThreads;
      const bool in = g < g1;
      zv[u] = in ? load<C>(z, g) : C(0);
      xv[u] = in ? load<C>(x, g) : C(0);
      keep[u] = in && (mrow == nullptr || mrow[g] != 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = base + int64_t(u) * kThreads;
      if (g >= g1) break;
      const LossGrad<C> r = elem<MODE, FULL, C>(zv[u], xv[u], p);
      const C l = (keep[u] ? r.loss : C(0)) + bad;
      const C d = (keep[u] ? r.dz * scale : C(0)) + bad;
      acc += l;
      if (grad) grad[g] = store_value<GS, C>(d);
      if (loss_elem) loss_elem[g] = l;
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) a.partials[item] = double(acc) * double(scale);
}

// Writes the loss in the compute type (float, or double for fp64 data): no conversion kernel.
template <typename C>
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(const double* partials, int64_t n,
                                                               C* out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) s += partials[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = C(s);
}

// grad *= *scale in place, skipped (by every thread, no host sync) when *scale == 1: the
// usual loss.backward() costs nothing beyond the forward.
template <typename ZS>
__global__ void scale_kernel(ZS* __restrict__ grad, int64_t n, const float* __restrict__ scale) {
  const float s = *scale;
  if (s == 1.0f) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    grad[i] = store_value<ZS, float>(load<float>(grad, i) * s);
}

using Launch = void (*)(const Args&, cudaStream_t);

template <int MODE, bool FULL, typename ZS, typename XS, typename C>
void launch(const Args& a, cudaStream_t stream) {
  fwd_kernel<MODE, FULL, ZS, XS, C><<<unsigned(a.B * a.n_tiles), kThreads, 0, stream>>>(a);
}

// The instantiation of launch for pick() (poisson_math.h).
template <int MODE, bool FULL, typename ZS, typename XS, typename C> struct Kernel {
  static Launch get() { return launch<MODE, FULL, ZS, XS, C>; }
};

}  // namespace

// Columns per block: the Python layer sizes the partials workspace as B * ceil(G / this).
TXFM_API int64_t txfm_poisson_cuda_tile_cols() { return kTileCols; }

// Same contract as txfm_poisson_fwd (poisson_cpu.cpp), with device pointers, plus
// `partials` (device, B * ceil(G / tile_cols) doubles) and the stream; loss_out is a device
// float (a double for fp64 data). Returns a cudaError_t (cudaErrorInvalidValue for unsupported
// arguments).
TXFM_API int txfm_poisson_fwd_cuda(const txfm_poisson_args* args, double* partials,
                                   void* stream) {
  if (args == nullptr) return int(cudaErrorInvalidValue);
  const Launch fn = pick<Kernel>(args->mode, args->full != 0, args->z_dtype, args->x_dtype);
  const int64_t B = args->B, G = args->G;
  const int64_t n_tiles = (G + kTileCols - 1) / kTileCols;
  if (fn == nullptr || args->z == nullptr || args->x == nullptr || args->loss_out == nullptr ||
      partials == nullptr || B < 1 || G < 1 || B * n_tiles > int64_t(0x7fffffff) ||
      (args->ids != nullptr && args->mask == nullptr) || args->beta == 0.0)
    return int(cudaErrorInvalidValue);
  const Args a{*args, partials, n_tiles};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  fn(a, s);
  if (args->z_dtype == DT_F64)
    reduce_kernel<<<1, kReduceThreads, 0, s>>>(partials, B * n_tiles,
                                               static_cast<double*>(args->loss_out));
  else
    reduce_kernel<<<1, kReduceThreads, 0, s>>>(partials, B * n_tiles,
                                               static_cast<float*>(args->loss_out));
  return int(cudaGetLastError());
}

TXFM_EXPORT_SIZEOF(txfm_poisson_args)

// grad (n elements, dtype TXFM_F32 / TXFM_BF16 / TXFM_F16) *= *scale (device fp32), unless it is 1.
TXFM_API int txfm_poisson_scale_cuda(void* grad, int dtype, int64_t n, const float* scale,
                                     void* stream) {
  if (grad == nullptr || scale == nullptr || n < 0) return int(cudaErrorInvalidValue);
  if (n == 0) return 0;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 132 * 16);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DT_F32: scale_kernel<<<unsigned(blocks), threads, 0, s>>>(static_cast<float*>(grad), n, scale); break;
    case DT_BF16: scale_kernel<<<unsigned(blocks), threads, 0, s>>>(static_cast<bf16_t*>(grad), n, scale); break;
    case DT_F16: scale_kernel<<<unsigned(blocks), threads, 0, s>>>(static_cast<f16_t*>(grad), n, scale); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}
