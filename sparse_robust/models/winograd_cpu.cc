// Winograd F(2x2, 3x3) convolution as one fused CPU kernel, for the "winograd_cpu" path of
// sparse_robust.models.Conv (see winograd_cpu.py, which builds and loads this file).
//
// SparseRobustWinogradConv: y[..., n, h, w, co] = sum_{i, j, ci} x[..., n, h + i - 1, w + j - 1,
// ci] * g[i, j, ci, co] (3x3 kernel, stride 1, one pixel of zero padding on each side), given
// u = G g G^T as [..., 16, ci, co].
// SparseRobustWinogradKernelGrad: its transpose in u, du[..., 16, ci, co] from x and a
// cotangent dy [..., n, h, w, co].
// Leading dimensions are a batch (vmap) and must agree.
//
// XLA runs Winograd's input transform, its 16 matmuls and its output transform as separate
// passes over whole activations. Here they run per block of kBlock tiles, while the block's
// transformed inputs (16 x kBlock x ci floats) and products stay in the core's cache; blocks are
// shared out over XLA's intra-op thread pool.
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

constexpr int kRows = 8;    // tiles per micro-kernel call
constexpr int kCols = 32;   // output channels per micro-kernel call
constexpr int kBlock = 32;  // tiles per block (a multiple of kRows)

// c[kRows][16 kVectors] (+)= sum_p a[i * a_row + p * a_k] b[p][:] for p < k: a product with
// a or its transpose; strides in floats.
template <int kVectors, bool kAccumulate>
inline void micro_kernel(const float* a, int a_row, int a_k, const float* b, int ldb, float* c,
                         int ldc, int k) {
  v16 acc[kRows][kVectors];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVectors; ++v)
      acc[i][v] = kAccumulate ? load16(c + i * ldc + 16 * v) : (v16){};
  for (int p = 0; p < k; ++p) {
    v16 row[kVectors];
    for (int v = 0; v < kVectors; ++v) row[v] = load16(b + p * ldb + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      v16 broadcast = (v16){} + a[i * a_row + p * a_k];
      for (int v = 0; v < kVectors; ++v) acc[i][v] += broadcast * row[v];
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVectors; ++v) store16(c + i * ldc + 16 * v, acc[i][v]);
}

struct Shape {
  int64_t h, w, cin, cout, tiles_h, tiles_w, tiles;  // tiles: of the whole batch n
};

int padded(int rows) { return (rows + kRows - 1) / kRows * kRows; }

// The image of tile t and the output pixel at its top left.
struct Tile {
  int64_t image, top, left;
};
Tile tile_at(const Shape& s, int64_t t) {
  const int64_t per_image = s.tiles_h * s.tiles_w, rest = t % per_image;
  return {t / per_image, 2 * (rest / s.tiles_w), 2 * (rest % s.tiles_w)};
}

// Input transform V = B^T d B of tiles [t0, t0 + rows) of x [n, h, w, cin] into v [16][kBlock]
// [cin], with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]; rows past the
// last tile, up to a multiple of kRows, are zeros. `zeros` holds cin zeros.
void input_transform(const Shape& s, const float* x, int64_t t0, int rows, float* v,
                     const float* zeros) {
  const int cin = int(s.cin);
  const int64_t v_stride = int64_t(kBlock) * cin;  // between tile positions in v
  for (int r = 0; r < padded(rows); ++r) {
    float* vt = v + int64_t(r) * cin;
    if (r >= rows) {
      for (int q = 0; q < 16; ++q) std::memset(vt + q * v_stride, 0, cin * sizeof(float));
      continue;
    }
    const Tile tile = tile_at(s, t0 + r);
    const float* d[4][4];  // the tile's 4x4 inputs, from one pixel above and left of its outputs
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) {
        const int64_t i = tile.top + a - 1, j = tile.left + b - 1;
        d[a][b] = (i >= 0 && i < s.h && j >= 0 && j < s.w)
                      ? x + ((tile.image * s.h + i) * s.w + j) * cin : zeros;
      }
    for (int c = 0; c < cin; c += 16) {
      v16 e[4][4];
      for (int b = 0; b < 4; ++b) {
        const v16 d0 = load16(d[0][b] + c), d1 = load16(d[1][b] + c);
        const v16 d2 = load16(d[2][b] + c), d3 = load16(d[3][b] + c);
        e[0][b] = d0 - d2; e[1][b] = d1 + d2; e[2][b] = d2 - d1; e[3][b] = d1 - d3;
      }
      for (int a = 0; a < 4; ++a) {
        const v16 e0 = e[a][0], e1 = e[a][1], e2 = e[a][2], e3 = e[a][3];
        store16(vt + (a * 4 + 0) * v_stride + c, e0 - e2);
        store16(vt + (a * 4 + 1) * v_stride + c, e1 + e2);
        store16(vt + (a * 4 + 2) * v_stride + c, e2 - e1);
        store16(vt + (a * 4 + 3) * v_stride + c, e1 - e3);
      }
    }
  }
}

