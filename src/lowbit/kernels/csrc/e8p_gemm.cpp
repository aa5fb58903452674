// lowbit's CPU kernel for E8P weights (the E8 lattice code book of QuIP#, lowbit.formats.lattice).
//
// A weight of `rows` x `cols` in `stages` residual stages is stored as one 16-bit code per 8
// columns and stage and one float scale per row and stage:
//
//     W[r, 8j:8j+8] = sum_st scale[st, r] * point(codes[st, r, j]).
//
// A code is a pattern k of absolute values (bits 0-7; patterns[k] holds 8 values 1/2, 3/2, 5/2), the
// signs of coordinates 0-6 (bits 8-14; the sign of coordinate 7 makes the count of negative signs
// even plus parity[k]) and a shift (bit 15: +1/4, else -1/4):
//
//     point(c)[i] = (negative_i ? -patterns[k][i] : patterns[k][i]) + shift.
//
// Decoding needs 24 KB of tables (the full code book would be 2 MB): a point is three loads, an xor
// and an add.  The product y = x W^T is computed in float32 as
// sum_st scale[st, r] * sum_j point . x[8j:8j+8], the float32 product of the exact weight up to
// float32 rounding (reassociated sums).  Small batches decode in registers; larger ones decode tiles
// of rows to float32 for ATen's matrix multiply.

#include "common.h"

#include <cstring>
#include <vector>

namespace lowbit {
namespace {

struct E8P {
  const uint16_t* codes;  // [stages, rows, cols / 8]
  const float* scale;     // [stages, rows]
  const float* pats;      // [256, 8]
  const uint8_t* parity;  // [256]
  int64_t stages, rows, cols;
  int64_t nblk() const { return cols / 8; }
  const uint16_t* row_codes(int64_t st, int64_t r) const { return codes + (st * rows + r) * nblk(); }
};

// The signs of all 8 coordinates of code c (bit i: coordinate i is negative).
inline uint32_t sign_bits(uint32_t c, const uint8_t* parity) {
  const uint32_t s7 = (c >> 8) & 127;
  return s7 | (((static_cast<uint32_t>(__builtin_popcount(s7)) + parity[c & 255]) & 1) << 7);
}

void decode_row_scalar(const E8P& w, int64_t r, float* out) {
  std::fill(out, out + w.cols, 0.f);
  for (int64_t st = 0; st < w.stages; ++st) {
    const uint16_t* u = w.row_codes(st, r);
    const float s = w.scale[st * w.rows + r];
    for (int64_t j = 0; j < w.nblk(); ++j) {
      const uint32_t c = u[j], sb = sign_bits(c, w.parity);
      const float* p = w.pats + (c & 255) * 8;
      const float t = (c >> 15) ? 0.25f : -0.25f;
      for (int i = 0; i < 8; ++i) out[8 * j + i] += s * (((sb >> i) & 1 ? -p[i] : p[i]) + t);
    }
  }
}

#ifdef LOWBIT_AVX2
// Tables that decode a code with loads instead of bit twiddling (24 KB, in L1):
//  - pats: the patterns, with coordinate 7 negated where parity[k] is odd;
//  - per high byte h = c >> 8 (7 signs and the shift): the sign mask of coordinates 0-6 and of
//    coordinate 7 for an even count of the 7 signs (the parity of the pattern is folded into pats),
//    and the shift as a vector.
// So point(c) = (pats'[k] xor mask[h]) + shift[h].
struct Tables {
  alignas(32) float pats[256 * 8];
  alignas(32) uint32_t mask[256 * 8];
  alignas(32) float shift[256 * 8];
};

const Tables& high_tables(Tables& t) {
  for (uint32_t h = 0; h < 256; ++h) {
    const uint32_t s7 = h & 127;
    for (int i = 0; i < 8; ++i) {
      const uint32_t neg = i < 7 ? (s7 >> i) & 1 : static_cast<uint32_t>(__builtin_popcount(s7)) & 1;
      t.mask[h * 8 + i] = neg << 31;
      t.shift[h * 8 + i] = (h >> 7) ? 0.25f : -0.25f;
    }
  }
  return t;
}

struct Decoder {
  Tables t;
  explicit Decoder(const E8P& w) {
    static Tables base;
    static const Tables& hb = high_tables(base);  // built once
    std::memcpy(t.mask, hb.mask, sizeof t.mask);
    std::memcpy(t.shift, hb.shift, sizeof t.shift);
    for (int k = 0; k < 256; ++k)
      for (int i = 0; i < 8; ++i) t.pats[k * 8 + i] = (i == 7 && w.parity[k]) ? -w.pats[k * 8 + i] : w.pats[k * 8 + i];
  }
  __m256 point(uint32_t c) const {
    const uint32_t k = c & 255, h = c >> 8;
    const __m256 p = _mm256_xor_ps(_mm256_load_ps(t.pats + k * 8), _mm256_load_ps(reinterpret_cast<const float*>(t.mask + h * 8)));
    return _mm256_add_ps(p, _mm256_load_ps(t.shift + h * 8));
  }
};

void decode_row(const E8P& w, const Decoder& k, int64_t r, float* out) {
  for (int64_t st = 0; st < w.stages; ++st) {
    const uint16_t* u = w.row_codes(st, r);
    const __m256 s = _mm256_set1_ps(w.scale[st * w.rows + r]);
    for (int64_t j = 0; j < w.nblk(); ++j) {
      const __m256 v = _mm256_mul_ps(s, k.point(u[j]));
      _mm256_storeu_ps(out + 8 * j, st == 0 ? v : _mm256_add_ps(_mm256_loadu_ps(out + 8 * j), v));
    }
  }
}

// y[m, r] for rows r in [r0, r1) and NM input rows x [NM, cols].
template <int NM>
void gemv_rows(const E8P& w, const Decoder& k, const float* x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  // two accumulators per input row while they fit in registers: two chains of FMAs in flight
  constexpr int U = NM == 1 ? 4 : NM <= 3 ? 2 : 1;
  for (int64_t r = r0; r < r1; ++r) {
    float tot[NM] = {};
    for (int64_t st = 0; st < w.stages; ++st) {
      const uint16_t* u = w.row_codes(st, r);
      __m256 acc[U][NM];
      for (int a = 0; a < U; ++a)
        for (int m = 0; m < NM; ++m) acc[a][m] = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + U <= w.nblk(); j += U) {
        if ((j & 31) < U) _mm_prefetch(reinterpret_cast<const char*>(u + j) + 2048, _MM_HINT_T0);  // codes ahead
        for (int a = 0; a < U; ++a) {
          const __m256 v = k.point(u[j + a]);
          for (int m = 0; m < NM; ++m)
            acc[a][m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * w.cols + 8 * (j + a)), acc[a][m]);
        }
      }
      for (; j < w.nblk(); ++j) {
        const __m256 v = k.point(u[j]);
        for (int m = 0; m < NM; ++m) acc[0][m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * w.cols + 8 * j), acc[0][m]);
      }
      const float s = w.scale[st * w.rows + r];
      for (int m = 0; m < NM; ++m) {
        __m256 a = acc[0][m];
        for (int b = 1; b < U; ++b) a = _mm256_add_ps(a, acc[b][m]);
        tot[m] += s * hsum(a);
      }
    }
    for (int m = 0; m < NM; ++m) y[m * ldy + r] = tot[m];
  }
}
#else
struct Decoder {
  explicit Decoder(const E8P&) {}
};

