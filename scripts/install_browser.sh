#!/usr/bin/env bash
# A headless Chromium and playwright for the debug-page browser test (tests/server/test_debug_page_browser.py).
#
#   bash scripts/install_browser.sh [VENV]          default VENV: .venv
#
# Chromium comes from Debian (chromium-headless-shell, via apt-get; needs root or sudo), not from
# `playwright install`, which downloads a browser build from a CDN that fresh machines here cannot reach.
# playwright (PyPI) drives it through `executable_path`. Re-running is cheap: what is there stays.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PLAYWRIGHT_SPEC=${PLAYWRIGHT_SPEC:-playwright==1.65.2}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if command -v chromium-headless-shell >/dev/null 2>&1; then
  echo "[browser] $(chromium-headless-shell --version 2>/dev/null || echo chromium-headless-shell) is installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "[browser] need root or sudo for apt-get install chromium-headless-shell" >&2; exit 1; }
    SUDO="sudo -n"
  fi
  echo "[browser] apt-get install chromium-headless-shell"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null
fi

if "$VENV/bin/python" -c "import playwright.sync_api" 2>/dev/null; then
  echo "[browser] playwright is installed in $VENV"
else
  echo "[browser] installing $PLAYWRIGHT_SPEC into $VENV"
  "$VENV/bin/pip" install -q "$PLAYWRIGHT_SPEC"
fi

# The check the test makes: playwright starts this Chromium and renders a page.
"$VENV/bin/python" - <<'PY'
import shutil

from playwright.sync_api import sync_playwright

exe = shutil.which("chromium-headless-shell")
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
    page = browser.new_page()
    page.set_content("<p id=ok>ok</p>")
    assert page.text_content("#ok") == "ok"
    print(f"[browser] playwright drives {exe} (Chromium {browser.version})")
    browser.close()
PY
