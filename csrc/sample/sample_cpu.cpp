// Masked sampler, C++/OpenMP: one CSR row per iteration of a parallel loop over rows.
//
// Per row: validate it and sum its counts; scatter log1p(c * L / sum) (or, without a target,
// c * L / sum) into a per-thread dense scratch row; stream that row into the target; draw the
// genes with the Feistel bijection (sample_math.h) in blocks of kBlock evaluations, compacted
// branch-free; gather their values from the scratch row; zero the scratch row again.
// Memory traffic per row: nnz * (4 + sizeof(count)) read, G * 4 written (target), K * 9 written.
#include <omp.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <climits>
#include <vector>

#include "common/txfm_common.h"
#include "common/txfm_memory.h"
#include "sample/sample_math.h"

using namespace txfm_sample;

namespace {

constexpr int kBlock = 64;     // bijection evaluations per vectorised block
constexpr int kChunk = 256;    // nnz per vectorised log1p chunk

// Status codes beyond txfm_status; the Python layer turns them into messages naming the argument.
enum SampleStatus : int {
  BAD_INDPTR_START = 10,  // indptr[0] != 0
  BAD_INDPTR_ORDER = 11,  // indptr[b + 1] < indptr[b]
  BAD_INDPTR_END = 12,    // indptr[B] != nnz
  BAD_INDEX_RANGE = 13,   // an index outside [0, n_genes)
  BAD_INDEX_ORDER = 14,   // indices not strictly increasing within the row
  BAD_COUNT = 15,         // a negative or non-finite count
  BAD_DATASET = 16,       // dataset id outside [0, n_datasets)
};

// The entry point's arguments plus whether to check the input while reading it.
struct Args : txfm_sample_args {
  int validate;
};

// Draws up to kk of [0, n) into out (capacity kk + kBlock); returns how many were drawn.
TXFM_CPU_DISPATCH
int64_t draw_row(uint32_t n, int64_t kk, const uint32_t* keys, uint32_t* out) {
  const int m = domain_bits(n);
  const int la = m / 2, lb = m - la;
  const uint64_t domain = uint64_t(1) << m;
  int64_t cnt = 0;
  uint32_t y[kBlock];
  for (uint64_t j0 = 0; cnt < kk && j0 < domain; j0 += kBlock) {
    for (int i = 0; i < kBlock; ++i) y[i] = feistel(static_cast<uint32_t>(j0) + i, keys, la, lb);
    const int valid = static_cast<int>(std::min<uint64_t>(kBlock, domain - j0));
    for (int i = 0; i < valid; ++i) {  // branch-free compaction: store always, advance if kept
      out[cnt] = y[i];
      cnt += y[i] < n;
    }
  }
  return std::min(cnt, kk);
}

template <typename C>
TXFM_CPU_DISPATCH
void scale_counts(const C* c, int64_t len, float scale, float* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(c[i]) * scale;
}

TXFM_CPU_DISPATCH
void log1p_inplace(float* x, int64_t len) {
  for (int64_t i = 0; i < len; ++i) x[i] = log1p_nonneg(x[i]);
}

// dst[0:n] = src[0:n] with non-temporal stores (dst is written once and not read back soon).
void stream_copy(float* dst, const float* src, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15); ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  memcpy(dst, src, sizeof(float) * n);
#endif
}

void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the region ends
#endif
}

// fp64 sum in 8 independent lanes (a sequential fp64 chain would cost ~4 cycles per count).
template <typename C>
TXFM_CPU_DISPATCH
double row_sum(const C* c, int64_t len) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += static_cast<double>(c[i + j]);
  for (; i < len; ++i) lane[0] += static_cast<double>(c[i]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Flags accumulated branch-free so the loops vectorise; the first failing kind is reported.
template <typename C>
TXFM_CPU_DISPATCH
int check_row(const int32_t* idx, const C* c, int64_t len, int64_t G) {
  int range_bad = 0, order_bad = 0, count_bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    range_bad |= static_cast<uint32_t>(idx[i]) >= static_cast<uint64_t>(G);
    if constexpr (std::is_floating_point_v<C>) {
      count_bad |= !(c[i] >= 0.0f) | !(c[i] <= 3.402823466e38f);  // NaN fails both
    } else if constexpr (std::is_signed_v<C>) {
      count_bad |= c[i] < 0;
    }
  }
  for (int64_t i = 1; i < len; ++i) order_bad |= idx[i] <= idx[i - 1];
  if (range_bad) return BAD_INDEX_RANGE;
  if (order_bad) return BAD_INDEX_ORDER;
  if (count_bad) return BAD_COUNT;
  return TXFM_OK;
}

