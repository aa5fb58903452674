// The Python module of lowbit's CPU kernels.
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("dequantize", &lowbit::table_dequantize, "decode a table-coded group-wise weight to float32");
  mod.def("matmul", &lowbit::table_matmul, "x @ W^T for a table-coded group-wise weight");
  mod.def("e8p_dequantize", &lowbit::e8p_dequantize, "decode an E8P (E8 lattice) weight to float32");
  mod.def("e8p_matmul", &lowbit::e8p_matmul, "x @ W^T for an E8P (E8 lattice) weight");
  mod.def("q8_dequantize", &lowbit::q8_dequantize, "decode an integer-coded group-wise weight (q8dot layout)");
  mod.def("q8_matmul", &lowbit::q8_matmul, "x @ W^T with x rounded to int8 per 32 columns (llama.cpp's way)");
  mod.def("half_matmul", &lowbit::half_matmul, "x @ W^T for a weight stored in float16 or bfloat16");
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
