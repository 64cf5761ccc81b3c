// gelu(x w^T + b) in bf16 on the AMX tile unit: a BERT layer's feed-forward up-projection and its
// activation in one pass, for CPU inference.
//
// oneDNN fuses the same GELU into its matmul, but evaluates it after the products, with the tile
// unit idle: on 2,048 x 384 -> 1,536 (MiniLM, one thread) the GELU doubles the matmul's time. Here
// each 32 x 32 block of results gets its bias, GELU and bf16 rounding in vector code while the tile
// unit computes the next block, a slice of rows per step of the product; 2.3-2.5 ms against
// 3.2-3.8 ms for oneDNN's fused kernel with six layers' weights in turn (issue 6 notes).
//
// The weight is packed once (pack_linear_weight) into the layout the tile unit reads for its
// right-hand operand. Rows of x are taken 32 at a time; a last partial block is zero-padded.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"

namespace {

constexpr int64_t kBlock = 32;  // rows and columns of one block of results: 2 x 2 tiles of 16 x 16

// w [n, k] bf16 -> [n / 16, k / 32, 16, 16] 32-bit words: per 16 output columns and 32 inputs, row i
// holds inputs 2i and 2i + 1 of each column, the pairs the tile unit multiplies together.
at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_linear_weight: a 2-d bf16 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kBlock == 0 && k % kBlock == 0, "pack_linear_weight: sizes must be multiples of 32, not ", n, " x ",
              k);
  const auto w = weight.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto packed = at::empty({n / 16, k / 32, 16, 16}, at::kInt);
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr());
  for (int64_t column = 0; column < n; ++column)
    for (int64_t input = 0; input < k; input += 2) {
      const uint32_t pair = src[column * k + input] | (static_cast<uint32_t>(src[column * k + input + 1]) << 16);
      dst[((column / 16 * (k / 32) + input / 32) * 16 + input % 32 / 2) * 16 + column % 16] = pair;
    }
  return packed;
}

#ifdef EVENTCODER_AMX
// erf(t) = t p(t^2) on |t| <= 3, a near-minimax fit (error below 2.7e-5) held to 3 p(9) = 1 so that
// far below zero GELU comes out as (almost) nothing rather than a multiple of x: over all x, within
// 6.2e-5 of torch's exact GELU, and within 0.25% where it exceeds 0.01 in size (bf16 keeps 0.4%).
constexpr float kErf[9] = {1.1283998489379883f,     -0.37578749656677246f,  0.11166639626026154f,
                           -0.0254565067589283f,    0.004353312775492668f,  -0.0005339221097528934f,
                           4.363536208984442e-05f,  -2.1004327663831646e-06f, 4.464919456381722e-08f};

inline __m512 gelu(__m512 x) {
  const __m512 limit = _mm512_set1_ps(3.f);
  const __m512 t = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678f)), limit),
                                 _mm512_sub_ps(_mm512_setzero_ps(), limit));
  const __m512 s = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(kErf[8]);
  for (int i = 7; i >= 0; --i) p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(kErf[i]));
  const __m512 half = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half, _mm512_mul_ps(p, t), half);
}

void linear_gelu_amx(const uint16_t* x, const uint32_t* w, const float* bias, uint16_t* out, int64_t rows,
                     int64_t inputs, int64_t outputs) {
  const int64_t steps = inputs / 32, column_blocks = outputs / kBlock, row_blocks = (rows + kBlock - 1) / kBlock;
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    eventcoder_amx::configure_tiles();
    alignas(64) float results[2][kBlock * kBlock];
    std::vector<uint16_t> padded;  // a last block of fewer than 32 rows, zero-padded
    auto finish = [&](int64_t block, const float* c, int64_t r0, int64_t r1) {
      const int64_t row0 = block / column_blocks * kBlock, column0 = block % column_blocks * kBlock;
      const __m512 low = _mm512_loadu_ps(bias + column0), high = _mm512_loadu_ps(bias + column0 + 16);
      for (int64_t r = r0; r < std::min(r1, rows - row0); ++r) {
        const __m512 first = gelu(_mm512_add_ps(_mm512_load_ps(c + r * kBlock), low));
        const __m512 second = gelu(_mm512_add_ps(_mm512_load_ps(c + r * kBlock + 16), high));
        _mm512_storeu_si512(out + (row0 + r) * outputs + column0, (__m512i)_mm512_cvtne2ps_pbh(second, first));
      }
    };
    const int64_t first = begin * column_blocks, last = end * column_blocks;
    for (int64_t block = first; block < last; ++block) {
      const int64_t row0 = block / column_blocks * kBlock, column_block = block % column_blocks;
      const uint16_t* a = x + row0 * inputs;
      if (row0 + kBlock > rows) {
        if (column_block == 0) {
          padded.assign(kBlock * inputs, 0);
          std::memcpy(padded.data(), a, (rows - row0) * inputs * sizeof(uint16_t));
        }
        a = padded.data();
      }
      const uint32_t* left = w + 2 * column_block * steps * 256;
      const uint32_t* right = left + steps * 256;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const bool pending = block > first;
      const float* previous = results[(block - 1) & 1];
      for (int64_t step = 0; step < steps; ++step) {
        _tile_loadd(4, a + step * 32, inputs * 2);
        _tile_loadd(6, left + step * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, right + step * 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a + 16 * inputs + step * 32, inputs * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        // A slice of the previous block's rows while the tile unit works on this one: placed after
        // the loop instead, the vector work waited for the products (2.6-3.0 against 2.3-2.5 ms).
        if (pending) finish(block - 1, previous, step * kBlock / steps, (step + 1) * kBlock / steps);
      }
      float* c = results[block & 1];
      _tile_stored(0, c, kBlock * 4);
      _tile_stored(1, c + 16, kBlock * 4);
      _tile_stored(2, c + 16 * kBlock, kBlock * 4);
      _tile_stored(3, c + 16 * kBlock + 16, kBlock * 4);
    }
    if (last > first) finish(last - 1, results[(last - 1) & 1], 0, kBlock);
    _tile_release();
  });
}
#endif

at::Tensor linear_gelu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& bias) {
  TORCH_CHECK(eventcoder_amx::permitted(), "linear_gelu: runs on the AMX tile unit, which this process cannot use");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_gelu: x must be 2-d bf16");
  TORCH_CHECK(packed_weight.dim() == 4 && packed_weight.scalar_type() == at::kInt,
              "linear_gelu: the weight must come from pack_linear_weight");
  const int64_t inputs = packed_weight.size(1) * 32, outputs = packed_weight.size(0) * 16;
  TORCH_CHECK(x.size(1) == inputs, "linear_gelu: x has ", x.size(1), " columns, the weight ", inputs, " inputs");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == outputs && bias.scalar_type() == at::kFloat,
              "linear_gelu: the bias must be fp32 with one value per output");
  const auto xc = x.contiguous(), wc = packed_weight.contiguous(), bc = bias.contiguous();
  auto out = at::empty({x.size(0), outputs}, x.options());
#ifdef EVENTCODER_AMX
  if (x.size(0) > 0)
    linear_gelu_amx(reinterpret_cast<const uint16_t*>(xc.data_ptr()), reinterpret_cast<const uint32_t*>(wc.data_ptr()),
                    bc.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), x.size(0), inputs, outputs);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eventcoder, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear_gelu(Tensor x, Tensor packed_weight, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(eventcoder, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("linear_gelu", &linear_gelu);
}
