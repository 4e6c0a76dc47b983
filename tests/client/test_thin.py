"""The robot PC installs no torch: importing the client must not pull it in, even indirectly."""

from __future__ import annotations

import subprocess
import sys

CLIENT_MODULES = (
    "chatvla.client",
    "chatvla.client.policy_client",
    "chatvla.client.executor",
    "chatvla.client.safety",
    "chatvla.client.runtime",
    "chatvla.client.fakes",
    "chatvla.client.robots.base",
)


def test_client_imports_without_torch():
    code = (
        "import sys\n"
        f"for m in {CLIENT_MODULES!r}: __import__(m)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'mujoco') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"client imported {proc.stdout.strip()}: {proc.stderr[-2000:]}"
