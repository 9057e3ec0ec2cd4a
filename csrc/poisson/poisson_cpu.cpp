// Fused Poisson NLL forward (+ dlogits) on the CPU: one pass over logits and target that
// writes the per-element gradient already scaled for the reduction and the reduced loss.
//
// Work is split into (row, column tile) items so that a small batch still keeps every core
// busy; each item writes one fp64 partial sum (already multiplied by its row's weight) and the
// partials are added in a fixed order afterwards, so the result does not depend on the thread
// count. Inside an item the loop is branch-free and vectorised (`omp simd`, target_clones for
// AVX-512 / AVX2 / baseline); outputs that are not wanted go to a small scratch buffer in L1
// instead of adding a branch (or a template parameter) to the loop, and the loss is summed
// from the per-element values of each 512-element block while they are still in L1.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/txfm_common.h"
#include "common/txfm_memory.h"
#include "poisson/poisson_math.h"

namespace {

using namespace txfm_poisson;

constexpr int64_t kSub = 512;    // elements per fp32 partial sum (then added into fp64)
constexpr int64_t kTile = 8192;  // columns per work item (a multiple of kSub)

// The entry point's arguments plus the workspace of the (row, column tile) items.
struct Job : txfm_poisson_args {
  double* partials;  // [B * n_tiles]
  int64_t n_tiles;
};


// Sum of a block of per-element losses (fp32 lanes, no reassociation flags needed: GCC
// vectorises neither `omp simd` reductions inside target_clones functions nor a plain float
// sum, so the 16 lanes are explicit; each clone lowers them to its widest registers).
typedef float v16f __attribute__((vector_size(64)));

TXFM_HD float block_sum(const float* __restrict v, int64_t n) {
  v16f acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16f t;
    memcpy(&t, v + i, sizeof(t));
    acc += t;
  }
  float s = 0.0f;
  for (int k = 0; k < 16; ++k) s += acc[k];
  for (; i < n; ++i) s += v[i];
  return s;
}

TXFM_HD double block_sum(const double* __restrict v, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

// Raw bits of a gradient value (may_alias: read back what was just stored as GS).
template <int N> struct Bits;
template <> struct Bits<2> { typedef uint16_t __attribute__((may_alias)) type; };
template <> struct Bits<4> { typedef uint32_t __attribute__((may_alias)) type; };
template <> struct Bits<8> { typedef uint64_t __attribute__((may_alias)) type; };

template <typename GS, typename C>
TXFM_HD void zero_left_out(const uint8_t* __restrict keep, C* __restrict lout, GS* __restrict gout,
                           int64_t n) {
  using B = typename Bits<sizeof(GS)>::type;  // +0.0 is all-zero bits in every dtype
  B* __restrict gbits = reinterpret_cast<B*>(gout);
  for (int64_t i = 0; i < n; ++i) {
    const bool k = keep[i] != 0;
    lout[i] = k ? lout[i] : C(0);
    gbits[i] = k ? gbits[i] : B(0);
  }
}

// One (row, column tile) item. C is the compute type: float, or double for fp64 data.
template <int MODE, bool FULL, typename ZS, typename XS, typename C>
TXFM_CPU_DISPATCH void run_item(const Job& j, int64_t item) {
  const int64_t b = item / j.n_tiles;
  const int64_t g0 = (item % j.n_tiles) * kTile;
  const int64_t g1 = std::min(j.G, g0 + kTile);
  const int64_t row = b * j.G;
  const ZS* z = static_cast<const ZS*>(j.z) + row;
  const XS* x = static_cast<const XS*>(j.x) + row;
  const uint8_t* mrow = nullptr;
  if (j.mask) mrow = j.mask + (j.ids ? j.ids[b] : b) * j.mask_stride;
  using GS = typename GradStore<ZS>::type;
  GS* grad = j.grad ? static_cast<GS*>(j.grad) + row : nullptr;
  C* loss_elem = j.loss_elem ? static_cast<C*>(j.loss_elem) + row : nullptr;
  const C scale = C(j.row_scale ? j.row_scale[b] : j.scale);
  const Params<C> p{C(j.alpha), C(1.0 / j.beta), C(j.alpha / j.beta), C(j.eps)};

  alignas(64) GS grad_sink[kSub];
  alignas(64) C loss_sink[kSub];
  double acc = 0.0;
  for (int64_t s = g0; s < g1; s += kSub) {
    const int64_t n = std::min(kSub, g1 - s);
    const ZS* __restrict zs = z + s;
    const XS* __restrict xs = x + s;
    GS* __restrict gout = grad ? grad + s : grad_sink;
    C* __restrict lout = loss_elem ? loss_elem + s : loss_sink;
    for (int64_t i = 0; i < n; ++i) {
      const LossGrad<C> r = elem<MODE, FULL, C>(load<C>(zs, i), load<C>(xs, i), p);
      lout[i] = r.loss;
      gout[i] = store_value<GS, C>(r.dz * scale);
    }
    // Left-out genes are zeroed in a second sweep over the block (still in L1): with the byte
    // mask inside the main loop GCC unrolls it 64 lanes wide and spills registers.
    if (mrow) zero_left_out(mrow + s, lout, gout, n);
    acc += double(block_sum(lout, n));
  }
  j.partials[item] = acc * double(scale);
}

using ItemFn = void (*)(const Job&, int64_t);

// The instantiation of run_item for pick() (poisson_math.h).
template <int MODE, bool FULL, typename ZS, typename XS, typename C> struct Item {
  static ItemFn get() { return run_item<MODE, FULL, ZS, XS, C>; }
};

int grad_size(int z_dtype) { return z_dtype == DT_F64 ? 8 : z_dtype == DT_BF16 ? 2 : 4; }

}  // namespace

