// Next-token NLL through the output head for XLA on CPU (float32), as a jax.ffi target:
// nll[i] = logsumexp_v(h[i] . w[v]) - h[i] . w[target[i]], without writing the (n, vocab)
// logits to memory. XLA computes them with one matmul per chunk of tokens, writes them, and
// reads them back for the maximum and the exp-sum; here each work item takes a slice of the
// vocabulary, keeps its logits tiles in cache, and folds them into per-token running
// (maximum, sum of exp), merged at the end in a fixed order (deterministic results).
//
// Layouts (row-major): h (n, d) (the final norm already applied); w (vocab, d) (an embedding
// table, or an untied head's kernel transposed); targets (n,) int32; out (n,).

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

constexpr int kTokens = kPanel;      // tokens per packed block (two vectors)
constexpr int kChunk = 256;          // vocabulary rows per tile (256 x 32 logits)
constexpr int64_t kGroups = 64;      // work items: contiguous groups of chunks

ffi::Error HeadNllImpl(ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::S32> targets, ffi::ResultBuffer<ffi::F32> out,
                       int64_t threads, ffi::ThreadPool pool) {
  const auto hd = h.dimensions();
  const auto wd = w.dimensions();
  if (hd.size() != 2 || wd.size() != 2 || hd[1] != wd[1] || targets.dimensions().size() != 1 ||
      targets.dimensions()[0] != hd[0]) {
    return ffi::Error::InvalidArgument("head_nll: h (n, d), w (vocab, d) and targets (n,)");
  }
  const int64_t n = hd[0], vocab = wd[0];
  const int d = static_cast<int>(hd[1]);
  const float* hp = h.typed_data();
  const float* wp = w.typed_data();
  const int32_t* tp = targets.typed_data();
  float* op = out->typed_data();
  for (int64_t i = 0; i < n; ++i) {
    if (tp[i] < 0 || tp[i] >= vocab) {
      return ffi::Error::InvalidArgument("head_nll: a target is outside the vocabulary");
    }
  }
  const int nthreads = workers(threads);

  // Tokens packed in blocks of kTokens, each block (d, kTokens), zero-padded.
  const int64_t blocks = (n + kTokens - 1) / kTokens;
  Floats packed(static_cast<size_t>(blocks * d * kTokens), 0.0f);
  pack_panels(hp, n, d, packed.data());

  // The vocabulary's chunks in kGroups contiguous groups, each folded in order into its own
  // running maximum and sum of exp per token by whichever worker takes it, then the groups
  // merged in order: the result does not depend on the scheduling or the number of threads.
  const float neg = -std::numeric_limits<float>::infinity();
  const int64_t npad = blocks * kTokens;
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  const int64_t groups = std::min<int64_t>(kGroups, chunks);
  std::vector<float> run_max(static_cast<size_t>(groups * npad), neg);
  std::vector<float> run_sum(static_cast<size_t>(groups * npad), 0.0f);
  parallel_for(groups, nthreads, pool, [&](int64_t group, int) {
    float* mx = run_max.data() + group * npad;
    float* sm = run_sum.data() + group * npad;
    thread_local Floats tile;
    tile.resize(static_cast<size_t>(kChunk) * kTokens);
    for (int64_t chunk = group * chunks / groups; chunk < (group + 1) * chunks / groups; ++chunk) {
      const int64_t v0 = chunk * kChunk;
      const int rows = static_cast<int>(std::min<int64_t>(kChunk, vocab - v0));
      for (int64_t b = 0; b < blocks; ++b) {
        const float* hb = packed.data() + b * d * kTokens;
        rows_times_panel(wp + v0 * d, rows, d, hb, 1.0f, tile.data(), kTokens);
        for (int half = 0; half < 2; ++half) {
          const int64_t lane0 = b * kTokens + half * kLanes;
          vf m = load(tile.data() + half * kLanes);
          for (int r = 1; r < rows; ++r) {
            const vf x = load(tile.data() + r * kTokens + half * kLanes);
            m = x > m ? x : m;
          }
          vf s = {};
          for (int r = 0; r < rows; ++r)
            s += exp_nonpositive(load(tile.data() + r * kTokens + half * kLanes) - m);
          const vf old_m = load(mx + lane0);
          const vf new_m = old_m > m ? old_m : m;
          const vf old_s = load(sm + lane0);
          store(sm + lane0,
                old_s * exp_nonpositive(old_m - new_m) + s * exp_nonpositive(m - new_m));
          store(mx + lane0, new_m);
        }
      }
    }
  });

  // Merge the groups in order; subtract each token's target logit.
  const int64_t used = groups;
  for (int64_t i = 0; i < n; ++i) {
    float m = neg;
    for (int64_t t = 0; t < used; ++t) m = std::max(m, run_max[t * npad + i]);
    double s = 0.0;
    for (int64_t t = 0; t < used; ++t)
      s += static_cast<double>(run_sum[t * npad + i]) * std::exp(run_max[t * npad + i] - m);
    const float* wt = wp + static_cast<int64_t>(tp[i]) * d;
    float picked = 0.0f;
    for (int k = 0; k < d; ++k) picked += hp[i * d + k] * wt[k];
    op[i] = static_cast<float>(m + std::log(s)) - picked;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneHeadNll, HeadNllImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Ctx<ffi::ThreadPool>());
