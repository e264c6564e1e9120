// A float32 matrix product for XLA on CPU, as a jax.ffi target: out (m, n) = x (m, k) w (k, n),
// the models' projections (y = x @ kernel).
//
// XLA's CPU dot runs at about 0.7 of PyTorch's speed at the models' shapes (2048 tokens against
// kernels of 576 x 1536 and the like). This is the usual blocked form: w's columns packed in
// panels of kPanel (each panel (k, kPanel) contiguous, so a register block streams it without
// cache-set collisions), and register blocks of kPanelRows rows of x against one panel, in
// depth passes of kDepth. Each group of kGroupPanels panels (kept in the L2 cache) meets every
// register block of rows in turn, and a block's rows (in the L1 cache) meet the group's panels.
// A worker takes either a chunk of rows against every panel (few panels), or a group of panels
// against every row (many). Every output element is summed in the same order (depth passes in
// turn, each in the order of k) whoever computes it, so the result does not depend on the
// scheduling or the number of threads.
//
// Layouts (row-major): x (m, k); w (k, n); out (m, n).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxprune_simd;

constexpr int kGroupPanels = 8;  // panels a row block meets in turn (8 x kDepth x 32 floats)
constexpr int kDepth = 512;      // k per pass: a row block's 14 x 512 floats stay in L1

// w (k, n)'s panels [p0, p1) of kPanel columns, each (k, kPanel) contiguous, into dst; the last
// panel's columns past n are 0.
void pack_columns(const float* w, int64_t k, int64_t n, int64_t p0, int64_t p1, float* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = dst + (p - p0) * k * kPanel;
    const int64_t c0 = p * kPanel;
    const int64_t width = std::min<int64_t>(kPanel, n - c0);
    for (int64_t kk = 0; kk < k; ++kk) {
      std::memcpy(panel + kk * kPanel, w + kk * n + c0, width * sizeof(float));
      std::fill(panel + kk * kPanel + width, panel + (kk + 1) * kPanel, 0.0f);
    }
  }
}

// out rows [r_begin, r_end) x panels [p0, p1) = x w, the panels packed at `packed` (panel p at
// packed + (p - p0) k kPanel): depth passes of kDepth, each a row block against the panels.
void rows_times_panels(const float* x, int64_t k, int64_t n, int64_t r_begin, int64_t r_end,
                       const float* packed, int64_t p0, int64_t p1, float* out) {
  float tail[kPanelRows * kPanel];  // a partial panel's block, before its columns are kept
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const int depth = static_cast<int>(std::min<int64_t>(kDepth, k - k0));
    const bool accumulate = k0 > 0;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kPanelRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, r_end - r0));
      const float* xrows = x + r0 * k + k0;
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = packed + ((p - p0) * k + k0) * kPanel;
        const int64_t c0 = p * kPanel;
        const int64_t width = std::min<int64_t>(kPanel, n - c0);
        float* o = out + r0 * n + c0;
        if (width == kPanel) {
          panel_block_of(rows, xrows, depth, panel, 1.0f, o, n, k, accumulate);
          continue;
        }
        for (int a = 0; a < rows && accumulate; ++a)
          std::memcpy(tail + a * kPanel, o + a * n, width * sizeof(float));
        panel_block_of(rows, xrows, depth, panel, 1.0f, tail, kPanel, k, accumulate);
        for (int a = 0; a < rows; ++a)
          std::memcpy(o + a * n, tail + a * kPanel, width * sizeof(float));
      }
    }
  }
}

ffi::Error MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out, int64_t threads, ffi::ThreadPool pool) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("matmul: x must be (m, k) and w (k, n)");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const int nthreads = workers(threads);
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t groups = (panels + kGroupPanels - 1) / kGroupPanels;

  if (groups >= 2 * nthreads) {
    // Wide: each worker takes a group of panels, packs it into its own buffer (in its cache)
    // and runs every row against it.
    parallel_for(groups, nthreads, pool, [&](int64_t g, int) {
      const int64_t p0 = g * kGroupPanels, p1 = std::min(panels, p0 + kGroupPanels);
      thread_local Floats packed;
      packed.resize(static_cast<size_t>((p1 - p0) * k * kPanel));
      pack_columns(wp, k, n, p0, p1, packed.data());
      rows_times_panels(xp, k, n, 0, m, packed.data(), p0, p1, op);
    });
    return ffi::Error::Success();
  }
  // Narrow: every panel packed once, then each worker takes a chunk of rows (about four chunks
  // a worker, each a multiple of the register block) against all of them.
  Floats packed(static_cast<size_t>(panels * k * kPanel));
  parallel_for(panels, nthreads, pool, [&](int64_t p, int) {
    pack_columns(wp, k, n, p, p + 1, packed.data() + p * k * kPanel);
  });
  const int64_t blocks = (m + kPanelRows - 1) / kPanelRows;
  const int64_t chunk = std::max<int64_t>(1, (blocks + 4 * nthreads - 1) / (4 * nthreads));
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  parallel_for(chunks, nthreads, pool, [&](int64_t c, int) {
    const int64_t r_begin = c * chunk * kPanelRows;
    const int64_t r_end = std::min(m, r_begin + chunk * kPanelRows);
    for (int64_t p0 = 0; p0 < panels; p0 += kGroupPanels) {
      const int64_t p1 = std::min(panels, p0 + kGroupPanels);
      rows_times_panels(xp, k, n, r_begin, r_end, packed.data() + p0 * k * kPanel, p0, p1, op);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
