// Direct convolution of few channels as one CPU kernel, for the "direct_cpu" path of
// sparse_robust.models.Conv (see direct_cpu.py, which builds and loads this file).
//
// SparseRobustDirectConv: y[..., n, a, b, co] = sum_{i, j, ci} xp[..., n, a + i, b + j, ci] *
// k[..., i, j, ci, co], stride 1, where xp is x [..., n, h, w, ci] zero-padded by the attributes
// top, bottom, left and right; k is HWIO. Leading dimensions are a batch (vmap) and must agree.
//
// With a handful of channels (LeNet-5's 1 -> 6 -> 16, and their transposes 16 -> 6 -> 1) a
// convolution is too narrow for a matrix product: the "patches" path multiplies a banded matrix
// whose zeros are 2.8-6.4x the work. Here the 16 vector lanes hold 16 images instead: a block of
// 16 images is transposed to [row][column][channel][image], so every multiply-add is one full
// vector whatever the channel counts, and each output row is accumulated in registers over
// P output columns and CO output channels at a time.
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

constexpr int kLanes = 16;  // images per block: one vector

// Output columns per register block for CO output channels: as many as fit 32 vector registers
// with the P + KW - 1 inputs they read.
constexpr int columns_for(int co) {
  return co == 1 ? 8 : co == 2 ? 6 : co == 3 ? 5 : co == 4 ? 4 : co <= 6 ? 3 : 2;
}

struct Geometry {
  int64_t n, h, w, cin, cout, kh, kw, top, left, out_h, out_w;
  int co;                  // output channels per register block
  int64_t out_w_padded;    // out_w rounded up to the register block's columns_for(co)
  int64_t cout_padded;     // cout rounded up to co
  int64_t in_w;            // columns of the transposed input: out_w_padded + kw - 1
};

// One output row of a block of 16 images: out [out_w_padded][cout_padded][16] (at channel block
// c0) from xt, the block's transposed input rows i = 0..kh-1 below it ([in_w][cin][16] each,
// `xt_row` floats apart), and wp, the packed kernel [kh][KW][cin][CO] of the channel block.
// Rows i outside [i0, i1) are padding, all zeros, and skipped.
template <int P, int CO, int KW>
void output_row(const Geometry& g, const float* xt, int64_t xt_row, const float* wp, int64_t i0,
                int64_t i1, float* out) {
  const int64_t cin = g.cin, out_pixel = g.cout_padded * kLanes;
  for (int64_t b0 = 0; b0 < g.out_w_padded; b0 += P) {
    v16 acc[P][CO];
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < CO; ++c) acc[p][c] = (v16){};
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t ci = 0; ci < cin; ++ci) {
        const float* xr = xt + i * xt_row + (b0 * cin + ci) * kLanes;
        v16 in[P + KW - 1];
#pragma GCC unroll 16
        for (int q = 0; q < P + KW - 1; ++q) in[q] = load16(xr + q * cin * kLanes);
        const float* wr = wp + (i * KW * cin + ci) * CO;
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j)
#pragma GCC unroll 8
          for (int c = 0; c < CO; ++c) {
            const v16 weight = (v16){} + wr[j * cin * CO + c];
#pragma GCC unroll 8
            for (int p = 0; p < P; ++p) acc[p][c] += weight * in[p + j];
          }
      }
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < CO; ++c) store16(out + (b0 + p) * out_pixel + c * kLanes, acc[p][c]);
  }
}

using RowFn = void (*)(const Geometry&, const float*, int64_t, const float*, int64_t, int64_t,
                      float*);

template <int CO>
RowFn row_for_width(int64_t kw) {
  constexpr int P = columns_for(CO);
  switch (kw) {
    case 1: return output_row<P, CO, 1>;
    case 3: return output_row<P, CO, 3>;
    case 5: return output_row<P, CO, 5>;
    case 7: return output_row<P, CO, 7>;
    default: return nullptr;
  }
}

RowFn row_for(int co, int64_t kw) {
  switch (co) {
    case 1: return row_for_width<1>(kw);
    case 2: return row_for_width<2>(kw);
    case 3: return row_for_width<3>(kw);
    case 4: return row_for_width<4>(kw);
    case 5: return row_for_width<5>(kw);
    case 6: return row_for_width<6>(kw);
    case 7: return row_for_width<7>(kw);
    case 8: return row_for_width<8>(kw);
    default: return nullptr;
  }
}

typedef int32_t i16 __attribute__((vector_size(64)));

// The first `count` floats at p, zeros after them.
inline v16 load_part(const float* p, int64_t count) {
  if (count == 16) return load16(p);
  v16 v = (v16){};
  std::memcpy(&v, p, count * sizeof(float));
  return v;
}

