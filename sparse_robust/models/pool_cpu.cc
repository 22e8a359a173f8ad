// 2x2 max-pooling of few channels as CPU kernels, for sparse_robust.models.pooling (see
// pool_cpu.py, which builds and loads this file). x is [n, h, w, c] with h and w even and
// c <= 16. A window's maximum is NaN if any of its elements is; the first of its maxima in
// row-major order carries the gradient, as in select_and_scatter_add.
//
// SparseRobustMaxPool: y [n, h / 2, w / 2, c], each window's maximum.
// SparseRobustPoolSelect: of t shaped like x, the element at each window's first maximum of x.
// SparseRobustPoolScatter: of ct shaped like y, an array shaped like x holding each ct at its
//   window's first maximum of x and zeros elsewhere (PoolSelect's transpose in t).
//
// The two columns of a window are c floats apart in a row, so one 16-float vector at column 2b
// and one at 2b + 1 hold the window's elements for every channel in their first c lanes. Lanes
// past c are another window's and are overwritten by the next column's store: rows are built in
// scratch with 16 floats of room past their end, then copied out.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "native_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sparse_robust::load16;
using sparse_robust::store16;
using sparse_robust::v16;

typedef int32_t m16 __attribute__((vector_size(64)));  // lane masks of comparisons

constexpr int kRoom = 16;  // floats of scratch past a row's end

struct Pool {
  int64_t n, h, w, c, oh, ow;
  int64_t in_row() const { return w * c; }     // floats of one x row
  int64_t out_row() const { return ow * c; }   // floats of one y row
};

inline m16 is_nan(v16 v) { return v != v; }

// The maximum, NaN if either is.
inline v16 nan_max(v16 a, v16 b) { return (a > b) | is_nan(a) ? a : b; }

// The four elements of the windows of output column b, and which of them is the window's first
// maximum (masks first00 .. first11, exactly one set per lane).
struct Window {
  v16 max;
  m16 first00, first01, first10, first11;
};

inline Window window_at(const float* row0, const float* row1, int64_t offset, int64_t c) {
  const v16 x00 = load16(row0 + offset), x01 = load16(row0 + offset + c);
  const v16 x10 = load16(row1 + offset), x11 = load16(row1 + offset + c);
  Window win;
  win.max = nan_max(nan_max(x00, x01), nan_max(x10, x11));
  const m16 nan = is_nan(win.max);
  const m16 eq00 = (x00 == win.max) | (is_nan(x00) & nan);
  const m16 eq01 = (x01 == win.max) | (is_nan(x01) & nan);
  const m16 eq10 = (x10 == win.max) | (is_nan(x10) & nan);
  win.first00 = eq00;
  win.first01 = eq01 & ~eq00;
  win.first10 = eq10 & ~(eq00 | eq01);
  win.first11 = ~(eq00 | eq01 | eq10);
  return win;
}

// Per-thread scratch: x's two rows of an output row, two more rows shaped like them (t's, or
// dx's) and an output row, each with kRoom floats after it.
struct Scratch {
  std::vector<float> x0, x1, u0, u1, out;
  explicit Scratch(const Pool& p)
      : x0(p.in_row() + kRoom, 0.f), x1(p.in_row() + kRoom, 0.f), u0(p.in_row() + kRoom, 0.f),
        u1(p.in_row() + kRoom, 0.f), out(p.out_row() + kRoom, 0.f) {}
};

// Runs body(output row, scratch) for every output row r (image r / oh, row r % oh) over the pool.
template <typename Body>
void for_output_rows(ffi::ThreadPool& pool, const Pool& p, Body body) {
  const int64_t rows = p.n * p.oh;
  const int64_t per_unit =
      std::max<int64_t>(1, rows / (8 * std::max<int64_t>(1, pool.num_threads())));
  sparse_robust::parallel_for(
      pool, (rows + per_unit - 1) / per_unit, [&p] { return std::make_unique<Scratch>(p); },
      [=, &p](int64_t unit, Scratch& scratch) {
        for (int64_t r = unit * per_unit; r < std::min(rows, (unit + 1) * per_unit); ++r)
          body(r, scratch);
      });
}

// The first of the two rows of `a` (shaped like x) under output row r.
inline int64_t first_row(const Pool& p, int64_t r) {
  return (r / p.oh * p.h + r % p.oh * 2) * p.in_row();
}

