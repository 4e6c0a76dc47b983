#!/usr/bin/env bash
# Regenerate requirements/constraints.txt from the current .venv (after adding a dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Pins of every package the CPU dev/CI environment installs (regenerate: scripts/freeze_constraints.sh)."
  echo "# torch is not pinned here: scripts/setup.sh installs TORCH_SPEC (default torch==2.13.0) first."
  .venv/bin/pip freeze --exclude-editable | grep -v -E "^(torch|chatvla-serve)==" | grep -v "^-e "
} > requirements/constraints.txt
echo "wrote requirements/constraints.txt ($(grep -vc '^#' requirements/constraints.txt) pins)"