// Stores the first `count` floats of v at p.
inline void store_part(float* p, v16 v, int64_t count) {
  if (count == 16) store16(p, v);
  else std::memcpy(p, &v, count * sizeof(float));
}

// Transposes the 16x16 matrix whose rows are v[0..15]: four rounds, each swapping the
// off-diagonal b x b blocks of every 2b x 2b block (b = 8, 4, 2, 1) with two-vector shuffles.
template <int B>
inline void swap_blocks(v16 (&v)[16]) {
  i16 low, high;  // lanes of the new rows r and r + B, indices 16.. taken from row r + B
  for (int lane = 0; lane < 16; ++lane) {
    low[lane] = lane & B ? 16 + lane - B : lane;
    high[lane] = lane & B ? 16 + lane : lane + B;
  }
  for (int r = 0; r < 16; ++r)
    if (!(r & B)) {
      const v16 a = v[r], b = v[r + B];
      v[r] = __builtin_shuffle(a, b, low);
      v[r + B] = __builtin_shuffle(a, b, high);
    }
}

inline void transpose16(v16 (&v)[16]) {
  swap_blocks<8>(v);
  swap_blocks<4>(v);
  swap_blocks<2>(v);
  swap_blocks<1>(v);
}

// Per-thread scratch: the transposed input rows of one work unit and one output row.
struct Scratch {
  std::vector<float> in, out;
  Scratch(const Geometry& g, int64_t max_rows)
      : in((max_rows + g.kh - 1) * g.in_w * g.cin * kLanes),
        out(g.out_w_padded * g.cout_padded * kLanes) {}
};

// Output rows [r0, r1) of images [n0, n0 + 16) of one batch item: x [n, h, w, cin] -> y [n,
// out_h, out_w, cout], packed kernel wp [cout_padded / co][kh][kw][cin][co].
void conv_unit(const Geometry& g, RowFn row, const float* x, const float* wp, float* y,
               int64_t n0, int64_t r0, int64_t r1, Scratch& scratch) {
  const int64_t cin = g.cin, lanes = std::min<int64_t>(kLanes, g.n - n0);
  const int64_t xt_row = g.in_w * cin * kLanes;
  float* xt = scratch.in.data();
  // Padded input rows r0 .. r1 + kh - 2, transposed to [row][column][channel][image] 16
  // floats of each image's row at a time; missing images and padding are zeros.
  const int64_t row_floats = g.w * cin;
  for (int64_t r = r0; r < r1 + g.kh - 1; ++r) {
    float* dst = xt + (r - r0) * xt_row;
    const int64_t src_r = r - g.top;
    if (src_r < 0 || src_r >= g.h) {
      std::memset(dst, 0, xt_row * sizeof(float));
      continue;
    }
    std::memset(dst, 0, g.left * cin * kLanes * sizeof(float));
    float* interior = dst + g.left * cin * kLanes;
    std::memset(interior + row_floats * kLanes, 0,
                (g.in_w - g.left - g.w) * cin * kLanes * sizeof(float));
    const float* src = x + (n0 * g.h + src_r) * row_floats;
    const int64_t image_floats = g.h * row_floats;
    for (int64_t k0 = 0; k0 < row_floats; k0 += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, row_floats - k0);
      v16 v[kLanes];
      for (int64_t l = 0; l < kLanes; ++l)
        v[l] = l < lanes ? load_part(src + l * image_floats + k0, count) : (v16){};
      transpose16(v);
      for (int64_t m = 0; m < count; ++m) store16(interior + (k0 + m) * kLanes, v[m]);
    }
  }
  const int64_t kernel_block = g.kh * g.kw * cin * g.co;
  const int64_t out_floats = g.out_w * g.cout;  // of one image's output row
  float* out = scratch.out.data();
  for (int64_t r = r0; r < r1; ++r) {
    // The kernel rows that read the image, not its padding.
    const int64_t i0 = std::max<int64_t>(0, g.top - r);
    const int64_t i1 = std::min<int64_t>(g.kh, g.top + g.h - r);
    for (int64_t c0 = 0; c0 < g.cout_padded; c0 += g.co)
      row(g, xt + (r - r0) * xt_row, xt_row, wp + (c0 / g.co) * kernel_block, i0, i1,
          out + c0 * kLanes);
    // Back to [image][row][column][channel] while the row is in cache.
    float* dst = y + (n0 * g.out_h + r) * out_floats;
    const int64_t image_floats = g.out_h * out_floats;
    if (g.cout_padded == g.cout) {  // out is [column * cout + channel][image]
      for (int64_t k0 = 0; k0 < out_floats; k0 += kLanes) {
        const int64_t count = std::min<int64_t>(kLanes, out_floats - k0);
        v16 v[kLanes];
        for (int64_t m = 0; m < kLanes; ++m)
          v[m] = m < count ? load16(out + (k0 + m) * kLanes) : (v16){};
        transpose16(v);
        for (int64_t l = 0; l < lanes; ++l)
          store_part(dst + l * image_floats + k0, v[l], count);
      }
      continue;
    }
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t b = 0; b < g.out_w; ++b)
        for (int64_t c = 0; c < g.cout; ++c)
          dst[l * image_floats + b * g.cout + c] = out[(b * g.cout_padded + c) * kLanes + l];
  }
}

