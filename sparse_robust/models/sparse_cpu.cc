// Sparse x dense products for the sparse execution of pruned dense layers (see sparse_cpu.py,
// which builds and loads this file). A pattern lists a [K, N] kernel's nonzeros by output
// column: those of column n are j in [ptr[n], ptr[n + 1]), at input row idx[j].
//
// SparseRobustSpmm:  y[r, n] = sum_j values[j] * x[r, idx[j]]  (x [..., K] -> y [..., N]; r runs
//                    over every leading index);
// SparseRobustSddmm: dv[j] = sum_r x[r, idx[j]] * dy[r, n(j)]  (the gradient of `values`).
//
// The batch is the vector axis: a block of kBlock rows of x is transposed into [K][kBlock] in
// cache, so that each nonzero costs kBlock / 16 vector multiply-adds on one contiguous row,
// and only the nonzeros are touched. Blocks are shared out over XLA's intra-op thread pool.
// Same inputs, same bits: every sum runs in a fixed order whichever thread runs it.
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

constexpr int kBlock = 64;  // batch rows per block: four 16-float vectors

struct Dims {
  int64_t rows, k, n;  // rows of x (all leading dimensions), its width, the output's width
};

struct Scratch {
  std::vector<float> in, out;  // [K][kBlock] and [N][kBlock]
  explicit Scratch(const Dims& d) : in(d.k * kBlock), out(d.n * kBlock) {}
};

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// dst[c * ld_dst + r] = src[r * ld_src + c] for an 8 x 8 tile, in registers.
inline void transpose8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    store8(dst + i * ld_dst, __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store8(dst + (i + 4) * ld_dst,
           __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: 8 x 8 tiles, then the edges.
void transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
               int64_t ld_dst) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t r = 0; r < rows8; r += 8)
    for (int64_t c = 0; c < cols8; c += 8)
      transpose8(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < rows8 ? cols8 : 0; c < cols; ++c)
      dst[c * ld_dst + r] = src[r * ld_src + c];
}

// t[c][i] = a[r0 + i][c] for rows i < count, zeros for the rest of the block.
void transpose_in(const float* a, int64_t width, int64_t r0, int count, float* t) {
  if (count < kBlock) std::fill(t, t + width * kBlock, 0.f);
  transpose(a + r0 * width, width, count, width, t, kBlock);
}

inline v16 broadcast(float a) { return (v16){} + a; }

// One block of y = x W: per output column, the sum over its nonzeros of value times the input
// row (kBlock batch rows), two nonzeros at a time into separate sums for more parallel chains.
// Output columns [n0, n1) only: a small batch (one block) is split by columns over threads.
void spmm_block(const Dims& d, const float* x, const float* values, const int32_t* ptr,
                const int32_t* idx, float* y, int64_t r0, int64_t n0, int64_t n1, Scratch& s) {
  const int count = int(std::min<int64_t>(kBlock, d.rows - r0));
  transpose_in(x, d.k, r0, count, s.in.data());
  const float* xt = s.in.data();
  for (int64_t n = n0; n < n1; ++n) {
    v16 a[4] = {}, b[4] = {};
    int32_t j = ptr[n];
    const int32_t end = ptr[n + 1];
    for (; j + 1 < end; j += 2) {
      const float* p = xt + int64_t(idx[j]) * kBlock;
      const float* q = xt + int64_t(idx[j + 1]) * kBlock;
      const v16 wp = broadcast(values[j]), wq = broadcast(values[j + 1]);
      for (int v = 0; v < 4; ++v) {
        a[v] += wp * load16(p + 16 * v);
        b[v] += wq * load16(q + 16 * v);
      }
    }
    if (j < end) {
      const float* p = xt + int64_t(idx[j]) * kBlock;
      const v16 wp = broadcast(values[j]);
      for (int v = 0; v < 4; ++v) a[v] += wp * load16(p + 16 * v);
    }
    float* out = s.out.data() + n * kBlock;
    for (int v = 0; v < 4; ++v) store16(out + 16 * v, a[v] + b[v]);
  }
  transpose(s.out.data() + n0 * kBlock, kBlock, n1 - n0, count, y + r0 * d.n + n0, d.n);
}

