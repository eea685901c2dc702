"""`lora.save` / `lora.load` in a real multi-process JAX run: two processes on this machine.

Each process is a `jax.distributed` process with 2 CPU devices (a 4-device global mesh, the way a
two-host slice looks). The adapters' factors are global arrays sharded across both processes,
built from numpy values that each process computes on its own; after `lora.save` every process
must read back exactly those values with `lora.load`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np

import flax_lora as lora

WORKER = textwrap.dedent(
    '''
    import faulthandler, json, os, sys, time, traceback

    pid, port, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    # a process that hangs (at a barrier) shows where, before the test gives up on it
    faulthandler.dump_traceback_later(float(sys.argv[5]), exit=True)
    report = {"pid": pid, "done": [], "error": None}


    def main():
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
        )
        import asyncio
        import dataclasses

        import flax.linen as nn
        import jax.numpy as jnp
        import numpy as np
        import orbax.checkpoint as ocp
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        import flax_lora as lora

        report["flax_lora"] = lora.__file__
        assert jax.process_count() == 2 and jax.process_index() == pid
        assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
        mesh = Mesh(np.array(jax.devices()), ("data",))  # devices of both processes

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))

        params = Net().init(jax.random.key(0), jnp.ones((1, 4)))
        config = lora.LoraConfig(rank=2, alpha=3.0)
        specs = {  # factor -> how it is laid out on the mesh
            "Dense_0/a": P("data", None), "Dense_0/b": P(None, "data"),
            "Dense_1/a": P("data", None), "Dense_1/b": P(),  # replicated over both
        }
        is_lw = lambda x: isinstance(x, lora.LoraWeights)

        def make(seed):
            """(reference numpy factors, adapters whose factors are global arrays of them)."""
            rng = np.random.default_rng(seed)  # the same numbers on both processes
            ref = {}

            def place(kp, w):
                name = kp[1].key
                fields = {}
                for f in ("a", "b"):
                    shape = getattr(w, f).shape
                    ref[f"{name}/{f}"] = x = rng.standard_normal(shape).astype(np.float32)
                    sharding = NamedSharding(mesh, specs[f"{name}/{f}"])
                    fields[f] = jax.make_array_from_callback(shape, sharding, lambda i: x[i])
                return dataclasses.replace(w, **fields)

            adapters = jax.tree_util.tree_map_with_path(
                place, lora.init(jax.random.key(seed), params, config), is_leaf=is_lw
            )
            return ref, adapters

        def check_loaded(directory, ref, like):
            got = lora.load(directory)
            flat = jax.tree_util.tree_leaves_with_path(got, is_leaf=is_lw)
            want = dict(jax.tree_util.tree_leaves_with_path(like, is_leaf=is_lw))
            assert len(flat) == len(want) == 2
            for kp, w in flat:
                name = kp[1].key
                for f in ("a", "b"):
                    x = getattr(w, f)
                    assert isinstance(x, jax.Array) and x.is_fully_addressable, (name, f)
                    assert x.dtype == np.float32, (name, f, x.dtype)
                    np.testing.assert_array_equal(np.asarray(x), ref[f"{name}/{f}"])
                for f in ("scale", "in_axes", "kernel_shape", "kind"):
                    assert getattr(w, f) == getattr(want[kp], f), (name, f)
                assert w.scale == 1.5
            assert lora.load_config(directory) == config
            return got

        def listing():
            return sorted(os.listdir(root))

        ck = os.path.join(root, "ck")
        ref1, ad1 = make(1)
        assert not ad1["params"]["Dense_0"]["kernel"].a.is_fully_addressable  # spans processes
        t = time.perf_counter()
        assert str(lora.save(ck, ad1, config)) == ck
        report["save_s"] = time.perf_counter() - t
        assert listing() == ["ck"], listing()  # no process returns before the move is done
        t = time.perf_counter()
        got = check_loaded(ck, ref1, ad1)
        report["load_s"] = time.perf_counter() - t
        # what a training run does next: put the loaded factors back on the global mesh
        a = got["params"]["Dense_0"]["kernel"].a
        a = jax.device_put(a, NamedSharding(mesh, specs["Dense_0/a"]))
        assert not a.is_fully_addressable
        for shard in a.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), ref1["Dense_0/a"][shard.index])
        report["done"].append("save+load")

        ref2, ad2 = make(2)
        if pid == 0:  # for the single-process load in the test itself
            np.savez(os.path.join(os.path.dirname(out), "ref2.npz"), **ref2)
        lora.save(ck, ad2, config)  # replaces the first
        assert listing() == ["ck"], listing()
        check_loaded(ck, ref2, ad2)
        report["done"].append("replace")

        # a save that fails on every process while writing keeps the earlier checkpoint
        original = ocp.handlers.StandardCheckpointHandler.async_save

        async def failing(*args, **kwargs):
            futures = await original(*args, **kwargs)
            await asyncio.sleep(0.01)
            raise OSError("disk full")

        ocp.handlers.StandardCheckpointHandler.async_save = failing
        try:
            for target in (ck, os.path.join(root, "fresh")):
                try:
                    lora.save(target, make(3)[1], config)
                except OSError as e:
                    assert "disk full" in str(e), e
                else:
                    raise AssertionError("the injected failure did not reach lora.save")
        finally:
            ocp.handlers.StandardCheckpointHandler.async_save = original
        multihost_utils.sync_global_devices("after the failed saves")  # primary has cleaned up
        assert listing() == ["ck"], listing()
        check_loaded(ck, ref2, ad2)
        report["done"].append("failed save")

        # a failure on the primary process alone, as it moves the checkpoint into place, reaches
        # every process (none returns as if the save had worked) and keeps the earlier checkpoint
        import flax_lora._checkpoint as impl

        replace = impl._replace

        def failing_replace(new, target):
            raise OSError("rename failed")

        impl._replace = failing_replace
        try:
            lora.save(ck, make(4)[1], config)
        except OSError as e:
            want = "rename failed" if pid == 0 else "the primary process failed to move"
            assert want in str(e), e
        else:
            raise AssertionError("process %d: the failed move went unnoticed" % pid)
        finally:
            impl._replace = replace
        assert listing() == ["ck"], listing()  # the primary removed its staging first
        check_loaded(ck, ref2, ad2)
        report["done"].append("failed move")

        # bad input fails on every process before anything is written
        bad = {"params": {"w": ad2["params"]["Dense_0"]["kernel"].a}}
        try:
            lora.save(os.path.join(root, "bad"), bad)
        except TypeError as e:
            assert "params/w" in str(e), e
        else:
            raise AssertionError("lora.save took a non-adapter leaf")
        multihost_utils.sync_global_devices("after the bad input")
        assert listing() == ["ck"], listing()
        report["done"].append("bad input")


    try:
        main()
    except BaseException:
        report["error"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(report, fh)
    sys.stdout.flush()
    os._exit(1 if report["error"] else 0)
    '''
)


TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_save_and_load(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p
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
                    str(script),
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
