// Attention over packed sentences of different lengths, for CPU inference.
//
// q, k and v are [tokens, heads * head_dim] as the encoder's projections produce them (separate
// tensors, or slices of one fused projection), with the sentences laid end to end; sentence b
// holds rows cu_seqlens[b] .. cu_seqlens[b + 1]. Each (sentence, head) pair is one small dense
// attention computed in fp32 from registers and L1: no padding, no mask, and no transposes around
// the call (the output is [tokens, heads * head_dim], ready for the output projection). torch's CPU flash attention spends most of its time on per-block
// overheads when a block holds one 30-token sentence. On 128 sentences of 20-45 tokens with 12
// heads of 32 in bf16, SDPA on the padded batch takes 4.4-4.7 ms, this kernel 2.7 ms in vector
// code and 1.2 ms on the AMX tile unit (issue 6 notes).
//
// Built at first use by eventcoder/cpu_kernels.py with -O3 -march=native; the loops below are
// written as fixed-width blocks so the compiler turns them into 512-bit vector code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx.h"

namespace {

constexpr int64_t kKeys = 16;  // keys per block: one 512-bit vector of floats
constexpr int64_t kRows = 4;   // queries per block: four independent accumulator chains
constexpr float kMasked = -1e30f;
// How far below a block's largest score a row's scores may all lie for the block to share one
// softmax shift: e^-40 = 4e-18 keeps probabilities and their products with values normal floats.
constexpr float kSpread = 40.f;

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
            int64_t in_row, int64_t out_row, float scale) {
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
        load_row(q + (start + t) * in_row + h * D, queries.data() + t * D, D, scale);
        load_row(k + (start + t) * in_row + h * D, keys.data() + t * D, D, 1.f);
        load_row(v + (start + t) * in_row + h * D, values.data() + t * D, D, 1.f);
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
          store_row(acc[r], out + (start + i0 + r) * out_row + h * D, D, inverse_total[r]);
      }
    }
  });
}


#ifdef EVENTCODER_AMX
// bf16 on CPUs with AMX: both products (q k^T and p v) run on the tile unit, 16 x 16 fp32 results
// from 16 x 32 bf16 operands per instruction; the softmax stays in vector code. p is rounded to
// bf16 before p v, as torch's bf16 flash attention does. The operand layouts the tile unit wants
// are built with gathers (keys) and one permute per 16 values, because scalar copies cost more
// than the products saved. On 68 sentences of 15-45 tokens x 12 heads of 32 (one packed batch):
// 0.68-0.75 ms against 1.29-1.36 ms for the vector code below, two threads (issue 6 notes).

