// lowbit's CPU kernel for table-coded group-wise weights.
//
// A weight of `rows` x `cols` is stored as codes u (4 or 8 bits each), a table T of float values and
// one scale s and one base b per group of `group` columns of a row:
//
//     W[r, c] = s[r, g] * T[u[r, c]] + b[r, g],    g = c / group.
//
// Integer grids (int2-int8, Q4_0..Q8_0, the K-quants' sub-blocks) are the identity table T[k] = k
// (converted without a lookup); code books (NF4, FP4, IQ4_NL) are T = the book (16 values).  The product y = x W^T is computed in float32 as
//
//     y[m, r] = sum_g ( s[r, g] * sum_{c in g} T[u[r, c]] x[m, c]  +  b[r, g] * sum_{c in g} x[m, c] ),
//
// which is the float32 product of the exact weight up to float32 rounding (reassociation only).
//
// 4-bit codes are packed 16 columns to 8 bytes: byte j of a chunk holds column j in its low nibble
// and column j + 8 in its high nibble.  8-bit codes are one byte per column.  `group` is a multiple
// of 16 and divides `cols`.
//
// Small batches (m <= kMaxGemvRows per pass) decode each run of 16 codes once into registers and
// multiply it with every input row; larger batches decode tiles of rows to float32 and hand them to
// ATen's matrix multiply.

#include "common.h"

#include <cstring>
#include <vector>

namespace lowbit {
namespace {

struct Weight {
  const uint8_t* codes;  // [rows, cols / 2] (4-bit) or [rows, cols] (8-bit)
  const float* table;    // [16] or [256]
  const float* scale;    // [rows, ngroups]
  const float* base;     // [rows, ngroups]
  int64_t rows, cols, group, bits;
  bool identity;  // table[k] == k: codes convert to floats without a lookup
  int64_t row_bytes() const { return bits == 4 ? cols / 2 : cols; }
  int64_t ngroups() const { return cols / group; }
};

// Decode one row of W (scale and base applied) into out[cols].
void decode_row_scalar(const Weight& w, int64_t r, float* out) {
  const uint8_t* u = w.codes + r * w.row_bytes();
  const float* s = w.scale + r * w.ngroups();
  const float* b = w.base + r * w.ngroups();
  for (int64_t g = 0; g < w.ngroups(); ++g) {
    const float sg = s[g], bg = b[g];
    for (int64_t c = g * w.group; c < (g + 1) * w.group; c += 16) {
      float* o = out + c;
      if (w.bits == 4) {
        const uint8_t* p = u + c / 2;
        for (int j = 0; j < 8; ++j) {
          o[j] = sg * w.table[p[j] & 15] + bg;
          o[j + 8] = sg * w.table[p[j] >> 4] + bg;
        }
      } else {
        const uint8_t* p = u + c;
        for (int j = 0; j < 16; ++j) o[j] = sg * w.table[p[j]] + bg;
      }
    }
  }
}

#ifdef LOWBIT_AVX2

// 16-entry table lookup of 8 indices (0..15): two 8-way permutes and a blend on bit 3.
inline __m256 lut16(__m256i idx, __m256 t_lo, __m256 t_hi) {
  const __m256 a = _mm256_permutevar8x32_ps(t_lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t_hi, idx);
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(a, b, sel);
}

// Sixteen codes from column c of a row's codes u, as table values: v0 columns c..c+7, v1 c+8..c+15.
inline void decode16(const Weight& w, const uint8_t* u, int64_t c, __m256i nib, __m256 t_lo, __m256 t_hi,
                     __m256& v0, __m256& v1) {
  if (w.bits == 4) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u + c / 2)));
    const __m256i lo = _mm256_and_si256(q, nib), hi = _mm256_srli_epi32(q, 4);
    if (w.identity) {
      v0 = _mm256_cvtepi32_ps(lo);
      v1 = _mm256_cvtepi32_ps(hi);
    } else {
      v0 = lut16(lo, t_lo, t_hi);
      v1 = lut16(hi, t_lo, t_hi);
    }
  } else {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + c));
    v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
  }
}

