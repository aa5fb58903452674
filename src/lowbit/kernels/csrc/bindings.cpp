// The Python module of lowbit's CPU kernels.
#include "common.h"

namespace {

// A product over x [..., cols] of any float dtype: the kernel's float32 [m, cols] in, and its float32
// [m, rows] back in x's shape and dtype.  Done here rather than in Python: a decode step multiplies
// a few hundred small layers, and each tensor call saved in Python is a microsecond per layer.
template <class... A>
auto any_rows(torch::Tensor (*f)(torch::Tensor, A...)) {
  return [f](torch::Tensor x, A... a) {
    TORCH_CHECK(x.dim() >= 1 && x.is_floating_point(), "x: a float tensor [..., cols]");
    const auto y = f(x.reshape({-1, x.size(-1)}).to(torch::kFloat32), a...);
    auto sizes = x.sizes().vec();
    sizes.back() = y.size(1);
    return y.view(sizes).to(x.scalar_type());
  };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("dequantize", &lowbit::table_dequantize, "decode a table-coded group-wise weight to float32");
  mod.def("matmul", any_rows(&lowbit::table_matmul), "x @ W^T for a table-coded group-wise weight");
  mod.def("e8p_dequantize", &lowbit::e8p_dequantize, "decode an E8P (E8 lattice) weight to float32");
  mod.def("e8p_matmul", any_rows(&lowbit::e8p_matmul), "x @ W^T for an E8P (E8 lattice) weight");
  mod.def("q8_dequantize", &lowbit::q8_dequantize, "decode an integer-coded group-wise weight (q8dot layout)");
  mod.def("q8_matmul", any_rows(&lowbit::q8_matmul), "x @ W^T with x rounded to int8 per 32 columns (llama.cpp's way)");
  mod.def("half_matmul", any_rows(&lowbit::half_matmul), "x @ W^T for a weight stored in float16 or bfloat16");
  mod.def("simd", []() {
#if defined(LOWBIT_AVX512)
    return std::string("avx512 (table GEMV), avx2");
#elif defined(LOWBIT_AVX2)
    return std::string("avx2");
#else
    return std::string("scalar");
#endif
  });
}