// A row whose L / S exceeds fp32 (a huge target_sum, or tiny float counts): the fp32 factor
// is inf, so its dense row, target row and values are rebuilt here from normalised() of
// sample_math.h (L * c / S in fp64, rounded once; it is <= L, so it fits). Rare: its own
// function, never inlined, so that the usual path compiles as if it did not exist.
template <typename C>
__attribute__((noinline)) void redo_wide_row(const C* c, const int32_t* idx, int64_t len,
                                             double scale, float* target_row, int64_t G,
                                             float* dense, const int32_t* ids, float* vals,
                                             int64_t kk) {
  for (int64_t i = 0; i < len; ++i) {
    const float v = normalised(static_cast<float>(c[i]), scale);
    dense[idx[i]] = target_row ? log1p_nonneg(v) : v;
  }
  if (target_row) {
    stream_fence();  // the row's streaming stores land before these overwrite them
    stream_copy(target_row, dense, G);
  }
  for (int64_t p = 0; p < kk; ++p) {
    vals[p] = target_row ? dense[ids[p]] : log1p_nonneg(dense[ids[p]]);
  }
}

template <typename C>
int run(const Args& a, int64_t* bad_row) {
  const C* counts = static_cast<const C*>(a.counts);
  int64_t first_bad = INT64_MAX;
  int bad_code = TXFM_OK;
  const int64_t K = a.K;

  if (a.target) txfm::advise_huge_pages(a.target, a.B * a.G * int64_t(sizeof(float)));
  // Waking a second thread costs a scheduler quantum on a busy machine: small calls run serial.
  const int64_t work = a.nnz + 4 * a.B * std::min(K, a.G) + (a.target ? a.B * a.G / 8 : 0);
#pragma omp parallel if (work > (int64_t(1) << 19))
  {
    std::vector<float> scratch(a.G, 0.0f);  // the current row, dense; zero between rows
    std::vector<uint32_t> drawn(K + kBlock);
    std::vector<float> chunk(kChunk);

#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < a.B; ++b) {
      const int64_t start = a.indptr[b], len = a.indptr[b + 1] - start;
      const int32_t* idx = a.indices + start;
      const C* c = counts + start;
      int64_t ds = 0;
      if (a.dataset_ids) {
        ds = a.ds_is_64 ? static_cast<const int64_t*>(a.dataset_ids)[b]
                        : static_cast<const int32_t*>(a.dataset_ids)[b];
      }
      if (a.validate) {
        int code = (ds < 0 || ds >= a.n_datasets) ? BAD_DATASET : check_row(idx, c, len, a.G);
        if (code != TXFM_OK) {
#pragma omp critical(txfm_sample_bad)
          if (b < first_bad) {
            first_bad = b;
            bad_code = code;
          }
          continue;
        }
      }

      // The row is built in the thread's dense scratch (L2-resident, all zeros between rows);
      // the target then receives it with streaming stores: no read-for-ownership of the
      // target's cache lines, so DRAM sees the 4 * G bytes once.
      const double sum = row_sum(c, len);
      const float scale = static_cast<float>(norm_scale(a.target_sum, sum));
      float* dense = scratch.data();
      for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
        const int64_t n = std::min<int64_t>(kChunk, len - i0);
        scale_counts(c + i0, n, scale, chunk.data());
        if (a.target) log1p_inplace(chunk.data(), n);
        for (int64_t i = 0; i < n; ++i) dense[idx[i0 + i]] = chunk[i];
      }
      if (a.target) stream_copy(a.target + b * a.G, dense, a.G);

      uint32_t n_obs = static_cast<uint32_t>(a.G);
      const int32_t* genes = nullptr;
      if (a.obs_indptr) {
        ds = std::min<int64_t>(std::max<int64_t>(ds, 0), a.n_datasets - 1);  // if unvalidated
        n_obs = static_cast<uint32_t>(a.obs_indptr[ds + 1] - a.obs_indptr[ds]);
        genes = a.obs_genes + a.obs_indptr[ds];
      }
      const uint32_t rs = row_seed(a.k0, a.k1, static_cast<uint32_t>(b));
      uint32_t keys[kRounds];
      for (int i = 0; i < kRounds; ++i) keys[i] = round_key(rs, i);
      const int64_t kk = draw_row(n_obs, std::min<int64_t>(K, n_obs), keys, drawn.data());

      int32_t* ids = a.gene_ids + b * K;
      float* vals = a.values + b * K;
      uint8_t* pad = a.pad + b * K;
      for (int64_t p = 0; p < kk; ++p) {
        int32_t g = genes ? genes[drawn[p]] : static_cast<int32_t>(drawn[p]);
        g = std::min<int32_t>(std::max<int32_t>(g, 0), static_cast<int32_t>(a.G - 1));
        ids[p] = g;
        vals[p] = dense[g];
      }
      if (!a.target) log1p_inplace(vals, kk);
      if (!scale_fits(scale)) {  // L / S beyond fp32: rebuild the row in fp64
        redo_wide_row(c, idx, len, norm_scale(a.target_sum, sum), a.target ? a.target + b * a.G
                      : nullptr, a.G, dense, ids, vals, kk);
      }
      if (len * 16 < a.G) {
        for (int64_t i = 0; i < len; ++i) dense[idx[i]] = 0.0f;
      } else {
        memset(dense, 0, sizeof(float) * a.G);
      }
      memset(pad, 0, kk);
      if (kk < K) {
        memset(ids + kk, 0, sizeof(int32_t) * (K - kk));
        memset(vals + kk, 0, sizeof(float) * (K - kk));
        memset(pad + kk, 1, K - kk);
      }
      a.libsize[b] = static_cast<float>(sum);
    }
    stream_fence();
  }
  if (bad_code != TXFM_OK) *bad_row = first_bad;
  return bad_code;
}

}  // namespace