// exp(x) for x <= 0, sixteen at a time: the same 2^n * polynomial(f) as exp_nonpositive.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.69314718f), x);
  __m512 p = _mm512_set1_ps(0.0013888889f);
  for (const float c : {0.008333334f, 0.041666668f, 0.16666667f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

// Tile roles: 0 accumulates, 1-4 hold a block of 16 queries (up to 128 dims), 5 a block of keys
// or values (or the column of ones), 6 a block of probabilities, 7 accumulates row totals.
template <int64_t D>
void attend_amx(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, c10::BFloat16* out,
                const int32_t* cu, int64_t sentences, int64_t heads, int64_t in_row, int64_t out_row, float scale) {
  constexpr int64_t kDims = D < 32 ? 32 : D;  // a tile row holds 32 bf16: head size 16 is zero-padded
  constexpr int64_t kSteps = kDims / 32;      // tiles along the head dimension for q k^T
  constexpr int64_t kOutTiles = D / 16;       // 16-column output tiles of p v
  int64_t longest = 1;
  for (int64_t b = 0; b < sentences; ++b) longest = std::max<int64_t>(longest, cu[b + 1] - cu[b]);
  const int64_t cap = (longest + 31) / 32 * 32;
  // Interleaves 16 bf16 of one value row with 16 of the next: word n = (first[n], second[n]).
  alignas(64) uint16_t pairs[32];
  for (int n = 0; n < 16; ++n) {
    pairs[2 * n] = static_cast<uint16_t>(n);
    pairs[2 * n + 1] = static_cast<uint16_t>(32 + n);
  }
  const __m512i interleave = _mm512_load_si512(pairs);
  at::parallel_for(0, sentences * heads, 1, [&](int64_t begin, int64_t end) {
    eventcoder_amx::configure_tiles();
    const auto* qbits = reinterpret_cast<const uint16_t*>(q);
    const auto* vbits = reinterpret_cast<const uint16_t*>(v);
    auto* obits = reinterpret_cast<uint16_t*>(out);
    // Keys as the tile unit wants the right-hand operand ("VNNI"): per block of 16 keys and 32
    // dims, row i holds dims 2i and 2i + 1 of each key. Values likewise per 32 keys x 16 dims.
    std::vector<uint32_t> keys(kSteps * cap * 16, 0u), values(cap / 2 * D, 0u);
    std::vector<uint16_t> queries(16 * kDims, 0), probs(16 * cap, 0);
    std::vector<float> scores(16 * cap), outputs(16 * D);
    // The right-hand operand for row totals: per pair of keys, (1, 1) in the first column.
    alignas(64) uint32_t ones[256] = {};
    for (int i = 0; i < 16; ++i) ones[i * 16] = 0x3f803f80u;  // two bf16 1.0
    alignas(64) float totals[256];
    const __m512i key_offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                   _mm512_set1_epi32(static_cast<int>(in_row / 2)));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / heads, h = unit % heads;
      const int64_t start = cu[b], len = cu[b + 1] - cu[b];
      const int64_t width = (len + 15) / 16 * 16, span = (len + 31) / 32 * 32;
      const int64_t key_blocks = width / 16;
      // Key transposition by gathers: output row i of a block takes word i of each of 16 keys.
      const auto* key_words = reinterpret_cast<const int*>(k) + (start * in_row + h * D) / 2;
      for (int64_t kb = 0; kb < key_blocks; ++kb) {
        const __mmask16 present = first_lanes(len - kb * 16);
        const int* block_words = key_words + kb * 16 * in_row / 2;
        for (int64_t s = 0; s < kSteps; ++s) {
          auto* dst = keys.data() + (s * key_blocks + kb) * 256;
          for (int64_t i = 0; i < 16; ++i) {
            const __m512i words = s * 16 + i < D / 2 ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present,
                                                                                   key_offsets, block_words + s * 16 + i, 4)
                                                     : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + i * 16, words);
          }
        }
      }
      for (int64_t j = 0; j < span; j += 2) {
        const uint16_t* first = vbits + (start + j) * in_row + h * D;
        for (int64_t t = 0; t < kOutTiles; ++t) {
          const __m512i low = j < len ? _mm512_castsi256_si512(_mm256_loadu_si256(
                                            reinterpret_cast<const __m256i*>(first + t * 16)))
                                      : _mm512_setzero_si512();
          const __m512i high = j + 1 < len ? _mm512_castsi256_si512(_mm256_loadu_si256(
                                                 reinterpret_cast<const __m256i*>(first + in_row + t * 16)))
                                           : _mm512_setzero_si512();
          _mm512_storeu_si512(values.data() + ((j / 32 * kOutTiles + t) * 16 + j % 32 / 2) * 16,
                              _mm512_permutex2var_epi16(low, interleave, high));
        }
      }
      for (int64_t i0 = 0; i0 < len; i0 += 16) {
        const int64_t rows = std::min<int64_t>(16, len - i0);
        for (int64_t r = 0; r < 16; ++r) {
          uint16_t* dst = queries.data() + r * kDims;
          if (r < rows)
            std::memcpy(dst, qbits + (start + i0 + r) * in_row + h * D, D * sizeof(uint16_t));
          else
            std::memset(dst, 0, D * sizeof(uint16_t));
        }
        _tile_loadd(1, queries.data(), kDims * 2);
        if constexpr (kSteps > 1) _tile_loadd(2, queries.data() + 32, kDims * 2);
        if constexpr (kSteps > 2) {
          _tile_loadd(3, queries.data() + 64, kDims * 2);
          _tile_loadd(4, queries.data() + 96, kDims * 2);
        }
        for (int64_t kb = 0; kb < key_blocks; ++kb) {
          _tile_zero(0);
          _tile_loadd(5, keys.data() + (0 * key_blocks + kb) * 256, 64);
          _tile_dpbf16ps(0, 1, 5);
          if constexpr (kSteps > 1) {
            _tile_loadd(5, keys.data() + (1 * key_blocks + kb) * 256, 64);
            _tile_dpbf16ps(0, 2, 5);
          }
          if constexpr (kSteps > 2) {
            _tile_loadd(5, keys.data() + (2 * key_blocks + kb) * 256, 64);
            _tile_dpbf16ps(0, 3, 5);
            _tile_loadd(5, keys.data() + (3 * key_blocks + kb) * 256, 64);
            _tile_dpbf16ps(0, 4, 5);
          }
          _tile_stored(0, scores.data() + kb * 16, cap * 4);
        }
        // Softmax is unchanged by subtracting a constant from a row. One constant for the whole
        // block, its largest score, saves each row the reduction across lanes that its own
        // maximum would cost; it is safe while no row lies wholly more than kSpread below it
        // (exp underflowing), else each row takes its own maximum. With the row totals from the
        // tile unit (below), a packed MiniLM layer went from 1.23-1.37 to 1.12-1.22 ms, one thread.
        // (Ranges are taken on the raw products: scale is positive.)
        __m512 high = _mm512_set1_ps(kMasked), low = _mm512_set1_ps(-kMasked);
        for (int64_t r = 0; r < rows; ++r) {
          const float* s = scores.data() + r * cap;
          for (int64_t jb = 0; jb < width; jb += 16) {
            const __mmask16 present = first_lanes(len - jb);
            const __m512 x = _mm512_loadu_ps(s + jb);
            high = _mm512_mask_max_ps(high, present, high, x);
            low = _mm512_mask_min_ps(low, present, low, x);
          }
        }
        const float block_top = _mm512_reduce_max_ps(high);
        const bool one_shift = (block_top - _mm512_reduce_min_ps(low)) * scale <= kSpread;
        const __m512 scaled = _mm512_set1_ps(scale);
        for (int64_t r = 0; r < rows; ++r) {
          const float* s = scores.data() + r * cap;
          float top = block_top;
          if (!one_shift) {
            __m512 row_high = _mm512_set1_ps(kMasked);
            for (int64_t jb = 0; jb < width; jb += 16)
              row_high = _mm512_mask_max_ps(row_high, first_lanes(len - jb), row_high, _mm512_loadu_ps(s + jb));
            top = _mm512_reduce_max_ps(row_high);
          }
          const __m512 shift = _mm512_set1_ps(top * scale);
          uint16_t* p = probs.data() + r * cap;
          for (int64_t jb = 0; jb < width; jb += 16) {
            const __m512 e = _mm512_maskz_mov_ps(first_lanes(len - jb),
                                                 exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + jb), scaled, shift)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + jb), (__m256i)_mm512_cvtneps_pbh(e));
          }
          if (width < span) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + width), _mm256_setzero_si256());
        }
        // p v, and each row's total of p from the same products against a column of ones: no
        // reduction across lanes per row, and rows are divided by the total of the bf16 p they
        // were weighted with.
        _tile_zero(7);
        for (int64_t t = 0; t < kOutTiles; ++t) {
          _tile_zero(0);
          for (int64_t j = 0; j < span; j += 32) {
            _tile_loadd(6, probs.data() + j, cap * 2);
            if (t == 0) {
              _tile_loadd(5, ones, 64);
              _tile_dpbf16ps(7, 6, 5);
            }
            _tile_loadd(5, values.data() + (j / 32 * kOutTiles + t) * 256, 64);
            _tile_dpbf16ps(0, 6, 5);
          }
          _tile_stored(0, outputs.data() + t * 16, D * 4);
        }
        _tile_stored(7, totals, 64);
        float inverse_total[16];
        for (int64_t r = 0; r < rows; ++r) inverse_total[r] = 1.f / totals[r * 16];
        for (int64_t r = 0; r < rows; ++r) {
          uint16_t* dst = obits + (start + i0 + r) * out_row + h * D;
          const __m512 inverse = _mm512_set1_ps(inverse_total[r]);
          for (int64_t d = 0; d < D; d += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(outputs.data() + r * D + d), inverse)));
        }
      }
    }
    _tile_release();
  });
}
#endif