// Tiles [t0, t1) of one image batch x [n, h, w, cin] into y [n, h, w, cout], u [16, cin, cout].
// v and m are per-thread scratch: v [16][kBlock][cin], m [16][kBlock][kCols].
void conv_block(const Shape& s, const float* x, const float* u, float* y, int64_t t0, int64_t t1,
                float* v, float* m, const float* zeros) {
  const int cin = int(s.cin), cout = int(s.cout);
  const int rows = int(t1 - t0), padded_rows = padded(rows);
  const int64_t v_stride = int64_t(kBlock) * cin;  // between tile positions in v
  const int m_stride = kBlock * kCols;              // between tile positions in m
  input_transform(s, x, t0, rows, v, zeros);
  // Per kCols output channels: M = V U at each of the 16 tile positions, then the output
  // transform Y = A^T M A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], cropped to the image.
  for (int c0 = 0; c0 < cout; c0 += kCols) {
    const int width = std::min(kCols, cout - c0);
    for (int q = 0; q < 16; ++q) {
      const float* vq = v + q * v_stride;
      const float* uq = u + int64_t(q) * cin * cout + c0;
      float* mq = m + q * m_stride;
      for (int i = 0; i < padded_rows; i += kRows) {
        if (width == kCols)
          micro_kernel<2, false>(vq + i * cin, cin, 1, uq, cout, mq + i * kCols, kCols, cin);
        else
          micro_kernel<1, false>(vq + i * cin, cin, 1, uq, cout, mq + i * kCols, kCols, cin);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const Tile tile = tile_at(s, t0 + r);
      const float* mt = m + r * kCols;
      float* out[2][2];
      bool inside[2][2];
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) {
          const int64_t i = tile.top + a, j = tile.left + b;
          inside[a][b] = i < s.h && j < s.w;
          out[a][b] = y + ((tile.image * s.h + i) * s.w + j) * cout + c0;
        }
      for (int c = 0; c < width; c += 16) {
        v16 g[2][4];
        for (int b = 0; b < 4; ++b) {
          const v16 m0 = load16(mt + b * m_stride + c), m1 = load16(mt + (4 + b) * m_stride + c);
          const v16 m2 = load16(mt + (8 + b) * m_stride + c);
          const v16 m3 = load16(mt + (12 + b) * m_stride + c);
          g[0][b] = m0 + m1 + m2; g[1][b] = m1 - m2 - m3;
        }
        for (int a = 0; a < 2; ++a) {
          if (inside[a][0]) store16(out[a][0] + c, g[a][0] + g[a][1] + g[a][2]);
          if (inside[a][1]) store16(out[a][1] + c, g[a][1] - g[a][2] - g[a][3]);
        }
      }
    }
  }
}

