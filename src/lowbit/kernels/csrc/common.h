// Pieces lowbit's CPU kernels share: SIMD detection, a horizontal sum, and the large-batch path
// (tiles of rows decoded to float32 and multiplied by ATen).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1
#if defined(__AVX512F__)
#define LOWBIT_AVX512 1
#endif
#endif

namespace lowbit {

#ifdef LOWBIT_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// y = x W^T (float32 [m, rows]) for a weight of `rows` x `cols` whose row r decode_row(r, out) writes
// to out[cols]: tiles of about 1 MB of rows are decoded (in parallel) and multiplied by ATen.
inline torch::Tensor tiled_matmul(const torch::Tensor& x, int64_t rows, int64_t cols,
                                  const std::function<void(int64_t, float*)>& decode_row) {
  const int64_t m = x.size(0);
  const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(rows, (int64_t{1} << 20) / cols / 16 * 16));
  auto yt = torch::empty({rows, m}, torch::kFloat32);
  auto buf = torch::empty({std::min(tile, rows), cols}, torch::kFloat32);
  float* bp = buf.data_ptr<float>();
  const auto xt = x.t();
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t n = std::min(tile, rows - r0);
    at::parallel_for(0, n, 8, [&](int64_t a, int64_t z) {
      for (int64_t r = a; r < z; ++r) decode_row(r0 + r, bp + r * cols);
    });
    auto out = yt.narrow(0, r0, n);
    at::mm_out(out, buf.narrow(0, 0, n), xt);
  }
  return yt.t().contiguous();
}

// Rows per task of a GEMV over `rows` outputs: a few tasks per thread, at most 64 rows each.
inline int64_t gemv_grain(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(64, rows / (4 * at::get_num_threads()) + 1));
}

// Input rows per GEMV pass: each kernel has a GEMV specialised for 1..kMaxGemvRows of them.
constexpr int kMaxGemvRows = 8;

// y = x W^T (float32 [m, rows]) by GEMV passes: pass(m0, nm, y_m0, a, z) computes input rows
// m0..m0+nm-1 (nm <= kMaxGemvRows) for weight rows a..z-1 into y_m0 = y + m0 * rows; the weight's rows
// are split among the threads.
template <class Pass>
inline torch::Tensor run_gemv(int64_t m, int64_t rows, const Pass& pass) {
  auto y = torch::empty({m, rows}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, gemv_grain(rows), [&](int64_t a, int64_t z) {
    for (int64_t m0 = 0; m0 < m; m0 += kMaxGemvRows)
      pass(m0, static_cast<int>(std::min<int64_t>(kMaxGemvRows, m - m0)), yp + m0 * rows, a, z);
  });
  return y;
}

// table_gemm.cpp
torch::Tensor table_dequantize(torch::Tensor codes, torch::Tensor table, torch::Tensor scale, torch::Tensor base,
                               int64_t rows, int64_t cols, int64_t group, int64_t bits);
torch::Tensor table_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor table, torch::Tensor scale,
                           torch::Tensor base, int64_t rows, int64_t cols, int64_t group, int64_t bits,
                           int64_t gemv_max_m);
// e8p_gemm.cpp
torch::Tensor e8p_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor patterns, torch::Tensor parity);
torch::Tensor e8p_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor patterns,
                         torch::Tensor parity, int64_t gemv_max_m);

// q8dot.cpp
torch::Tensor q8_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor base, int64_t rows, int64_t cols,
                            int64_t group, int64_t bits, int64_t center);
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor base, int64_t rows,
                        int64_t cols, int64_t group, int64_t bits, int64_t center, int64_t gemv_max_m);

// half_gemm.cpp
torch::Tensor half_matmul(torch::Tensor x, torch::Tensor w16, int64_t gemv_max_m);

}  // namespace lowbit
