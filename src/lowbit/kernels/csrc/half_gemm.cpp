// lowbit's CPU kernel for weights stored in 16-bit floats (FP16 or BF16): half the bytes of float32,
// converted exactly to float32 in registers (F16C's vcvtph2ps; a shift for BF16), so the product is the
// float32 product of the exact weight up to float32 rounding (reassociated sums).  It serves the
// tied output heads that stay FP16 under the integer formats: the largest matrix of a small model,
// read at every token.  Small batches run a GEMV over blocks of 4 rows with each row's next bytes
// fetched ahead; larger ones decode tiles of rows to float32 for ATen's matrix multiply.

#include "common.h"

namespace lowbit {
namespace {

struct Half16 {
  const uint16_t* w;  // [rows, cols]
  int64_t rows, cols;
  bool bf16;
};

inline float to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

#ifdef LOWBIT_AVX2
inline __m256 load8(const uint16_t* p, bool bf16) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}
#endif

void decode_row(const Half16& w, int64_t r, float* out) {
  const uint16_t* p = w.w + r * w.cols;
  int64_t c = 0;
#ifdef LOWBIT_AVX2
  for (; c + 8 <= w.cols; c += 8) _mm256_storeu_ps(out + c, load8(p + c, w.bf16));
#endif
  for (; c < w.cols; ++c) out[c] = to_float(p[c], w.bf16);
}

template <int NM, int R>
void gemv_block(const Half16& w, const float* x, float* y, int64_t ldy, int64_t r0) {
  float tail[R][NM] = {};
  int64_t c = 0;
#ifdef LOWBIT_AVX2
  __m256 acc[R][NM];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) acc[i][m] = _mm256_setzero_ps();
  for (; c + 8 <= w.cols; c += 8) {
    if ((c & 31) == 0)  // 64 bytes of each row, 2 KB ahead
      for (int i = 0; i < R; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(w.w + (r0 + i) * w.cols + c) + 2048, _MM_HINT_T0);
    __m256 v[R];
    for (int i = 0; i < R; ++i) v[i] = load8(w.w + (r0 + i) * w.cols + c, w.bf16);
    for (int m = 0; m < NM; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * w.cols + c);
      for (int i = 0; i < R; ++i) acc[i][m] = _mm256_fmadd_ps(v[i], xv, acc[i][m]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) tail[i][m] = hsum(acc[i][m]);
#endif
  for (; c < w.cols; ++c)
    for (int i = 0; i < R; ++i) {
      const float v = to_float(w.w[(r0 + i) * w.cols + c], w.bf16);
      for (int m = 0; m < NM; ++m) tail[i][m] += v * x[m * w.cols + c];
    }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < NM; ++m) y[m * ldy + r0 + i] = tail[i][m];
}

template <int NM>
void gemv_rows(const Half16& w, const float* x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int R = NM <= 2 ? 4 : NM <= 4 ? 2 : 1;
  int64_t r = r0;
  for (; r + R <= r1; r += R) gemv_block<NM, R>(w, x, y, ldy, r);
  for (; r < r1; ++r) gemv_block<NM, 1>(w, x, y, ldy, r);
}

using GemvFn = void (*)(const Half16&, const float*, float*, int64_t, int64_t, int64_t);
const GemvFn kGemv[kMaxGemvRows + 1] = {nullptr, gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                        gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};

Half16 make_half(const torch::Tensor& w) {
  TORCH_CHECK((w.dtype() == torch::kFloat16 || w.dtype() == torch::kBFloat16) && w.dim() == 2 && w.is_contiguous(),
              "w: contiguous float16 or bfloat16 [rows, cols]");
  return Half16{static_cast<const uint16_t*>(w.data_ptr()), w.size(0), w.size(1), w.dtype() == torch::kBFloat16};
}

}  // namespace

torch::Tensor half_matmul(torch::Tensor x, torch::Tensor w16, int64_t gemv_max_m) {
  const Half16 w = make_half(w16);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == w.cols, "x: float32 [m, cols]");
  x = x.contiguous();
  const int64_t m = x.size(0), rows = w.rows, cols = w.cols;
  if (m == 0 || rows == 0) return torch::zeros({m, rows}, torch::kFloat32);
  if (m > gemv_max_m) return tiled_matmul(x, rows, cols, [&](int64_t r, float* out) { decode_row(w, r, out); });
  const float* xp = x.data_ptr<float>();
  return run_gemv(m, rows, [&](int64_t m0, int nm, float* y, int64_t a, int64_t z) {
    kGemv[nm](w, xp + m0 * cols, y, rows, a, z);
  });
}

}  // namespace lowbit