void decode_row(const E8P& w, const Decoder&, int64_t r, float* out) { decode_row_scalar(w, r, out); }

template <int NM>
void gemv_rows(const E8P& w, const Decoder& k, const float* x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  std::vector<float> row(w.cols);
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(w, k, r, row.data());
    for (int m = 0; m < NM; ++m) {
      float acc = 0.f;
      for (int64_t c = 0; c < w.cols; ++c) acc += row[c] * x[m * w.cols + c];
      y[m * ldy + r] = acc;
    }
  }
}
#endif

using GemvFn = void (*)(const E8P&, const Decoder&, const float*, float*, int64_t, int64_t, int64_t);
const GemvFn kGemv[kMaxGemvRows + 1] = {nullptr, gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                        gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};

E8P make_e8p(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& patterns,
             const torch::Tensor& parity) {
  TORCH_CHECK(codes.dtype() == torch::kInt16 && codes.is_contiguous() && codes.dim() == 3,
              "codes: contiguous int16 [stages, rows, cols / 8]");
  const int64_t stages = codes.size(0), rows = codes.size(1), cols = codes.size(2) * 8;
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == stages * rows,
              "scale: contiguous float32 [stages, rows]");
  TORCH_CHECK(patterns.dtype() == torch::kFloat32 && patterns.is_contiguous() && patterns.numel() == 256 * 8,
              "patterns: contiguous float32 [256, 8]");
  TORCH_CHECK(parity.dtype() == torch::kUInt8 && parity.is_contiguous() && parity.numel() == 256,
              "parity: contiguous uint8 [256]");
  return E8P{reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>()), scale.data_ptr<float>(),
             patterns.data_ptr<float>(), parity.data_ptr<uint8_t>(), stages, rows, cols};
}

}  // namespace

// The whole weight decoded to float32 [rows, cols].
torch::Tensor e8p_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor patterns, torch::Tensor parity) {
  const E8P w = make_e8p(codes, scale, patterns, parity);
  const Decoder k(w);
  auto out = torch::empty({w.rows, w.cols}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, w.rows, 16, [&](int64_t a, int64_t z) {
    for (int64_t r = a; r < z; ++r) decode_row(w, k, r, o + r * w.cols);
  });
  return out;
}

// y = x W^T for float32 x [m, cols]; y float32 [m, rows].
torch::Tensor e8p_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor patterns,
                         torch::Tensor parity, int64_t gemv_max_m) {
  const E8P w = make_e8p(codes, scale, patterns, parity);
  const Decoder k(w);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == w.cols, "x: float32 [m, cols]");
  x = x.contiguous();
  const int64_t m = x.size(0), rows = w.rows, cols = w.cols;
  if (m == 0 || rows == 0) return torch::zeros({m, rows}, torch::kFloat32);
  if (m <= gemv_max_m) {
    const float* xp = x.data_ptr<float>();
    return run_gemv(m, rows, [&](int64_t m0, int nm, float* y, int64_t a, int64_t z) {
      kGemv[nm](w, k, xp + m0 * cols, y, rows, a, z);
    });
  }
  return tiled_matmul(x, rows, cols, [&](int64_t r, float* out) { decode_row(w, k, r, out); });
}

}  // namespace lowbit
