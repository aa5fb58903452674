#!/usr/bin/env bash
# Build llama.cpp once, from the sources that llama-cpp-python ${LLAMA_CPP_VERSION} vendors, and install
# into .venv:
#   - llama-cpp-python's Python package, with its own compile step switched off (LLAMA_BUILD=OFF);
#   - libllama / libggml* built here, copied into llama_cpp/lib where the package loads them;
#   - llama.cpp's own tools llama-quantize, llama-imatrix and llama-perplexity, beside them, so tests
#     and benchmarks can compare lowbit with the real thing (same commit, same libraries).
# Portable CPU flags: no -march=native and no AMX (a native build crashes on AMX machines, and CI may
# run on another CPU).  Idempotent: does nothing when the libraries and tools are in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY=.venv/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
CACHE=.lowbit-cache/llama.cpp-$VERSION
TOOLS=(llama-quantize llama-imatrix llama-perplexity)

libdir() { "$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llama_cpp'); print(pathlib.Path(s.origin).parent / 'lib' if s else '')"; }

ready() {
  local d; d="$(libdir)"
  [ -n "$d" ] || return 1
  for t in "${TOOLS[@]}"; do [ -x "$d/$t" ] || return 1; done
  [ -f "$d/.lowbit-build-$VERSION" ] || return 1
  "$PY" -c "import llama_cpp" 2>/dev/null
}

if ready; then exit 0; fi
echo "building llama.cpp (llama-cpp-python $VERSION's sources) and its tools: about 5-8 minutes on 2 cores..." >&2

mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "${PIP[@]}" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/dl"
  mv "$CACHE"/dl/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
  rm -rf "$CACHE/dl"
fi
SRC="$CACHE/src/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
  tar -xzf "$SDIST" -C "$CACHE/src"
fi

case "$(uname -m)" in
  x86_64|amd64) CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
                           -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
  *) CPU_FLAGS=(-DGGML_NATIVE=OFF) ;;
esac
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if ! command -v cmake >/dev/null; then "${PIP[@]}" install -q "cmake>=3.21"; export PATH="$PWD/.venv/bin:$PATH"; fi
BUILD="$CACHE/build"
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  "${CPU_FLAGS[@]}" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >"$CACHE/configure.log" 2>&1 \
  || { tail -30 "$CACHE/configure.log" >&2; exit 1; }
cmake --build "$BUILD" --target llama "${TOOLS[@]}" -j "$(nproc)" >"$CACHE/build.log" 2>&1 \
  || { tail -40 "$CACHE/build.log" >&2; exit 1; }

# the Python package alone: its CMake project builds nothing with LLAMA_BUILD=OFF and LLAVA_BUILD=OFF
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${PIP[@]}" install -q --no-cache-dir --force-reinstall --no-deps "$SDIST"
"${PIP[@]}" install -q "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"  # its dependencies
LIB="$(libdir)"
mkdir -p "$LIB"
cp -a "$BUILD"/bin/lib*.so* "$LIB"/
for t in "${TOOLS[@]}"; do cp -a "$BUILD/bin/$t" "$LIB/"; done
touch "$LIB/.lowbit-build-$VERSION"
ready || { echo "llama.cpp build finished but llama_cpp does not import" >&2; exit 1; }
