// Attention over packed sentences of different lengths, for CPU inference.
//
// q, k and v are [tokens, heads * head_dim] as the encoder's projections produce them, with the
// sentences laid end to end; sentence b holds rows cu_seqlens[b] .. cu_seqlens[b + 1]. Each
// (sentence, head) pair is one small dense attention computed in fp32 from registers and L1: no
// padding, no mask, and no transposes around the call (the output has the input's layout, ready
// for the output projection). torch's CPU flash attention spends most of its time on per-block
// overheads when a block holds one 30-token sentence. On 128 sentences of 20-45 tokens with 12
// heads of 32 this kernel took 2.6 ms where SDPA on the padded batch took 4.8 ms (issue 6 notes).
//
// Built at first use by eventcoder/packed_attention.py with -O3 -march=native; the loops below are
// written as fixed-width blocks so the compiler turns them into 512-bit vector code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kKeys = 16;  // keys per block: one 512-bit vector of floats
constexpr int64_t kRows = 4;   // queries per block: four independent accumulator chains
constexpr float kMasked = -1e30f;

inline void load_row(const c10::BFloat16* src, float* dst, int64_t n, float scale) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    dst[i] = value * scale;
  }
}

inline void load_row(const float* src, float* dst, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

inline void store_row(const float* src, c10::BFloat16* dst, int64_t n, float scale) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float value = src[i] * scale;
    uint32_t wide;
    std::memcpy(&wide, &value, sizeof(wide));
    bits[i] = static_cast<uint16_t>((wide + 0x7fffu + ((wide >> 16) & 1u)) >> 16);  // nearest even
  }
}

inline void store_row(const float* src, float* dst, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

// exp(x) for x <= 0 as 2^n * e^f with |f| <= ln2 / 2 and a degree-6 Taylor polynomial
// (relative error below 2e-7); std::exp would not vectorise.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float f = x - n * 0.69314718f;
  const float p =
      1.f + f * (1.f + f * (0.5f + f * (0.16666667f + f * (0.041666668f + f * (0.008333334f + f * 0.0013888889f)))));
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T, int64_t D>
void attend(const T* q, const T* k, const T* v, T* out, const int32_t* cu, int64_t sentences, int64_t heads,
            int64_t row, float scale) {
  int64_t longest = 1;
  for (int64_t b = 0; b < sentences; ++b) longest = std::max<int64_t>(longest, cu[b + 1] - cu[b]);
  // Room for a whole last block of queries and of keys past the longest sentence.
  const int64_t cap = (longest + kRows + kKeys - 1) / kKeys * kKeys;
  at::parallel_for(0, sentences * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(cap * D, 0.f), keys(cap * D), keys_t(D * cap), values(cap * D), scores(kRows * cap);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / heads, h = unit % heads;
      const int64_t start = cu[b], len = cu[b + 1] - cu[b];
      const int64_t width = (len + kKeys - 1) / kKeys * kKeys;
      for (int64_t t = 0; t < len; ++t) {
        load_row(q + (start + t) * row + h * D, queries.data() + t * D, D, scale);
        load_row(k + (start + t) * row + h * D, keys.data() + t * D, D, 1.f);
        load_row(v + (start + t) * row + h * D, values.data() + t * D, D, 1.f);
      }
      for (int64_t d = 0; d < D; ++d) {
        float* column = keys_t.data() + d * cap;
        for (int64_t t = 0; t < len; ++t) column[t] = keys[t * D + d];
        for (int64_t t = len; t < width; ++t) column[t] = 0.f;
      }
      // Query rows past len in the last block hold leftovers; they are computed and never stored.
      for (int64_t i0 = 0; i0 < len; i0 += kRows) {
        for (int64_t jb = 0; jb < width; jb += kKeys) {
          float acc[kRows][kKeys] = {};
          for (int64_t d = 0; d < D; ++d) {
            const float* key_block = keys_t.data() + d * cap + jb;
            for (int64_t r = 0; r < kRows; ++r) {
              const float qv = queries[(i0 + r) * D + d];
#pragma omp simd
              for (int64_t j = 0; j < kKeys; ++j) acc[r][j] += qv * key_block[j];
            }
          }
          for (int64_t r = 0; r < kRows; ++r)
#pragma omp simd
            for (int64_t j = 0; j < kKeys; ++j) scores[r * cap + jb + j] = jb + j < len ? acc[r][j] : kMasked;
        }
        float inverse_total[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          float* s = scores.data() + r * cap;
          float block_max[kKeys];
          for (int64_t j = 0; j < kKeys; ++j) block_max[j] = s[j];
          for (int64_t jb = kKeys; jb < width; jb += kKeys)
#pragma omp simd
            for (int64_t j = 0; j < kKeys; ++j) block_max[j] = std::max(block_max[j], s[jb + j]);
          float top = block_max[0];
          for (int64_t j = 1; j < kKeys; ++j) top = std::max(top, block_max[j]);
          float block_sum[kKeys] = {};
          for (int64_t jb = 0; jb < width; jb += kKeys)
#pragma omp simd
            for (int64_t j = 0; j < kKeys; ++j) {
              const float e = exp_nonpositive(s[jb + j] - top);
              s[jb + j] = e;
              block_sum[j] += e;
            }
          float total = 0.f;
          for (int64_t j = 0; j < kKeys; ++j) total += block_sum[j];
          inverse_total[r] = 1.f / total;
        }
        float acc[kRows][D] = {};
        for (int64_t j = 0; j < len; ++j) {
          const float* value_row = values.data() + j * D;
          for (int64_t r = 0; r < kRows; ++r) {
            const float p = scores[r * cap + j];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[r][d] += p * value_row[d];
          }
        }
        const int64_t rows = std::min(kRows, len - i0);
        for (int64_t r = 0; r < rows; ++r)
          store_row(acc[r], out + (start + i0 + r) * row + h * D, D, inverse_total[r]);
      }
    }
  });
}