// The two rows of `a` (shaped like x) under output row r, into `row0` and `row1`.
inline void copy_rows(const Pool& p, const float* a, int64_t r, std::vector<float>& row0,
                      std::vector<float>& row1) {
  std::memcpy(row0.data(), a + first_row(p, r), p.in_row() * sizeof(float));
  std::memcpy(row1.data(), a + first_row(p, r) + p.in_row(), p.in_row() * sizeof(float));
}

ffi::Error read_pool(ffi::Span<const int64_t> xd, Pool& p) {
  if (xd.size() != 4 || xd[1] % 2 != 0 || xd[2] % 2 != 0 || xd[3] > 16)
    return ffi::Error::InvalidArgument("pool_cpu: x must be [n, h, w, c] with h and w even and "
                                       "c <= 16");
  p = {xd[0], xd[1], xd[2], xd[3], xd[1] / 2, xd[2] / 2};
  return ffi::Error::Success();
}

ffi::Error MaxPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  Pool p;
  ffi::Error error = read_pool(x.dimensions(), p);
  if (error.failure()) return error;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  for_output_rows(pool, p, [=, &p](int64_t r, Scratch& s) {
    copy_rows(p, xp, r, s.x0, s.x1);
    for (int64_t b = 0; b < p.ow; ++b)
      store16(s.out.data() + b * p.c, window_at(s.x0.data(), s.x1.data(), 2 * b * p.c, p.c).max);
    std::memcpy(yp + r * p.out_row(), s.out.data(), p.out_row() * sizeof(float));
  });
  return ffi::Error::Success();
}

ffi::Error PoolSelect(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> t,
                      ffi::ResultBuffer<ffi::F32> y) {
  Pool p;
  ffi::Error error = read_pool(x.dimensions(), p);
  if (error.failure()) return error;
  const float* xp = x.typed_data();
  const float* tp = t.typed_data();
  float* yp = y->typed_data();
  for_output_rows(pool, p, [=, &p](int64_t r, Scratch& s) {
    copy_rows(p, xp, r, s.x0, s.x1);
    copy_rows(p, tp, r, s.u0, s.u1);
    for (int64_t b = 0; b < p.ow; ++b) {
      const int64_t offset = 2 * b * p.c;
      const Window win = window_at(s.x0.data(), s.x1.data(), offset, p.c);
      const float* t0 = s.u0.data() + offset;
      const float* t1 = s.u1.data() + offset;
      v16 picked = load16(t1 + p.c);
      picked = win.first10 ? load16(t1) : picked;
      picked = win.first01 ? load16(t0 + p.c) : picked;
      picked = win.first00 ? load16(t0) : picked;
      store16(s.out.data() + b * p.c, picked);
    }
    std::memcpy(yp + r * p.out_row(), s.out.data(), p.out_row() * sizeof(float));
  });
  return ffi::Error::Success();
}

ffi::Error PoolScatter(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct,
                       ffi::ResultBuffer<ffi::F32> dx) {
  Pool p;
  ffi::Error error = read_pool(x.dimensions(), p);
  if (error.failure()) return error;
  const float* xp = x.typed_data();
  const float* cp = ct.typed_data();
  float* dp = dx->typed_data();
  for_output_rows(pool, p, [=, &p](int64_t r, Scratch& s) {
    copy_rows(p, xp, r, s.x0, s.x1);
    std::memcpy(s.out.data(), cp + r * p.out_row(), p.out_row() * sizeof(float));
    const v16 zero = (v16){};
    // Left to right: each store's lanes past c are overwritten by the next one.
    for (int64_t b = 0; b < p.ow; ++b) {
      const int64_t offset = 2 * b * p.c;
      const Window win = window_at(s.x0.data(), s.x1.data(), offset, p.c);
      const v16 g = load16(s.out.data() + b * p.c);
      store16(s.u0.data() + offset, win.first00 ? g : zero);
      store16(s.u0.data() + offset + p.c, win.first01 ? g : zero);
      store16(s.u1.data() + offset, win.first10 ? g : zero);
      store16(s.u1.data() + offset + p.c, win.first11 ? g : zero);
    }
    std::memcpy(dp + first_row(p, r), s.u0.data(), p.in_row() * sizeof(float));
    std::memcpy(dp + first_row(p, r) + p.in_row(), s.u1.data(), p.in_row() * sizeof(float));
  });
  return ffi::Error::Success();
}

auto one_operand() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<
      ffi::Buffer<ffi::F32>>();
}

auto two_operands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustMaxPool, MaxPool, one_operand());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustPoolSelect, PoolSelect, two_operands());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustPoolScatter, PoolScatter, two_operands());