// du [16, cin, cout] += the kernel gradient of tiles [t0, t1): sum over tiles of V^T M, with V
// the input transform of x and M = A dY A^T the transposed output transform of each tile's 2x2
// cotangent dy [n, h, w, cout] (zero outside the image), A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
// v [16][kBlock][cin] and m [16][kBlock][cout] are per-thread scratch.
void kernel_grad_block(const Shape& s, const float* x, const float* dy, float* du, int64_t t0,
                       int64_t t1, float* v, float* m, const float* zeros) {
  const int cin = int(s.cin), cout = int(s.cout);
  const int rows = int(t1 - t0), padded_rows = padded(rows);
  const int64_t v_stride = int64_t(kBlock) * cin, m_stride = int64_t(kBlock) * cout;
  input_transform(s, x, t0, rows, v, zeros);
  for (int r = 0; r < padded_rows; ++r) {
    float* mt = m + int64_t(r) * cout;
    if (r >= rows) {
      for (int q = 0; q < 16; ++q) std::memset(mt + q * m_stride, 0, cout * sizeof(float));
      continue;
    }
    const Tile tile = tile_at(s, t0 + r);
    const float* g[2][2];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        const int64_t i = tile.top + a, j = tile.left + b;
        g[a][b] = i < s.h && j < s.w ? dy + ((tile.image * s.h + i) * s.w + j) * cout : zeros;
      }
    for (int c = 0; c < cout; c += 16) {
      v16 e[4][2];  // A dY: rows
      for (int b = 0; b < 2; ++b) {
        const v16 g0 = load16(g[0][b] + c), g1 = load16(g[1][b] + c);
        e[0][b] = g0; e[1][b] = g0 + g1; e[2][b] = g0 - g1; e[3][b] = -g1;
      }
      for (int a = 0; a < 4; ++a) {  // (A dY) A^T: columns
        store16(mt + (a * 4 + 0) * m_stride + c, e[a][0]);
        store16(mt + (a * 4 + 1) * m_stride + c, e[a][0] + e[a][1]);
        store16(mt + (a * 4 + 2) * m_stride + c, e[a][0] - e[a][1]);
        store16(mt + (a * 4 + 3) * m_stride + c, -e[a][1]);
      }
    }
  }
  for (int q = 0; q < 16; ++q)
    for (int i = 0; i < cin; i += kRows)
      for (int c0 = 0; c0 < cout; c0 += kCols) {
        const float* a = v + q * v_stride + i;
        const float* b = m + q * m_stride + c0;
        float* c = du + (int64_t(q) * cin + i) * cout + c0;
        if (cout - c0 >= kCols) micro_kernel<2, true>(a, 1, cin, b, cout, c, cout, padded_rows);
        else micro_kernel<1, true>(a, 1, cin, b, cout, c, cout, padded_rows);
      }
}

// Per-thread scratch of either kernel: v [16][kBlock][cin], m [16][kBlock][max(cout, kCols)].
struct Scratch {
  std::vector<float> v, m, zeros;
  explicit Scratch(const Shape& s)
      : v(16 * kBlock * s.cin), m(16 * kBlock * std::max<int64_t>(s.cout, kCols)),
        zeros(std::max(s.cin, s.cout), 0.f) {}
};

// Runs body(i, scratch) for every i in [0, count) over the pool, with per-thread Scratch.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, const Shape& s, int64_t count, Body body) {
  sparse_robust::parallel_for(pool, count, [&s] { return std::make_unique<Scratch>(s); }, body);
}

// The shape of x [..., n, h, w, cin] with cout output channels, and the batch of leading
// dimensions; an error if the operands do not fit.
ffi::Error read_shape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> ud, int64_t cout,
                      int64_t leading, Shape& s, int64_t& batch) {
  const size_t xr = xd.size();
  if (xr < 4 || int64_t(xr) - 4 != leading)
    return ffi::Error::InvalidArgument("winograd_cpu: operands must be [..., n, h, w, c] and "
                                       "[..., 16, cin, cout] with the same leading dimensions");
  s.h = xd[xr - 3]; s.w = xd[xr - 2]; s.cin = xd[xr - 1]; s.cout = cout;
  if (ud[ud.size() - 3] != 16 || ud[ud.size() - 2] != s.cin || s.cin % 16 != 0 || s.cout % 16 != 0)
    return ffi::Error::InvalidArgument("winograd_cpu: the transformed kernel must be [..., 16, "
                                       "cin, cout] with cin and cout multiples of 16");
  batch = 1;
  for (size_t i = 0; i + 4 < xr; ++i) batch *= xd[i];
  s.tiles_h = (s.h + 1) / 2; s.tiles_w = (s.w + 1) / 2;
  s.tiles = xd[xr - 4] * s.tiles_h * s.tiles_w;
  return ffi::Error::Success();
}