// One row of W decoded to float32: as decode_row_scalar, sixteen codes at a time.
void decode_row(const Weight& w, int64_t r, float* out) {
  const uint8_t* u = w.codes + r * w.row_bytes();
  const float* s = w.scale + r * w.ngroups();
  const float* b = w.base + r * w.ngroups();
  const __m256i nib = _mm256_set1_epi32(15);
  __m256 t_lo = _mm256_setzero_ps(), t_hi = _mm256_setzero_ps();
  if (w.bits == 4) {
    t_lo = _mm256_loadu_ps(w.table);
    t_hi = _mm256_loadu_ps(w.table + 8);
  }
  for (int64_t g = 0; g < w.ngroups(); ++g) {
    const __m256 sg = _mm256_set1_ps(s[g]), bg = _mm256_set1_ps(b[g]);
    for (int64_t c = g * w.group; c < (g + 1) * w.group; c += 16) {
      __m256 v0, v1;
      decode16(w, u, c, nib, t_lo, t_hi, v0, v1);
      // s * T + b rounded once per product, as the scalar decoder's float expression is
      _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_mul_ps(sg, v0), bg));
      _mm256_storeu_ps(out + c + 8, _mm256_add_ps(_mm256_mul_ps(sg, v1), bg));
    }
  }
}

// y[m, r] for the R rows r0..r0+R-1 and NM input rows (x, xsum: [NM, cols], [NM, ngroups]).  The R
// rows advance together: R streams of codes in flight (one stream alone leaves the GEMV waiting on
// memory once the weights are not in the cache), each input vector loaded once for R rows.
constexpr int64_t kAhead = 2048;  // bytes