ffi::Error DirectConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::ResultBuffer<ffi::F32> y, int64_t top, int64_t bottom, int64_t left,
                      int64_t right) {
  const auto xd = x.dimensions(), kd = k.dimensions();
  const size_t rank = xd.size();
  if (rank < 4 || kd.size() != rank)
    return ffi::Error::InvalidArgument("direct_cpu: operands must be x [..., n, h, w, cin] and "
                                       "k [..., kh, kw, cin, cout] with the same leading dims");
  Geometry g;
  g.n = xd[rank - 4]; g.h = xd[rank - 3]; g.w = xd[rank - 2]; g.cin = xd[rank - 1];
  g.kh = kd[rank - 4]; g.kw = kd[rank - 3]; g.cout = kd[rank - 1];
  g.top = top; g.left = left;
  g.out_h = g.h + top + bottom - g.kh + 1;
  g.out_w = g.w + left + right - g.kw + 1;
  g.co = int(std::min<int64_t>(g.cout, 8));
  const int columns = columns_for(g.co);
  g.out_w_padded = (g.out_w + columns - 1) / columns * columns;
  g.cout_padded = (g.cout + g.co - 1) / g.co * g.co;
  g.in_w = g.out_w_padded + g.kw - 1;
  const RowFn row = row_for(g.co, g.kw);
  if (kd[rank - 2] != g.cin || row == nullptr || g.out_h < 1 || g.out_w < 1 || top < 0 ||
      bottom < 0 || left < 0 || right < 0)
    return ffi::Error::InvalidArgument("direct_cpu: the kernel must be [..., kh, kw, cin, cout] "
                                       "with kw in 1, 3, 5, 7 and fit the padded input");
  int64_t batch = 1;
  for (size_t i = 0; i + 4 < rank; ++i) batch *= xd[i];
  const int64_t kernel_size = g.kh * g.kw * g.cin * g.cout;
  const int64_t packed_size = g.kh * g.kw * g.cin * g.cout_padded;
  // The kernel of each item packed as [cout_padded / co][kh][kw][cin][co], zero-padded.
  std::vector<float> packed(batch * packed_size, 0.f);
  const float* kp = k.typed_data();
  for (int64_t item = 0; item < batch; ++item)
    for (int64_t t = 0; t < g.kh * g.kw * g.cin; ++t)
      for (int64_t c = 0; c < g.cout; ++c)
        packed[item * packed_size + ((c / g.co) * g.kh * g.kw * g.cin + t) * g.co + c % g.co] =
            kp[item * kernel_size + t * g.cout + c];
  // Work units: blocks of 16 images, and the output rows cut into parts where there are too
  // few blocks to keep every thread busy.
  const int64_t blocks = (g.n + kLanes - 1) / kLanes;
  if (batch * blocks == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts =
      std::clamp<int64_t>((8 * threads + batch * blocks - 1) / (batch * blocks), 1, g.out_h);
  const int64_t max_rows = (g.out_h + parts - 1) / parts;
  const int64_t x_size = g.n * g.h * g.w * g.cin, y_size = g.n * g.out_h * g.out_w * g.cout;
  const float* xp = x.typed_data();
  const float* wp = packed.data();
  float* yp = y->typed_data();
  const Geometry geometry = g;
  sparse_robust::parallel_for(
      pool, batch * blocks * parts,
      [&geometry, max_rows] { return std::make_unique<Scratch>(geometry, max_rows); },
      [=, &geometry](int64_t unit, Scratch& scratch) {
        const int64_t item = unit / (blocks * parts), block = unit / parts % blocks;
        const int64_t part = unit % parts;
        const int64_t r0 = geometry.out_h * part / parts;
        const int64_t r1 = geometry.out_h * (part + 1) / parts;
        if (r0 < r1)
          conv_unit(geometry, row, xp + item * x_size, wp + item * packed_size,
                    yp + item * y_size, block * kLanes, r0, r1, scratch);
      });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseRobustDirectConv, DirectConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("bottom")
                                  .Attr<int64_t>("left")
                                  .Attr<int64_t>("right"));