ffi::Error WinogradConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                        ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  int64_t batch;
  const auto ud = u.dimensions();
  if (ud.size() < 3)
    return ffi::Error::InvalidArgument("winograd_cpu: u must be [..., 16, cin, cout]");
  ffi::Error error = read_shape(x.dimensions(), ud, ud[ud.size() - 1], int64_t(ud.size()) - 3, s,
                                batch);
  if (error.failure()) return error;
  const int64_t blocks_per_item = (s.tiles + kBlock - 1) / kBlock;
  const int64_t x_size = x.element_count() / batch, y_size = y->element_count() / batch;
  const int64_t u_size = 16 * s.cin * s.cout;
  const float* xp = x.typed_data();
  const float* up = u.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, s, batch * blocks_per_item, [=](int64_t block, Scratch& scratch) {
    const int64_t item = block / blocks_per_item, t0 = (block % blocks_per_item) * kBlock;
    conv_block(s, xp + item * x_size, up + item * u_size, yp + item * y_size, t0,
               std::min(t0 + kBlock, s.tiles), scratch.v.data(), scratch.m.data(),
               scratch.zeros.data());
  });
  return ffi::Error::Success();
}

// Each item's tiles are cut into a fixed number of parts (the pool's threads), each part summed
// in tile order into its own buffer and the parts added in order: the same bits on every run,
// whichever thread takes which part.
ffi::Error WinogradKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> du) {
  Shape s;
  int64_t batch;
  const auto dd = du->dimensions(), yd = dy.dimensions();
  if (dd.size() < 3 || yd.size() != x.dimensions().size())
    return ffi::Error::InvalidArgument("winograd_cpu: du must be [..., 16, cin, cout] and dy "
                                       "shaped like x");
  ffi::Error error = read_shape(x.dimensions(), dd, dd[dd.size() - 1], int64_t(dd.size()) - 3, s,
                                batch);
  if (error.failure()) return error;
  for (size_t i = 0; i + 1 < yd.size(); ++i)
    if (yd[i] != x.dimensions()[i] || yd[yd.size() - 1] != s.cout)
      return ffi::Error::InvalidArgument("winograd_cpu: dy must be [..., n, h, w, cout] like x");
  const int64_t blocks_per_item = (s.tiles + kBlock - 1) / kBlock;
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), blocks_per_item));
  const int64_t x_size = x.element_count() / batch, y_size = dy.element_count() / batch;
  const int64_t u_size = 16 * s.cin * s.cout;
  const float* xp = x.typed_data();
  const float* yp = dy.typed_data();
  float* dup = du->typed_data();
  // Part 0 of each item sums into du itself, the others into `partial`.
  std::vector<float> partial(batch * (parts - 1) * u_size);
  float* pp = partial.data();
  parallel_for(pool, s, batch * parts, [=](int64_t unit, Scratch& scratch) {
    const int64_t item = unit / parts, part = unit % parts;
    float* sum = part == 0 ? dup + item * u_size : pp + (item * (parts - 1) + part - 1) * u_size;
    std::fill(sum, sum + u_size, 0.f);
    for (int64_t block = blocks_per_item * part / parts;
         block < blocks_per_item * (part + 1) / parts; ++block) {
      const int64_t t0 = block * kBlock;
      kernel_grad_block(s, xp + item * x_size, yp + item * y_size, sum, t0,
                        std::min(t0 + kBlock, s.tiles), scratch.v.data(), scratch.m.data(),
                        scratch.zeros.data());
    }
  });
  for (int64_t item = 0; item < batch; ++item)
    for (int64_t part = 1; part < parts; ++part) {
      const float* add = pp + (item * (parts - 1) + part - 1) * u_size;
      float* sum = dup + item * u_size;
      for (int64_t i = 0; i < u_size; ++i) sum[i] += add[i];
    }
  return ffi::Error::Success();
}

// Both kernels' signature: XLA's thread pool, two float32 operands, one float32 result.
auto two_operands_one_result() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustWinogradConv, WinogradConv, two_operands_one_result());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustWinogradKernelGrad, WinogradKernelGrad,
                              two_operands_one_result());
