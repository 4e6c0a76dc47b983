#!/usr/bin/env bash
# An isolated venv with the real openpi-client from PyPI, for tests/server/openpi and benchmarks/transport.py.
#
#   bash scripts/setup_openpi_venv.sh [VENV]          default VENV: .venv-openpi
#
# Why a venv of its own: openpi-client 0.1.2 pins numpy<2 (the project runs numpy 2) and imports
# typing_extensions without declaring it, so both are pinned here. The tests and the benchmark drive
# this interpreter as a subprocess; they skip (tests) or leave the openpi rows out (benchmark) when it
# is absent. Re-running is cheap: an up-to-date venv is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-openpi}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
SPECS=(
  "openpi-client==0.1.2"
  "numpy>=1.22.4,<2"
  "typing_extensions>=4.6"
  "msgpack>=1.0.5"
  "websockets>=11"
  "dm-tree>=0.1.8"
  "pillow>=9"
)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[openpi-venv] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
assert m.version("openpi-client") == "0.1.2"
import numpy, typing_extensions, msgpack, websockets  # noqa: F401
assert numpy.__version__.startswith("1.")
from openpi_client import websocket_client_policy  # noqa: F401
PY
then
  echo "[openpi-venv] $VENV is up to date"
  exit 0
fi
echo "[openpi-venv] installing ${SPECS[*]}"
"$VENV/bin/pip" install -q "${SPECS[@]}" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "from openpi_client import websocket_client_policy, msgpack_numpy; import numpy; print('[openpi-venv] ok: numpy', numpy.__version__)"