template <int NM, int R>
inline void gemv_block(const Weight& w, const float* x, const float* xsum, float* y, int64_t ldy, int64_t r0,
                       __m256i nib, __m256 t_lo, __m256 t_hi) {
  const int64_t ng = w.ngroups();
  const uint8_t* u[R];
  for (int i = 0; i < R; ++i) u[i] = w.codes + (r0 + i) * w.row_bytes();
  __m256 tot[R][NM];
  float bsum[R][NM];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) {
      tot[i][m] = _mm256_setzero_ps();
      bsum[i][m] = 0.f;
    }
  for (int64_t g = 0; g < ng; ++g) {
    __m256 acc[R][NM];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < NM; ++m) acc[i][m] = _mm256_setzero_ps();
    for (int64_t c = g * w.group; c < (g + 1) * w.group; c += 16) {
      __m256 v0[R], v1[R];
      if (((c * w.bits / 8) & 63) == 0)  // each row's codes some way ahead (the hardware prefetcher alone falls behind)
        for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(u[i]) + c * w.bits / 8 + kAhead, _MM_HINT_T0);
      for (int i = 0; i < R; ++i) decode16(w, u[i], c, nib, t_lo, t_hi, v0[i], v1[i]);
      for (int m = 0; m < NM; ++m) {
        const __m256 x0 = _mm256_loadu_ps(x + m * w.cols + c), x1 = _mm256_loadu_ps(x + m * w.cols + c + 8);
        for (int i = 0; i < R; ++i) {
          acc[i][m] = _mm256_fmadd_ps(v0[i], x0, acc[i][m]);
          acc[i][m] = _mm256_fmadd_ps(v1[i], x1, acc[i][m]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const float sg = w.scale[(r0 + i) * ng + g], bg = w.base[(r0 + i) * ng + g];
      for (int m = 0; m < NM; ++m) {
        tot[i][m] = _mm256_fmadd_ps(_mm256_set1_ps(sg), acc[i][m], tot[i][m]);
        bsum[i][m] += bg * xsum[m * ng + g];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) y[m * ldy + r0 + i] = hsum(tot[i][m]) + bsum[i][m];
}

// y[m, r] for rows r in [r0, r1) and NM input rows: blocks of R rows (as many as the registers hold),
// then the rest one by one.
template <int NM>
void gemv_rows(const Weight& w, const float* x, const float* xsum, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  constexpr int R = NM <= 2 ? 4 : NM <= 4 ? 2 : 1;
  __m256 t_lo = _mm256_setzero_ps(), t_hi = _mm256_setzero_ps();
  if (w.bits == 4) {
    t_lo = _mm256_loadu_ps(w.table);
    t_hi = _mm256_loadu_ps(w.table + 8);
  }
  const __m256i nib = _mm256_set1_epi32(15);
  int64_t r = r0;
  for (; r + R <= r1; r += R) gemv_block<NM, R>(w, x, xsum, y, ldy, r, nib, t_lo, t_hi);
  for (; r < r1; ++r) gemv_block<NM, 1>(w, x, xsum, y, ldy, r, nib, t_lo, t_hi);
}
#endif

#ifdef LOWBIT_AVX512
// The GEMV in 512-bit registers: twice the columns per instruction, and a 4-bit code book is one
// register, so a lookup is one permute (AVX2 needs two and a blend).  4-bit codes take 32 columns
// (two 16-column chunks, 16 bytes) per step and need groups of a multiple of 32 columns; their
// nibbles come out as columns c..c+7, c+16..c+23 (low) and c+8..c+15, c+24..c+31 (high), so the
// input is given in that order (permuted_input below).  8-bit codes take 16 columns per step, in order.
template <int NM, int R, int BITS>
inline void gemv_block512(const Weight& w, const float* x, const float* xsum, float* y, int64_t ldy, int64_t r0,
                          __m512 t) {
  const int64_t ng = w.ngroups();
  constexpr int64_t kStep = BITS == 4 ? 32 : 16;  // columns per step: 16 bytes of codes either way
  const __m512i nib = _mm512_set1_epi32(15);
  const uint8_t* u[R];
  for (int i = 0; i < R; ++i) u[i] = w.codes + (r0 + i) * w.row_bytes();
  __m512 tot[R][NM];
  float bsum[R][NM];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) {
      tot[i][m] = _mm512_setzero_ps();
      bsum[i][m] = 0.f;
    }
  for (int64_t g = 0; g < ng; ++g) {
    __m512 acc[R][NM];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < NM; ++m) acc[i][m] = _mm512_setzero_ps();
    for (int64_t c = g * w.group; c < (g + 1) * w.group; c += kStep) {
      const int64_t byte = c * BITS / 8;
      if ((byte & 63) == 0)
        for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(u[i]) + byte + kAhead, _MM_HINT_T0);
      if constexpr (BITS == 4) {
        __m512 v0[R], v1[R];
        for (int i = 0; i < R; ++i) {
          const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u[i] + byte)));
          const __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_srli_epi32(q, 4);
          if (w.identity) {
            v0[i] = _mm512_cvtepi32_ps(lo);
            v1[i] = _mm512_cvtepi32_ps(hi);
          } else {
            v0[i] = _mm512_permutexvar_ps(lo, t);
            v1[i] = _mm512_permutexvar_ps(hi, t);
          }
        }
        for (int m = 0; m < NM; ++m) {
          const __m512 x0 = _mm512_loadu_ps(x + m * w.cols + c), x1 = _mm512_loadu_ps(x + m * w.cols + c + 16);
          for (int i = 0; i < R; ++i) {
            acc[i][m] = _mm512_fmadd_ps(v0[i], x0, acc[i][m]);
            acc[i][m] = _mm512_fmadd_ps(v1[i], x1, acc[i][m]);
          }
        }
      } else {
        __m512 v[R];
        for (int i = 0; i < R; ++i)
          v[i] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u[i] + byte))));
        for (int m = 0; m < NM; ++m) {
          const __m512 x0 = _mm512_loadu_ps(x + m * w.cols + c);
          for (int i = 0; i < R; ++i) acc[i][m] = _mm512_fmadd_ps(v[i], x0, acc[i][m]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const float sg = w.scale[(r0 + i) * ng + g], bg = w.base[(r0 + i) * ng + g];
      for (int m = 0; m < NM; ++m) {
        tot[i][m] = _mm512_fmadd_ps(_mm512_set1_ps(sg), acc[i][m], tot[i][m]);
        bsum[i][m] += bg * xsum[m * ng + g];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) y[m * ldy + r0 + i] = _mm512_reduce_add_ps(tot[i][m]) + bsum[i][m];
}

template <int NM, int BITS>
void gemv_rows512_bits(const Weight& w, const float* x, const float* xsum, float* y, int64_t ldy, int64_t r0,
                       int64_t r1) {
  constexpr int R = NM <= 2 ? 4 : NM <= 4 ? 2 : 1;
  const __m512 t = BITS == 4 ? _mm512_loadu_ps(w.table) : _mm512_setzero_ps();
  int64_t r = r0;
  for (; r + R <= r1; r += R) gemv_block512<NM, R, BITS>(w, x, xsum, y, ldy, r, t);
  for (; r < r1; ++r) gemv_block512<NM, 1, BITS>(w, x, xsum, y, ldy, r, t);
}

template <int NM>
void gemv_rows512(const Weight& w, const float* x, const float* xsum, float* y, int64_t ldy, int64_t r0,
                  int64_t r1) {
  if (w.bits == 4)
    gemv_rows512_bits<NM, 4>(w, x, xsum, y, ldy, r0, r1);
  else
    gemv_rows512_bits<NM, 8>(w, x, xsum, y, ldy, r0, r1);
}

// Whether a weight takes the 512-bit GEMV.
bool takes_512(const Weight& w) { return w.bits == 8 || w.group % 32 == 0; }

// x [n floats, n a multiple of 32] in the order of the 512-bit GEMV's 4-bit nibbles: in each run of
// 32 columns, the second and third runs of 8 swapped.
void permute_input(const float* x, int64_t n, float* out) {
  for (int64_t c = 0; c < n; c += 32) {
    std::memcpy(out + c, x + c, 8 * sizeof(float));
    std::memcpy(out + c + 8, x + c + 16, 8 * sizeof(float));
    std::memcpy(out + c + 16, x + c + 8, 8 * sizeof(float));
    std::memcpy(out + c + 24, x + c + 24, 8 * sizeof(float));
  }
}
#endif

#ifndef LOWBIT_AVX2
void decode_row(const Weight& w, int64_t r, float* out) { decode_row_scalar(w, r, out); }

template <int NM>
void gemv_rows(const Weight& w, const float* x, const float* xsum, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  std::vector<float> row(w.cols);
  (void)xsum;
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(w, r, row.data());
    for (int m = 0; m < NM; ++m) {
      float acc = 0.f;
      const float* xm = x + m * w.cols;
      for (int64_t c = 0; c < w.cols; ++c) acc += row[c] * xm[c];
      y[m * ldy + r] = acc;
    }
  }
}
#endif

