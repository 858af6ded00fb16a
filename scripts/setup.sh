#!/usr/bin/env bash
# One-time (and idempotent) set-up, sourced by the README's two commands:
#   a .venv with torch, the nanochat package in editable mode, the dev tools, and the Rust BPE extension.
# A second run with nothing changed takes a couple of seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$PY" -m venv .venv; }
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch: pinned. On a machine without an NVIDIA GPU we want the CPU build (a plain `torch` pulls GBs of CUDA);
# a local CPU wheel (pip's find-links) or PyTorch's CPU index provides it.
TORCH_VERSION=2.13.0
if ! python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  extra=()
  if ! command -v nvidia-smi >/dev/null 2>&1 && curl -sf --max-time 5 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  pip install -q "${extra[@]}" "torch==$TORCH_VERSION"
fi

# the package (editable) + dev tools; skipped when pyproject.toml has not changed since the last install
stamp=.venv/.nanochat-deps
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing nanochat (editable) and dev tools"
  pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

# the Rust BPE trainer (builds offline from Debian's crate sources when crates.io is unreachable)
bash rustbpe/install.sh

# keep notebooks clean and the package exported at commit time: pre-commit with the hooks in .pre-commit-config.yaml
if [ -d .git ]; then
  grep -qs "installed by scripts/setup.sh" .git/hooks/pre-commit && rm -f .git/hooks/pre-commit  # the old hand-written hook
  [ -f .git/hooks/pre-commit ] || pre-commit install >/dev/null
fi
echo "[setup] ready: $(python -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")')"
