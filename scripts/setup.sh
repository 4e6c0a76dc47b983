#!/usr/bin/env bash
# Create (or update) the project's virtual environment: the CPU build of torch, then the project with
# its server, sim, plot, video, camera and dev extras, pinned by requirements/constraints.txt.
#
#   bash scripts/setup.sh [VENV]          default VENV: .venv
#
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, the CPU wheel this workplace keeps
# on disk; an unpinned torch would pull a multi-GB CUDA build). On a GPU machine install your CUDA torch
# first and set TORCH_SPEC to what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
echo "[setup] installing $TORCH_SPEC"
"$PIP" install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -W ignore -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
echo "[setup] installing chatvla-serve with extras server, sim, plot, video, camera, dev"
"$PIP" install -q -c requirements/constraints.txt -e ".[server,sim,plot,video,camera,dev]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import chatvla.model, chatvla.v1.policy_pb2" || { echo "[setup] install incomplete" >&2; exit 1; }
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