using GemvFn = void (*)(const Weight&, const float*, const float*, float*, int64_t, int64_t, int64_t);
const GemvFn kGemv[kMaxGemvRows + 1] = {nullptr, gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                        gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};
#ifdef LOWBIT_AVX512
const GemvFn kGemv512[kMaxGemvRows + 1] = {nullptr, gemv_rows512<1>, gemv_rows512<2>, gemv_rows512<3>,
                                           gemv_rows512<4>, gemv_rows512<5>, gemv_rows512<6>, gemv_rows512<7>,
                                           gemv_rows512<8>};
#endif

Weight make_weight(const torch::Tensor& codes, const torch::Tensor& table, const torch::Tensor& scale,
                   const torch::Tensor& base, int64_t rows, int64_t cols, int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group % 16 == 0 && cols % group == 0, "group must be a multiple of 16 dividing cols");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes: contiguous uint8");
  TORCH_CHECK(codes.numel() == rows * (bits == 4 ? cols / 2 : cols), "codes: wrong size");
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.is_contiguous() && table.numel() == (bits == 4 ? 16 : 256),
              "table: contiguous float32 [16] (4-bit) or [256] (8-bit)");
  const float* t = table.data_ptr<float>();
  bool identity = true;
  for (int64_t k = 0; k < table.numel(); ++k) identity = identity && t[k] == static_cast<float>(k);
  TORCH_CHECK(bits == 4 || identity, "8-bit codes take the identity table only");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == rows * (cols / group),
              "scale: contiguous float32 [rows, cols / group]");
  TORCH_CHECK(base.dtype() == torch::kFloat32 && base.is_contiguous() && base.numel() == rows * (cols / group),
              "base: contiguous float32 [rows, cols / group]");
  return Weight{codes.data_ptr<uint8_t>(), table.data_ptr<float>(), scale.data_ptr<float>(),
                base.data_ptr<float>(), rows, cols, group, bits, identity};
}

}  // namespace

