// lowbit's fast CPU kernel for integer-coded group-wise weights: the input rounded to int8 per block of
// 32 columns, as llama.cpp's CPU dot products round it, and integer dot products.
//
// Weight: W[r, c] = s[r, g] * u[r, c] + b[r, g] (g = c / group, group a multiple of 32 dividing cols)
// with integer codes u: 4-bit (0..15), packed 32 columns to 16 bytes (byte j holds column j in its low
// nibble and column j + 16 in its high one), or 8-bit, stored as int8 (u - 128; the 128 is added back
// on the rounded input's sums, so that the result is the same as for unsigned codes).
//
// Input: per row m and block k of 32 columns, d[m, k] = max |x| / 127 and q[m, c] = round(x / d), the
// rounded input x^ = d q.  The codes are centred on o (half their count; W = s (u - o) + (b + o s)), so
// that the rounding's error is that of the centred weight, as llama.cpp's symmetric dot products have it:
//
//     y[m, r] = sum_g ( s[r, g] * sum_{c in g} (u[r, c] - o) x^[m, c]  +  (b[r, g] + o s[r, g]) * sum_{c in g} x[m, c] )
//
// with the bases' term on the exact sums of x.  The kernel computes sum_c u x^ (the stored codes, u or
// u - 128) and corrects with the sums of x^ per group.  The inner sums are exact integers (vpmaddubsw, then
// vpmaddwd); the rounding of x is the only approximation.  Batches above the GEMV's rows decode tiles
// of the exact weight to float32 for ATen's matrix multiply (no rounding there).

#include "common.h"

#include <cmath>
#include <vector>

namespace lowbit {
namespace {

struct QWeight {
  const uint8_t* codes;  // [rows, cols / 2] (4-bit) or [rows, cols] (8-bit, int8 bytes)
  const float* scale;    // [rows, ngroups]
  const float* base;     // [rows, ngroups]
  int64_t rows, cols, group, bits;
  float center;  // o
  float stored;  // what the stored codes have subtracted: 0 (4-bit) or 128 (8-bit)
  int64_t row_bytes() const { return bits == 4 ? cols / 2 : cols; }
  int64_t ngroups() const { return cols / group; }
};

void decode_row(const QWeight& w, int64_t r, float* out) {
  const uint8_t* u = w.codes + r * w.row_bytes();
  const float* s = w.scale + r * w.ngroups();
  const float* b = w.base + r * w.ngroups();
  for (int64_t k = 0; k < w.cols / 32; ++k) {
    const int64_t g = k * 32 / w.group;
    const float sg = s[g], bg = b[g];
    float* o = out + k * 32;
    if (w.bits == 4) {
      const uint8_t* p = u + k * 16;
      for (int j = 0; j < 16; ++j) {
        o[j] = sg * static_cast<float>(p[j] & 15) + bg;
        o[j + 16] = sg * static_cast<float>(p[j] >> 4) + bg;
      }
    } else {
      const int8_t* p = reinterpret_cast<const int8_t*>(u) + k * 32;
      for (int j = 0; j < 32; ++j) o[j] = sg * static_cast<float>(p[j] + 128) + bg;
    }
  }
}

// x [m, cols] -> q (int8 [m, cols]), d (float [m, cols / 32]), and per group the sums of x and of the
// rounded x (float [m, ngroups] each).
void quantize_input(const float* x, int64_t m, int64_t cols, int64_t group, int8_t* q, float* d, float* xsum,
                    float* xhsum) {
  const int64_t nb = cols / 32, ng = cols / group;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = 0; k < nb; ++k) {
      const float* xb = x + i * cols + k * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float dk = amax / 127.f, id = dk > 0.f ? 1.f / dk : 0.f;
      d[i * nb + k] = dk;
      int8_t* qb = q + i * cols + k * 32;
      int32_t qs = 0;
      for (int j = 0; j < 32; ++j) {
        qb[j] = static_cast<int8_t>(std::nearbyint(xb[j] * id));
        qs += qb[j];
      }
      if (k % (group / 32) == 0) xhsum[i * ng + k * 32 / group] = 0.f;
      xhsum[i * ng + k * 32 / group] += dk * static_cast<float>(qs);
    }
    for (int64_t g = 0; g < ng; ++g) {
      float acc = 0.f;
      for (int64_t c = g * group; c < (g + 1) * group; ++c) acc += x[i * cols + c];
      xsum[i * ng + g] = acc;
    }
  }
}