// Fused forward over [B, G] logits z and target x (every argument: txfm_poisson_args).
//
// mode: 0 rectified tanh (arXiv:2605.31562 §4), 1 log_input, 2 linear input (+ full: Stirling).
// Supported dtype pairs: see pick() in poisson_math.h. Row of `mask` for sample b: ids[b]
// when ids is given (values in [0, n_mask_rows)), else b (mask_stride 0: one shared row).
// Weight of row b: row_scale[b] if given, else scale. The loss written to *loss_out is
//   sum_b weight_b * sum_{kept g} l[b, g]; grad (if not null; the logits' dtype, fp32 for fp16
//   logits: GradStore in poisson_math.h) gets weight_b * dl/dz for kept genes and 0 elsewhere;
//   loss_elem (if not null, fp32 or fp64 for fp64 data) gets l[b, g] for kept genes and 0
//   elsewhere. *loss_out is a float (a double for
//   fp64 data); the partial sums behind it are fp64.
// Returns TXFM_OK, TXFM_ERR_BAD_ARG, or TXFM_ERR_BAD_INPUT (an id outside [0, n_mask_rows)).
TXFM_API int txfm_poisson_fwd(const txfm_poisson_args* a) {
  if (a == nullptr) return TXFM_ERR_BAD_ARG;
  const ItemFn fn = pick<Item>(a->mode, a->full != 0, a->z_dtype, a->x_dtype);
  const int64_t B = a->B, G = a->G;
  if (fn == nullptr || a->z == nullptr || a->x == nullptr || a->loss_out == nullptr || B < 1 ||
      G < 1 || (a->ids != nullptr && a->mask == nullptr) || a->beta == 0.0)
    return TXFM_ERR_BAD_ARG;
  if (a->ids != nullptr) {
    for (int64_t b = 0; b < B; ++b)
      if (a->ids[b] < 0 || a->ids[b] >= a->n_mask_rows) return TXFM_ERR_BAD_INPUT;
  }
  const int64_t n_tiles = (G + kTile - 1) / kTile;
  const int64_t n_items = B * n_tiles;
  std::vector<double> partials(size_t(n_items), 0.0);
  const Job j{*a, partials.data(), n_tiles};
  txfm::advise_huge_pages(a->grad, B * G * grad_size(a->z_dtype));
  txfm::advise_huge_pages(a->loss_elem, B * G * (a->z_dtype == DT_F64 ? 8 : 4));

  // Dynamic chunks: a thread that loses its core to another process (data loaders, say) does
  // not hold the others up; the partials do not depend on which thread ran an item.
#pragma omp parallel for schedule(dynamic, 4) if (n_items > 1 && B * G >= 32768)
  for (int64_t item = 0; item < n_items; ++item) fn(j, item);

  double total = 0.0;
  for (int64_t i = 0; i < n_items; ++i) total += partials[size_t(i)];
  if (a->z_dtype == DT_F64)
    *static_cast<double*>(a->loss_out) = total;
  else
    *static_cast<float*>(a->loss_out) = float(total);
  return TXFM_OK;
}

TXFM_EXPORT_SIZEOF(txfm_poisson_args)
