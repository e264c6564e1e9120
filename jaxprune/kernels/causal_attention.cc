// Fused causal attention of grouped query heads for XLA on CPU (float32), as a jax.ffi target.
//
// XLA on CPU writes every elementwise pass of a softmax (mask, row maximum, exp, row sum) to
// memory; this kernel keeps one tile's scores in cache between its two matmuls, as PyTorch's
// CPU kernel does. The maths is jaxprune.attention's float32 block: logits scaled, masked
// (causal, optionally a sliding window), row maximum subtracted, exp, then P V divided by the
// row sums after the second matmul.
//
// Layouts (row-major): q (b, g, r, t, dh); k, v (b, g, t, dh); out (b, t, g * r * dh).
// The vector helpers (simd.h) are GCC/Clang vector extensions, compiled with -march=native on
// the machine that runs them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxprune_simd;

constexpr int kTileRows = 64;  // query tokens per work item (per head: 64 x keys scores)
constexpr int kColsS = kPanel;  // keys per packed block
constexpr int kRowsPV = 6;     // register block of P V: 6 rows x 64 head dims

struct Shape {
  int64_t b, g, r, t, dh;
};

// Scores of `rows` query rows (row-major, stride dh) against the m keys (a multiple of
// kColsS) of a packed key panel kp (m / kColsS blocks of (dh, kColsS)): s (rows, ldS).
void scores(const float* q, int rows, const float* kp, int m, int dh, float scale, float* s,
            int ldS) {
  for (int j0 = 0; j0 < m; j0 += kColsS)
    rows_times_panel(q, rows, dh, kp + static_cast<int64_t>(j0) * dh, scale, s + j0, ldS);
}

// Lanes j..j+15 of a row, those outside [lo, end) replaced by `fill`.
inline vf load_within(const float* s, int64_t j, int64_t lo, int64_t end, float fill) {
  vi lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  const vi idx = lane + static_cast<int32_t>(j);
  const vi keep = (idx >= static_cast<int32_t>(lo)) & (idx < static_cast<int32_t>(end));
  return keep ? load(s + j) : splat(fill);
}

// Row i (key position pos) keeps keys [lo, pos]; the rest of its m_padded entries become 0.
// Returns the row sum. m_padded is a multiple of kLanes and > pos. Only the first and last
// vectors of the kept range need a mask.
float softmax_row(float* s, int64_t lo, int64_t pos, int m_padded) {
  const float neg = -std::numeric_limits<float>::infinity();
  const int64_t end = pos + 1;
  const int64_t first = lo / kLanes * kLanes;
  const int64_t last = pos / kLanes * kLanes;  // first <= last
  vf vmax = load_within(s, first, lo, end, neg);
  for (int64_t j = first + kLanes; j < last; j += kLanes) {
    const vf x = load(s + j);
    vmax = x > vmax ? x : vmax;
  }
  const vf tail = load_within(s, last, lo, end, neg);
  vmax = tail > vmax ? tail : vmax;
  float mx = neg;
  for (int l = 0; l < kLanes; ++l) mx = std::max(mx, vmax[l]);
  const vf m = splat(mx);

  std::fill(s, s + first, 0.0f);
  // The edges: masked lanes load -inf, whose exp is 0.
  const vf e_first = exp_nonpositive(load_within(s, first, lo, end, neg) - m);
  vf sum = e_first;
  for (int64_t j = first + kLanes; j < last; j += kLanes) {
    const vf e = exp_nonpositive(load(s + j) - m);
    store(s + j, e);
    sum += e;
  }
  if (last != first) {
    const vf e_last = exp_nonpositive(load_within(s, last, lo, end, neg) - m);
    store(s + last, e_last);
    sum += e_last;
  }
  store(s + first, e_first);
  std::fill(s + last + kLanes, s + m_padded, 0.0f);
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  return total;
}

// One register block of P V: NR rows x (NC * kLanes) head dims from column c0.
template <int NR, int NC>
inline void pv_block(const float* p, int i0, int ldp, const float* v, int m, int dh, int c0,
                     const float* sums, float* out, int64_t ldo) {
  const float* pa[NR];
  for (int a = 0; a < NR; ++a) pa[a] = p + (i0 + a) * ldp;
  vf acc[NR][NC] = {};
  const float* vj = v + c0;
  for (int j = 0; j < m; ++j, vj += dh) {
    vf vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load(vj + c * kLanes);
    for (int a = 0; a < NR; ++a) {
      const vf x = splat(pa[a][j]);
      for (int c = 0; c < NC; ++c) acc[a][c] += x * vv[c];
    }
  }
  for (int a = 0; a < NR; ++a) {
    const vf inv = splat(1.0f / sums[i0 + a]);
    for (int c = 0; c < NC; ++c) store(out + (i0 + a) * ldo + c0 + c * kLanes, acc[a][c] * inv);
  }
}