// The whole weight decoded to float32 [rows, cols].
torch::Tensor table_dequantize(torch::Tensor codes, torch::Tensor table, torch::Tensor scale, torch::Tensor base,
                               int64_t rows, int64_t cols, int64_t group, int64_t bits) {
  const Weight w = make_weight(codes, table, scale, base, rows, cols, group, bits);
  auto out = torch::empty({rows, cols}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t a, int64_t z) {
    for (int64_t r = a; r < z; ++r) decode_row(w, r, o + r * cols);
  });
  return out;
}

// y = x W^T for float32 x [m, cols]; y float32 [m, rows].
torch::Tensor table_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor table, torch::Tensor scale,
                           torch::Tensor base, int64_t rows, int64_t cols, int64_t group, int64_t bits,
                           int64_t gemv_max_m) {
  const Weight w = make_weight(codes, table, scale, base, rows, cols, group, bits);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == cols, "x: float32 [m, cols]");
  x = x.contiguous();
  const int64_t m = x.size(0);
  if (m == 0 || rows == 0) return torch::zeros({m, rows}, torch::kFloat32);
  if (m <= gemv_max_m) {
    const int64_t ng = w.ngroups();
    const float* xp = x.data_ptr<float>();
    std::vector<float> xsum(m * ng);  // per input row and group (plain loops: no ATen call per product)
    for (int64_t i = 0; i < m * ng; ++i) {
      float acc = 0.f;
      for (int64_t c = 0; c < group; ++c) acc += xp[i * group + c];
      xsum[i] = acc;
    }
    const float* xs = xsum.data();
#ifdef LOWBIT_AVX512
    if (takes_512(w)) {
      std::vector<float> xq;
      if (w.bits == 4) {
        xq.resize(m * cols);
        permute_input(xp, m * cols, xq.data());
      }
      const float* xin = w.bits == 4 ? xq.data() : xp;
      return run_gemv(m, rows, [&](int64_t m0, int nm, float* y, int64_t a, int64_t z) {
        kGemv512[nm](w, xin + m0 * cols, xs + m0 * ng, y, rows, a, z);
      });
    }
#endif
    return run_gemv(m, rows, [&](int64_t m0, int nm, float* y, int64_t a, int64_t z) {
      kGemv[nm](w, xp + m0 * cols, xs + m0 * ng, y, rows, a, z);
    });
  }
  // Tiles of rows decoded to float32 and multiplied by ATen.
  return tiled_matmul(x, rows, cols, [&](int64_t r, float* out) { decode_row(w, r, out); });
}

}  // namespace lowbit
