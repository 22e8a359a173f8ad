// FAB's projection onto a hyperplane within the box, one row at a time (see fab_cpu.py, which
// builds and loads this file, and fab.project_to_hyperplane_in_box, the same algorithm in XLA
// ops, which it must match).
//
// SparseRobustFabProjection: for each row of points p [N, D], normals w [N, D] and offsets
// b [N], the smallest (L-inf or L2) step d with w.(p + d) = b and clip_min <= p + d <= clip_max.
// Coordinate i moves towards the hyperplane by min(lambda, r_i) (L-inf) or |w_i| min(lambda, r_i)
// (L2), r_i its room to the box; lambda solves sum_i q_i min(lambda, r_i) = |w.p - b| with
// q = |w| (L-inf) or w^2 (L2), found by Newton's method from 0 on the concave, piecewise-linear
// left side, which stops once the set of saturated coordinates no longer changes.
//
// In XLA ops the projection reads and writes [2N, D] arrays about fifteen times per FAB step,
// more than the model's passes cost; here a row stays in cache from start to end.
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "../models/native_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sparse_robust::load16;
using sparse_robust::v16;

typedef int32_t vi16 __attribute__((vector_size(64)));

constexpr int64_t kRowsPerItem = 8;

inline float sum16(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

struct Scratch {
  std::vector<float> q, r;  // [D] each, padded to a multiple of 16 with zeros
  explicit Scratch(int64_t padded) : q(padded, 0.0f), r(padded, 0.0f) {}
};

// One row: writes d [D] from p, w [D] and b.
void project_row(const float* p, const float* w, float b, int64_t dim, int64_t padded, bool l2,
                 float clip_min, float clip_max, Scratch& s, float* d) {
  float gap = 0.0f;
  for (int64_t i = 0; i < dim; ++i) gap += w[i] * p[i];
  gap -= b;
  const float towards = gap > 0 ? -1.0f : (gap < 0 ? 1.0f : 0.0f);  // -sign(gap)
  for (int64_t i = 0; i < dim; ++i) {
    const float sign_w = w[i] > 0 ? 1.0f : (w[i] < 0 ? -1.0f : 0.0f);
    const float direction = towards * sign_w;
    const float room = std::max(direction > 0 ? clip_max - p[i] : p[i] - clip_min, 0.0f);
    const float size = std::fabs(w[i]);
    s.q[i] = l2 ? size * size : size;
    s.r[i] = l2 ? (size > 0 ? room / size : 0.0f) : room;
  }
  const float beta = std::fabs(gap);
  float lam = 0.0f;
  int64_t count = -1;
  for (int64_t iteration = 0; iteration <= dim + 1; ++iteration) {
    const v16 lam_v = v16{} + lam;
    v16 filled_v = v16{}, slope_v = v16{};
    vi16 saturated_v = vi16{};
    for (int64_t i = 0; i < padded; i += 16) {
      const v16 q = load16(&s.q[i]), r = load16(&s.r[i]);
      const vi16 saturated = r <= lam_v;  // -1 where true
      filled_v += saturated ? q * r : v16{};
      slope_v += saturated ? v16{} : q;
      saturated_v -= saturated;
    }
    // Padding entries (q = r = 0) count as saturated and add nothing to either sum.
    const int64_t new_count = [&] {
      int64_t c = 0;
      for (int i = 0; i < 16; ++i) c += saturated_v[i];
      return c - (padded - dim);
    }();
    const float filled = sum16(filled_v), slope = sum16(slope_v);
    float next;
    if (slope > 0) {
      next = std::max(lam, (beta - filled) / slope);
    } else {
      next = filled < beta ? std::numeric_limits<float>::infinity() : lam;
    }
    lam = next;
    if (new_count == count) break;  // the piece did not change: lam solves the equation on it
    count = new_count;
  }
  for (int64_t i = 0; i < dim; ++i) {
    const float sign_w = w[i] > 0 ? 1.0f : (w[i] < 0 ? -1.0f : 0.0f);
    const float move = std::min(lam, s.r[i]);
    d[i] = towards * sign_w * (l2 ? move * std::fabs(w[i]) : move);
  }
}

ffi::Error Project(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> points, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> d, int32_t l2,
                   float clip_min, float clip_max) {
  const auto dims = points.dimensions();
  if (dims.size() != 2 || w.dimensions().size() != 2 || b.dimensions().size() != 1 ||
      w.element_count() != points.element_count() || b.element_count() != dims[0])
    return ffi::Error::InvalidArgument("fab_cpu: points and w must be [N, D] and b [N]");
  const int64_t rows = dims[0], dim = dims[1], padded = (dim + 15) / 16 * 16;
  const float* p = points.typed_data();
  const float* wd = w.typed_data();
  const float* bd = b.typed_data();
  float* out = d->typed_data();
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  sparse_robust::parallel_for(
      pool, items, [&] { return std::make_unique<Scratch>(padded); },
      [&](int64_t item, Scratch& s) {
        const int64_t end = std::min(rows, (item + 1) * kRowsPerItem);
        for (int64_t row = item * kRowsPerItem; row < end; ++row)
          project_row(p + row * dim, wd + row * dim, bd[row], dim, padded, l2 != 0, clip_min,
                      clip_max, s, out + row * dim);
      });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustFabProjection, Project,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("l2")
                                  .Attr<float>("clip_min")
                                  .Attr<float>("clip_max"));
