#!/usr/bin/env bash
# Run the default test suite against the lowest versions pyproject.toml allows.
#
#   scripts/test-lower-bounds.sh [VENV_DIR]      (default: .venv-lower-bounds)
#
# torch 2.11 is a multi-GB download (CUDA build with its nvidia-* wheels); the other pins are small.
# Keep LOWER in step with the lower bounds in pyproject.toml.
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