#ifdef LOWBIT_AVX2
template <int NM>
void gemv_rows(const QWeight& w, const int8_t* q, const float* d, const float* xsum, const float* xhsum, float* y,
               int64_t ldy, int64_t r0, int64_t r1) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = w.cols / 32, bpg = w.group / 32, ng = w.ngroups();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* u = w.codes + r * w.row_bytes();
    const float* s = w.scale + r * ng;
    const float* b = w.base + r * ng;
    __m256 tot[NM];
    float bsum[NM];
    for (int m = 0; m < NM; ++m) {
      tot[m] = _mm256_setzero_ps();
      bsum[m] = 0.f;
    }
    for (int64_t g = 0; g < ng; ++g) {
      __m256 acc[NM];
      for (int m = 0; m < NM; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t k = g * bpg; k < (g + 1) * bpg; ++k) {
        const int64_t at = k * 32 * w.bits / 8;  // byte of the row's codes
        if ((at & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(u) + at + 2048, _MM_HINT_T0);  // ahead
        if (w.bits == 4) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + k * 16));
          const __m256i qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
          for (int m = 0; m < NM; ++m) {
            const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * w.cols + k * 32));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[m * nb + k]), acc[m]);
          }
        } else {
          const __m256i qw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + k * 32));
          const __m256i aw = _mm256_abs_epi8(qw);
          for (int m = 0; m < NM; ++m) {
            const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * w.cols + k * 32));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw)), ones);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[m * nb + k]), acc[m]);
          }
        }
      }
      const __m256 sg = _mm256_set1_ps(s[g]);
      for (int m = 0; m < NM; ++m) {
        tot[m] = _mm256_fmadd_ps(sg, acc[m], tot[m]);
        bsum[m] += (b[g] + w.center * s[g]) * xsum[m * ng + g] + (w.stored - w.center) * s[g] * xhsum[m * ng + g];
      }
    }
    for (int m = 0; m < NM; ++m) y[m * ldy + r] = hsum(tot[m]) + bsum[m];
  }
}
#else
template <int NM>
void gemv_rows(const QWeight& w, const int8_t* q, const float* d, const float* xsum, const float* xhsum, float* y,
               int64_t ldy, int64_t r0, int64_t r1) {
  const int64_t nb = w.cols / 32, bpg = w.group / 32, ng = w.ngroups();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* u = w.codes + r * w.row_bytes();
    for (int m = 0; m < NM; ++m) {
      float tot = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float acc = 0.f;
        for (int64_t k = g * bpg; k < (g + 1) * bpg; ++k) {
          int32_t dot = 0;
          const int8_t* qx = q + m * w.cols + k * 32;
          for (int j = 0; j < 32; ++j) {
            const int32_t c = w.bits == 4 ? (j < 16 ? u[k * 16 + j] & 15 : u[k * 16 + j - 16] >> 4)
                                          : static_cast<int8_t>(u[k * 32 + j]);
            dot += c * qx[j];
          }
          acc += static_cast<float>(dot) * d[m * nb + k];
        }
        const float sg = w.scale[r * ng + g];
        tot += sg * acc + (w.base[r * ng + g] + w.center * sg) * xsum[m * ng + g] +
               (w.stored - w.center) * sg * xhsum[m * ng + g];
      }
      y[m * ldy + r] = tot;
    }
  }
}
#endif

using GemvFn = void (*)(const QWeight&, const int8_t*, const float*, const float*, const float*, float*, int64_t,
                        int64_t, int64_t);
const GemvFn kGemv[kMaxGemvRows + 1] = {nullptr, gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                        gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};

QWeight make_qweight(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& base, int64_t rows,
                     int64_t cols, int64_t group, int64_t bits, int64_t center) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group % 32 == 0 && cols % group == 0, "group must be a multiple of 32 dividing cols");
  TORCH_CHECK((codes.dtype() == torch::kUInt8 || codes.dtype() == torch::kInt8) && codes.is_contiguous(),
              "codes: contiguous uint8 or int8");
  TORCH_CHECK(codes.numel() == rows * (bits == 4 ? cols / 2 : cols), "codes: wrong size");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == rows * (cols / group),
              "scale: contiguous float32 [rows, cols / group]");
  TORCH_CHECK(base.dtype() == torch::kFloat32 && base.is_contiguous() && base.numel() == rows * (cols / group),
              "base: contiguous float32 [rows, cols / group]");
  return QWeight{static_cast<const uint8_t*>(codes.data_ptr()), scale.data_ptr<float>(), base.data_ptr<float>(),
                 rows, cols, group, bits, static_cast<float>(center), bits == 8 ? 128.f : 0.f};
}

}  // namespace

torch::Tensor q8_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor base, int64_t rows, int64_t cols,
                            int64_t group, int64_t bits, int64_t center) {
  const QWeight w = make_qweight(codes, scale, base, rows, cols, group, bits, center);
  auto out = torch::empty({rows, cols}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t a, int64_t z) {
    for (int64_t r = a; r < z; ++r) decode_row(w, r, o + r * cols);
  });
  return out;
}

torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor base, int64_t rows,
                        int64_t cols, int64_t group, int64_t bits, int64_t center, int64_t gemv_max_m) {
  const QWeight w = make_qweight(codes, scale, base, rows, cols, group, bits, center);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == cols, "x: float32 [m, cols]");
  x = x.contiguous();
  const int64_t m = x.size(0);
  if (m == 0 || rows == 0) return torch::zeros({m, rows}, torch::kFloat32);
  if (m > gemv_max_m) return tiled_matmul(x, rows, cols, [&](int64_t r, float* out) { decode_row(w, r, out); });
  const int64_t nb = cols / 32, ng = cols / group;
  std::vector<int8_t> q(m * cols);
  std::vector<float> d(m * nb), xsum(m * ng), xhsum(m * ng);
  quantize_input(x.data_ptr<float>(), m, cols, group, q.data(), d.data(), xsum.data(), xhsum.data());
  return run_gemv(m, rows, [&](int64_t m0, int nm, float* y, int64_t a, int64_t z) {
    kGemv[nm](w, q.data() + m0 * cols, d.data() + m0 * nb, xsum.data() + m0 * ng, xhsum.data() + m0 * ng, y, rows,
              a, z);
  });
}

}  // namespace lowbit
