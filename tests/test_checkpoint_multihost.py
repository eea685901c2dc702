"""`lora.save` / `lora.load` in a real multi-process JAX run: two processes on this machine.

Each process is a `jax.distributed` process with 2 CPU devices (a 4-device global mesh, the way a
two-host slice looks). The adapters' factors are global arrays sharded across both processes,
built from numpy values that each process computes on its own; after `lora.save` every process
must read back exactly those values with `lora.load`. The processes run
tests/support/multihost_worker.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import flax_lora as lora

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_save_and_load(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    port = _free_port()
    procs, logs = [], []
    t0 = time.perf_counter()
    for i in range(2):
        log = open(tmp_path / f"log{i}.txt", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "support.multihost_worker",
                    str(i),
                    str(port),
                    str(root),
                    str(tmp_path / f"out{i}.json"),
                    str(TIMEOUT_S - 30),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - t0))) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    wall = time.perf_counter() - t0
    tails = "\n".join(
        f"--- process {i} ---\n{(tmp_path / f'log{i}.txt').read_text()[-3000:]}" for i in range(2)
    )
    assert codes is not None, f"the processes did not finish within {TIMEOUT_S} s\n{tails}"
    reports = []
    for i in range(2):
        out = tmp_path / f"out{i}.json"
        assert out.exists(), f"process {i} wrote no report (exit {codes[i]})\n{tails}"
        reports.append(json.loads(out.read_text()))
    for i, r in enumerate(reports):
        assert r["error"] is None, f"process {i} failed:\n{r['error']}\n{tails}"
    assert codes == [0, 0], tails
    for r in reports:
        assert r["done"] == ["save+load", "replace", "failed save", "failed move", "bad input"]
    # the checkpoint is in place, with nothing of the staging left beside it
    assert sorted(os.listdir(root)) == ["ck"]
    assert (root / "ck" / "arrays").is_dir() and (root / "ck" / "meta").is_dir()
    # and one process alone (here: this one, whose devices are not those the factors were saved
    # on) reads it too, to its first device
    ref = np.load(tmp_path / "ref2.npz")
    got = lora.load(root / "ck")
    for name in ("Dense_0", "Dense_1"):
        w = got["params"][name]["kernel"]
        for f in ("a", "b"):
            x = getattr(w, f)
            assert x.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            np.testing.assert_array_equal(np.asarray(x), ref[f"{name}/{f}"])
    r = reports[0]
    print(f"2 processes: {wall:.1f} s, a save {r['save_s']:.2f} s, a load {r['load_s']:.2f} s")