// dv[j] += sum over one block's rows of x[r, idx[j]] dy[r, n(j)].
void sddmm_block(const Dims& d, const float* x, const float* dy, const int32_t* ptr,
                 const int32_t* idx, float* dv, int64_t r0, Scratch& s) {
  const int count = int(std::min<int64_t>(kBlock, d.rows - r0));
  transpose_in(x, d.k, r0, count, s.in.data());
  transpose_in(dy, d.n, r0, count, s.out.data());
  const float* xt = s.in.data();
  for (int64_t n = 0; n < d.n; ++n) {
    const float* g = s.out.data() + n * kBlock;
    const v16 g0 = load16(g), g1 = load16(g + 16), g2 = load16(g + 32), g3 = load16(g + 48);
    for (int32_t j = ptr[n]; j < ptr[n + 1]; ++j) {
      const float* p = xt + int64_t(idx[j]) * kBlock;
      const v16 sum = (g0 * load16(p) + g1 * load16(p + 16)) +
                      (g2 * load16(p + 32) + g3 * load16(p + 48));
      float total = 0.f;
      for (int lane = 0; lane < 16; ++lane) total += sum[lane];
      dv[j] += total;
    }
  }
}

// The dimensions of x [..., K] against a pattern of N output columns; an error if they do not fit.
ffi::Error read_dims(ffi::Span<const int64_t> xd, int64_t element_count, int64_t ptr_size,
                     Dims& d) {
  if (xd.size() < 1 || xd[xd.size() - 1] < 1 || ptr_size < 1)
    return ffi::Error::InvalidArgument("sparse_cpu: x must be [..., K] with K >= 1 and ptr "
                                       "[N + 1]");
  d.k = xd[xd.size() - 1];
  d.rows = element_count / d.k;
  d.n = ptr_size - 1;
  return ffi::Error::Success();
}

ffi::Error Spmm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> values,
                ffi::Buffer<ffi::S32> ptr, ffi::Buffer<ffi::S32> idx,
                ffi::ResultBuffer<ffi::F32> y) {
  Dims d;
  ffi::Error error = read_dims(x.dimensions(), x.element_count(), ptr.element_count(), d);
  if (error.failure()) return error;
  if (y->element_count() != d.rows * d.n || values.element_count() != idx.element_count())
    return ffi::Error::InvalidArgument("sparse_cpu: y must be [..., N] like x and values shaped "
                                       "like idx");
  const float* xp = x.typed_data();
  const float* vp = values.typed_data();
  const int32_t* pp = ptr.typed_data();
  const int32_t* ip = idx.typed_data();
  float* yp = y->typed_data();
  const int64_t blocks = (d.rows + kBlock - 1) / kBlock;
  // Fewer blocks than threads: each block's columns are split in parts of at least 16.
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads() / std::max<int64_t>(blocks, 1), d.n / 16));
  sparse_robust::parallel_for(pool, blocks * splits,
                              [d] { return std::make_unique<Scratch>(d); },
                              [=](int64_t item, Scratch& s) {
                                const int64_t block = item / splits, part = item % splits;
                                spmm_block(d, xp, vp, pp, ip, yp, block * kBlock,
                                           d.n * part / splits, d.n * (part + 1) / splits, s);
                              });
  return ffi::Error::Success();
}

// The blocks are cut into a fixed number of parts (the pool's threads), each summed in block
// order into its own buffer, and the parts added in order.
ffi::Error Sddmm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                 ffi::Buffer<ffi::S32> ptr, ffi::Buffer<ffi::S32> idx,
                 ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  ffi::Error error = read_dims(x.dimensions(), x.element_count(), ptr.element_count(), d);
  if (error.failure()) return error;
  if (dy.element_count() != d.rows * d.n || dv->element_count() != idx.element_count())
    return ffi::Error::InvalidArgument("sparse_cpu: dy must be [..., N] like x and dv shaped "
                                       "like idx");
  const int64_t nnz = idx.element_count();
  const int64_t blocks = (d.rows + kBlock - 1) / kBlock;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), blocks));
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const int32_t* pp = ptr.typed_data();
  const int32_t* ip = idx.typed_data();
  float* dvp = dv->typed_data();
  std::vector<float> partial((parts - 1) * nnz);  // part 0 sums into dv itself
  float* partial_p = partial.data();
  sparse_robust::parallel_for(
      pool, parts, [d] { return std::make_unique<Scratch>(d); },
      [=](int64_t part, Scratch& s) {
        float* sum = part == 0 ? dvp : partial_p + (part - 1) * nnz;
        std::fill(sum, sum + nnz, 0.f);
        for (int64_t block = blocks * part / parts; block < blocks * (part + 1) / parts; ++block)
          sddmm_block(d, xp, gp, pp, ip, sum, block * kBlock, s);
      });
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t j = 0; j < nnz; ++j) dvp[j] += partial_p[(part - 1) * nnz + j];
  return ffi::Error::Success();
}

// Both kernels' signature: XLA's thread pool, two float32 operands, the pattern's ptr and idx,
// one float32 result.
auto two_operands_and_a_pattern() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustSpmm, Spmm, two_operands_and_a_pattern());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustSddmm, Sddmm, two_operands_and_a_pattern());