// out rows (stride ldo) = p (rows, ldp) v (m, dh) / sums, over keys [0, m).
void probs_values(const float* p, int rows, int ldp, const float* v, int m, int dh,
                  const float* sums, float* out, int64_t ldo) {
  int c0 = 0;
  for (; c0 + 4 * kLanes <= dh; c0 += 4 * kLanes) {
    int i0 = 0;
    for (; i0 + kRowsPV <= rows; i0 += kRowsPV)
      pv_block<kRowsPV, 4>(p, i0, ldp, v, m, dh, c0, sums, out, ldo);
    for (; i0 < rows; ++i0) pv_block<1, 4>(p, i0, ldp, v, m, dh, c0, sums, out, ldo);
  }
  for (; c0 < dh; c0 += kLanes) {
    int i0 = 0;
    for (; i0 + kRowsPV <= rows; i0 += kRowsPV)
      pv_block<kRowsPV, 1>(p, i0, ldp, v, m, dh, c0, sums, out, ldo);
    for (; i0 < rows; ++i0) pv_block<1, 1>(p, i0, ldp, v, m, dh, c0, sums, out, ldo);
  }
}

ffi::Error CausalAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                               float scale, int64_t window, int64_t threads,
                               ffi::ThreadPool pool) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 5 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("causal_attention: q must be 5-d and k, v 4-d");
  }
  const Shape sh{qd[0], qd[1], qd[2], qd[3], qd[4]};
  if (kd[0] != sh.b || kd[1] != sh.g || kd[2] != sh.t || kd[3] != sh.dh || sh.dh % kLanes) {
    return ffi::Error::InvalidArgument("causal_attention: shapes disagree or dh % 16 != 0");
  }
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  const int dh = static_cast<int>(sh.dh);
  const int64_t ld = (sh.t + kColsS - 1) / kColsS * kColsS;  // padded key count
  const int nthreads = workers(threads);

  // Phase 1: each group's keys packed in blocks of kColsS keys, each block (dh, kColsS),
  // zero-padded to ld keys.
  Floats kpacked(static_cast<size_t>(sh.b * sh.g * ld * sh.dh), 0.0f);
  parallel_for(sh.b * sh.g, nthreads, pool, [&](int64_t bg, int) {
    pack_panels(kp + bg * sh.t * sh.dh, sh.t, dh, kpacked.data() + bg * ld * sh.dh);
  });

  // Phase 2: work items (b, g, tile), the longest tiles (most keys) first. A tile's key panel
  // starts at its first visible key rounded down to a block; keys before it are masked.
  const int64_t tiles = (sh.t + kTileRows - 1) / kTileRows;
  const int64_t hdh = sh.g * sh.r * sh.dh;
  parallel_for(sh.b * sh.g * tiles, nthreads, pool, [&](int64_t item, int) {
    const int64_t tile = tiles - 1 - item % tiles;
    const int64_t bg = item / tiles;
    const int64_t bi = bg / sh.g, gi = bg % sh.g;
    const int64_t start = tile * kTileRows;
    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, sh.t - start));
    const int64_t end = start + rows;
    const int64_t visible = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0;
    const int64_t first = visible / kColsS * kColsS;  // the panel: keys [first, end)
    const int m = static_cast<int>(end - first);
    const int mpad = (m + kColsS - 1) / kColsS * kColsS;  // first + mpad <= ld
    thread_local Floats s, sums;
    s.resize(static_cast<size_t>(rows) * mpad);
    sums.resize(rows);
    const float* panel = kpacked.data() + (bg * ld + first) * sh.dh;
    const float* vpanel = vp + (bg * sh.t + first) * sh.dh;
    for (int64_t a = 0; a < sh.r; ++a) {
      const float* qrows = qp + ((bg * sh.r + a) * sh.t + start) * sh.dh;
      scores(qrows, rows, panel, mpad, dh, scale, s.data(), mpad);
      for (int i = 0; i < rows; ++i) {
        const int64_t pos = start + i - first;  // the row's own key in the panel
        const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        sums[i] = softmax_row(s.data() + static_cast<size_t>(i) * mpad, lo, pos, mpad);
      }
      float* orows = op + (bi * sh.t + start) * hdh + (gi * sh.r + a) * sh.dh;
      probs_values(s.data(), rows, mpad, vpanel, m, dh, sums.data(), orows, hdh);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneCausalAttention, CausalAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