// Returns TXFM_OK, TXFM_ERR_BAD_ARG, or a SampleStatus (>= 10) with *bad_row set to the row
// (or, for indptr, the position) at fault. With validate == 0 the input is trusted: invalid
// input then gives unspecified results (and may read or write out of bounds).
TXFM_API int txfm_sample_cpu(const txfm_sample_args* args, int validate, int64_t* bad_row) {
  if (args == nullptr || bad_row == nullptr) return TXFM_ERR_BAD_ARG;
  const Args a{*args, validate};
  const int64_t B = a.B, nnz = a.nnz;
  if (B < 0 || nnz < 0 || a.G < 1 || a.G > (int64_t(1) << 31) || a.K < 1 || !a.indptr ||
      (B > 0 && (!a.gene_ids || !a.values || !a.pad || !a.libsize ||
                 (a.obs_indptr && !a.obs_genes))) ||
      (nnz > 0 && (!a.indices || !a.counts)))
    return TXFM_ERR_BAD_ARG;
  *bad_row = -1;
  if (validate) {
    if (a.indptr[0] != 0) {
      *bad_row = 0;
      return BAD_INDPTR_START;
    }
    for (int64_t b = 0; b < B; ++b) {
      if (a.indptr[b + 1] < a.indptr[b]) {
        *bad_row = b;
        return BAD_INDPTR_ORDER;
      }
    }
    if (a.indptr[B] != nnz) {
      *bad_row = B;
      return BAD_INDPTR_END;
    }
  }
  switch (a.count_type) {
    case TXFM_F32: return run<float>(a, bad_row);
    case TXFM_I32: return run<int32_t>(a, bad_row);
    case TXFM_I16: return run<int16_t>(a, bad_row);
    case TXFM_U16: return run<uint16_t>(a, bad_row);
    case TXFM_U8: return run<uint8_t>(a, bad_row);
    default: return TXFM_ERR_BAD_ARG;
  }
}

TXFM_EXPORT_SIZEOF(txfm_sample_args)