template <typename T>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       const at::Tensor& cu, int64_t heads, int64_t head_dim, float scale) {
  const int64_t sentences = cu.numel() - 1, row = q.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* cp = cu.data_ptr<int32_t>();
  switch (head_dim) {
    case 16: return attend<T, 16>(qp, kp, vp, op, cp, sentences, heads, row, scale);
    case 32: return attend<T, 32>(qp, kp, vp, op, cp, sentences, heads, row, scale);
    case 64: return attend<T, 64>(qp, kp, vp, op, cp, sentences, heads, row, scale);
    case 128: return attend<T, 128>(qp, kp, vp, op, cp, sentences, heads, row, scale);
    default: TORCH_CHECK(false, "varlen_attention: head size ", head_dim, " is not 16, 32, 64 or 128");
  }
}

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                            int64_t num_heads, double scale) {
  TORCH_CHECK(q.dim() == 2 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "varlen_attention: q, k, v must be "
              "[tokens, heads * head_dim] of one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "varlen_attention: mixed dtypes");
  TORCH_CHECK(q.size(1) % num_heads == 0, "varlen_attention: width not divisible by num_heads");
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto cu = cu_seqlens.to(at::kInt).contiguous();
  const int64_t covered = cu[-1].item<int64_t>();
  TORCH_CHECK(covered <= q.size(0), "varlen_attention: cu_seqlens past the tokens");
  // Rows outside every sentence (none, as eventcoder packs) are zeros rather than garbage.
  const auto shape = at::IntArrayRef(q.sizes());
  auto out = covered == q.size(0) ? at::empty(shape, q.options()) : at::zeros(shape, q.options());
  const int64_t head_dim = q.size(1) / num_heads;
  if (qc.scalar_type() == at::kBFloat16) {
    dispatch_head_dim<c10::BFloat16>(qc, kc, vc, out, cu, num_heads, head_dim, static_cast<float>(scale));
  } else {
    TORCH_CHECK(qc.scalar_type() == at::kFloat, "varlen_attention: float32 or bfloat16 only");
    dispatch_head_dim<float>(qc, kc, vc, out, cu, num_heads, head_dim, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(eventcoder, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int num_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(eventcoder, CPU, m) { m.impl("varlen_attention", &varlen_attention); }
