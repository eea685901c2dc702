"""Runs a check module of tests/support in a subprocess with 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before that process imports jax:
the pytest process has already imported jax with one device) and returns what it printed as
its ``RESULT <json>`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_on_eight_devices(module: str, timeout: int = 900) -> dict[str, Any]:
    """``python -m module`` (e.g. ``"support.mesh_checks"``) with the repository root and
    tests/ on ``PYTHONPATH``; its last ``RESULT `` line, parsed."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()  # keep the suite's (tests/conftest.py)
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
