// Pieces shared by the library's C++ CPU kernels (winograd_cpu.cc, direct_cpu.cc, pool_cpu.cc,
// sparse_cpu.cc, attacks/fab_cpu.cc): 16-float vectors and a parallel loop over XLA's intra-op
// thread pool. native.py hashes this header into every kernel's cache key.
#ifndef SPARSE_ROBUST_NATIVE_PARALLEL_H_
#define SPARSE_ROBUST_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace sparse_robust {

// 16 floats; GCC and Clang lower it to the widest vectors the target has.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// Work items are claimed from a shared counter by the calling thread and by helpers on XLA's
// pool. The caller waits only for helpers that claimed work (`active` counts them from before
// their first claim), so a helper the busy pool never starts cannot stall it.
struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  std::mutex mu;
  std::condition_variable done;
};

// Runs body(i, scratch) for every i in [0, count), each exactly once, on up to the pool's
// number of threads; each thread makes its scratch (`make_scratch()`, a unique_ptr) before its
// first item.
template <typename MakeScratch, typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, MakeScratch make_scratch,
                  Body body) {
  auto progress = std::make_shared<Progress>();
  auto work = [=](Progress* pr) {
    decltype(make_scratch()) scratch;
    for (int64_t i; (i = pr->next.fetch_add(1)) < count;) {
      if (!scratch) scratch = make_scratch();
      body(i, *scratch);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([progress, work] {
      progress->active.fetch_add(1);
      work(progress.get());
      std::lock_guard<std::mutex> lock(progress->mu);
      if (progress->active.fetch_sub(1) == 1) progress->done.notify_all();
    });
  }
  work(progress.get());
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->done.wait(lock, [&] { return progress->active.load() == 0; });
}

}  // namespace sparse_robust

#endif  // SPARSE_ROBUST_NATIVE_PARALLEL_H_
