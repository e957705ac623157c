#!/usr/bin/env bash
# Run the default test suite against the lowest versions pyproject.toml allows.
#
#   scripts/test-lower-bounds.sh [VENV_DIR]      (default: .venv-lower-bounds)
#
# torch 2.11 is a multi-GB download (CUDA build with its nvidia-* wheels); the other pins are small.
# Keep LOWER in step with the lower bounds in pyproject.toml.
#
# Last run (2026-11-30): Python 3.11.7, x86_64, CPU only (2 cores); torch 2.11.0+cu130, transformers 5.17.0,
# peft 0.21.0, bitsandbytes 0.50.0, accelerate 1.15.0, datasets 4.0.0 (huggingface_hub 1.33.0):
# 509 passed, 3 skipped (2 need a non-root user, 1 needs trl), 45 deselected (gpu/slow);
# 4.5 minutes with the pins already installed (installing them took 1.5 minutes more).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-lower-bounds}"
LOWER=(torch==2.11.0 transformers==5.17.0 peft==0.21.0 bitsandbytes==0.50.0 accelerate==1.15.0 datasets==4.0.0)
python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${LOWER[@]}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" "${LOWER[@]}"
"$VENV/bin/python" - <<'PY'
import accelerate, bitsandbytes, datasets, peft, torch, transformers
for module in (torch, transformers, peft, bitsandbytes, accelerate, datasets):
    print(f"{module.__name__} {module.__version__}")
PY
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "${@:2}"
