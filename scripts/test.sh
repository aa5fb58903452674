#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, then the linter and the import contract.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest -q "$@"
.venv/bin/ruff check src tests bench
.venv/bin/python scripts/check_imports.py
