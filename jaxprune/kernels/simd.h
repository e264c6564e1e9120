// Vector helpers shared by the CPU kernels: 16-lane float vectors (GCC/Clang vector
// extensions: the compiler maps them onto the widest registers of -march=native), a fast exp of
// non-positive arguments, and a dynamic parallel loop over work items.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace jaxprune_simd {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

// An allocator of 64-byte-aligned memory: a vector (64 bytes) loaded from an unaligned address
// spans two cache lines and costs two loads, and malloc aligns only to 16 bytes.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  // Elements made without a value are left uninitialised (every kernel writes its buffers
  // before reading them, and a zero fill would be one more pass over memory).
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0) {
      ::new (static_cast<void*>(p)) U;
    } else {
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
  }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using Floats = std::vector<float, Aligned64<float>>;  // the kernels' packed and scratch buffers

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf splat(float a) {
  // x * 1 is exactly x, so the compiler folds this to a broadcast (vf{} + a is not: -0.0).
  const vf one = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  return one * a;
}

// exp(x) for x <= 0 (scores minus their row maximum): 2^n * p(f), n = round(x / ln 2),
// f = x - n ln 2 (two-part ln 2), p a degree-6 Taylor polynomial; relative error ~2e-7.
// Below -87 the result is flushed to 0 (float32's exp is denormal or 0 there).
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.0f);
  vi dead = x < lo;
  x = x < lo ? lo : x;
  vf t = x * splat(1.44269504088896341f) - splat(0.5f);
  vi n = __builtin_convertvector(t, vi);  // truncation of t - 0.5: round to nearest for t <= 0
  vf nf = __builtin_convertvector(n, vf);
  vf f = x - nf * splat(0.693145751953125f) - nf * splat(1.428606765330187e-06f);
  vf p = splat(1.0f / 720.0f);
  p = p * f + splat(1.0f / 120.0f);
  p = p * f + splat(1.0f / 24.0f);
  p = p * f + splat(1.0f / 6.0f);
  p = p * f + splat(0.5f);
  p = p * f + splat(1.0f);
  p = p * f + splat(1.0f);
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  vf out = p * scale;
  return dead ? splat(0.0f) : out;
}

// Columns of a packed panel block, and rows of the register block that multiplies it: the
// block's accumulators (kPanelRows x 2 vectors), the panel's two vectors and a broadcast fill the
// vector registers: 32 with AVX-512 (14 rows), 16 elsewhere (6 rows).
constexpr int kPanel = 2 * kLanes;
#if defined(__AVX512F__)
constexpr int kPanelRows = 14;
#else
constexpr int kPanelRows = 6;
#endif

// out (NR, kPanel), row stride ld_out, = scale * rows (NR, d; row stride ld_rows, default d) x
// panel (d, kPanel), or out plus that product where `accumulate`. The panel block is contiguous,
// so its rows never collide in the L1 cache.
template <int NR>
inline void panel_block(const float* rows, int d, const float* panel, float scale, float* out,
                        int64_t ld_out, int64_t ld_rows = 0, bool accumulate = false) {
  if (ld_rows == 0) ld_rows = d;
  vf acc[NR][2] = {};
  for (int k = 0; k < d; ++k) {
    const vf p0 = load(panel + k * kPanel);
    const vf p1 = load(panel + k * kPanel + kLanes);
    for (int a = 0; a < NR; ++a) {
      const vf x = splat(rows[a * ld_rows + k]);
      acc[a][0] += x * p0;
      acc[a][1] += x * p1;
    }
  }
  for (int a = 0; a < NR; ++a) {
    vf r0 = acc[a][0] * splat(scale), r1 = acc[a][1] * splat(scale);
    if (accumulate) {
      r0 += load(out + a * ld_out);
      r1 += load(out + a * ld_out + kLanes);
    }
    store(out + a * ld_out, r0);
    store(out + a * ld_out + kLanes, r1);
  }
}

// rows (n, d), row-major, into panel blocks of kPanel rows, each block (d, kPanel) contiguous:
// row j, column k goes to dst[(j / kPanel) * d * kPanel + k * kPanel + j % kPanel]. dst holds
// ceil(n / kPanel) blocks and is zero-filled by the caller (the padding rows stay 0).
inline void pack_panels(const float* src, int64_t n, int d, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    float* block = dst + (j / kPanel) * d * kPanel + j % kPanel;
    for (int k = 0; k < d; ++k) block[k * kPanel] = src[j * d + k];
  }
}

// The worker count: `threads` when positive, else the machine's hardware threads.
inline int workers(int64_t threads) {
  return threads > 0 ? static_cast<int>(threads)
                     : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// panel_block of NR rows for NR = nrows (0 < nrows <= kPanelRows), chosen at run time.
template <int NR = kPanelRows>
inline void panel_block_of(int nrows, const float* rows, int d, const float* panel, float scale,
                           float* out, int64_t ld_out, int64_t ld_rows = 0,
                           bool accumulate = false) {
  if constexpr (NR > 1) {
    if (nrows < NR)
      return panel_block_of<NR - 1>(nrows, rows, d, panel, scale, out, ld_out, ld_rows,
                                    accumulate);
  }
  panel_block<NR>(rows, d, panel, scale, out, ld_out, ld_rows, accumulate);
}

// panel_block over nrows rows: register blocks of kPanelRows, then one block of the rest.
inline void rows_times_panel(const float* rows, int nrows, int d, const float* panel,
                             float scale, float* out, int64_t ld_out) {
  int a = 0;
  for (; a + kPanelRows <= nrows; a += kPanelRows)
    panel_block<kPanelRows>(rows + static_cast<int64_t>(a) * d, d, panel, scale,
                            out + a * ld_out, ld_out);
  if (a < nrows)
    panel_block_of(nrows - a, rows + static_cast<int64_t>(a) * d, d, panel, scale,
                   out + a * ld_out, ld_out);
}

// Shared by parallel_for's calling thread and its pool tasks (a task may outlive the call).
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable idle;
  int active = 0;
  bool closed = false;
};

// fn(item, worker) for items 0..n-1 on up to `threads` workers, items taken in order as each
// worker frees up: this thread (worker 0) and threads - 1 tasks scheduled on `pool` (XLA's CPU
// thread pool: with threads of our own, its idle workers spun beside them). A task may start
// late (the pool busy with other work): one that starts after this thread has run out of items
// does nothing, and this thread waits only for tasks under way.
template <typename Fn, typename Pool>
void parallel_for(int64_t n, int threads, Pool& pool, Fn fn) {
  auto state = std::make_shared<ParallelState>();
  auto drain = [&state, &fn, n](int worker) {
    for (int64_t i = state->next++; i < n; i = state->next++) fn(i, worker);
  };
  const int64_t helpers = std::min<int64_t>(threads, n) - 1;
  for (int w = 1; w <= helpers; ++w) {
    pool.Schedule([state, run = &drain, w]() {
      {
        std::lock_guard<std::mutex> lock(state->mu);
        if (state->closed) return;
        ++state->active;
      }
      (*run)(w);
      std::lock_guard<std::mutex> lock(state->mu);
      if (--state->active == 0) state->idle.notify_all();
    });
  }
  drain(0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->closed = true;
  state->idle.wait(lock, [&state] { return state->active == 0; });
}

}  // namespace jaxprune_simd