template <typename T>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       const at::Tensor& cu, int64_t heads, int64_t head_dim, int64_t in_row, float scale,
                       bool use_amx) {
  const int64_t sentences = cu.numel() - 1, out_row = q.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* cp = cu.data_ptr<int32_t>();
#ifdef EVENTCODER_AMX
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (use_amx && eventcoder_amx::permitted()) {
      switch (head_dim) {
        case 16: return attend_amx<16>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
        case 32: return attend_amx<32>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
        case 64: return attend_amx<64>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
        case 128: return attend_amx<128>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
        default: break;
      }
    }
  }
#endif
  switch (head_dim) {
    case 16: return attend<T, 16>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
    case 32: return attend<T, 32>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
    case 64: return attend<T, 64>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
    case 128: return attend<T, 128>(qp, kp, vp, op, cp, sentences, heads, in_row, out_row, scale);
    default: TORCH_CHECK(false, "varlen_attention: head size ", head_dim, " is not 16, 32, 64 or 128");
  }
}

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                            int64_t num_heads, double scale, bool use_amx) {
  TORCH_CHECK(q.dim() == 2 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "varlen_attention: q, k, v must be "
              "[tokens, heads * head_dim] of one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "varlen_attention: mixed dtypes");
  TORCH_CHECK(q.size(1) % num_heads == 0, "varlen_attention: width not divisible by num_heads");
  // q, k and v may be column slices of one [tokens, 3 * width] projection, as the encoder makes
  // them (one GEMM instead of three): read in place when their rows share a stride. The AMX path
  // reads keys as 32-bit words, hence an even stride.
  const bool shared_rows = q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1 && q.stride(0) == k.stride(0) &&
                           q.stride(0) == v.stride(0) && q.stride(0) >= q.size(1) && q.stride(0) % 2 == 0;
  const auto qc = shared_rows ? q : q.contiguous(), kc = shared_rows ? k : k.contiguous(),
             vc = shared_rows ? v : v.contiguous();
  const int64_t in_row = shared_rows ? q.stride(0) : q.size(1);
  const auto cu = cu_seqlens.to(at::kInt).contiguous();
  const int64_t covered = cu[-1].item<int64_t>();
  TORCH_CHECK(covered <= q.size(0), "varlen_attention: cu_seqlens past the tokens");
  // Rows outside every sentence (none, as eventcoder packs) are zeros rather than garbage.
  const auto shape = at::IntArrayRef(q.sizes());
  auto out = covered == q.size(0) ? at::empty(shape, q.options()) : at::zeros(shape, q.options());
  const int64_t head_dim = q.size(1) / num_heads;
  if (qc.scalar_type() == at::kBFloat16) {
    dispatch_head_dim<c10::BFloat16>(qc, kc, vc, out, cu, num_heads, head_dim, in_row, static_cast<float>(scale),
                                     use_amx);
  } else {
    TORCH_CHECK(qc.scalar_type() == at::kFloat, "varlen_attention: float32 or bfloat16 only");
    dispatch_head_dim<float>(qc, kc, vc, out, cu, num_heads, head_dim, in_row, static_cast<float>(scale), use_amx);
  }
  return out;
}

bool amx_available() { return eventcoder_amx::permitted(); }

}  // namespace

TORCH_LIBRARY(eventcoder, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int num_heads, float scale, bool use_amx=True) -> Tensor");
  m.def("amx_available() -> bool", &amx_available);
}

TORCH_LIBRARY_IMPL(eventcoder, CPU, m) { m.impl("varlen_attention", &varlen_attention); }
