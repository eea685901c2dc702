"""One process of the two-process checkpoint test of tests/test_checkpoint_multihost.py.

Run as ``python -m support.multihost_worker PID PORT ROOT OUT TIMEOUT_S`` (the repository root
and tests/ on ``PYTHONPATH``): process ``PID`` of two joins the `jax.distributed` run whose
coordinator listens on ``PORT``, saves and loads adapters under the shared directory ``ROOT``
(failures injected on the way), and writes what it did, or the error it met, as JSON to ``OUT``.
A process still running after ``TIMEOUT_S`` dumps its stack and exits. Everything but the
standard library is imported after `jax.distributed.initialize`.
"""

import faulthandler
import json
import os
import sys
import time
import traceback
from typing import Any


def main(pid: int, port: str, root: str, out: str, report: dict[str, Any]) -> None:
    """The checks of process ``pid``; ``report["done"]`` lists those that passed."""
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
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

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
        "Dense_0/a": P("data", None),
        "Dense_0/b": P(None, "data"),
        "Dense_1/a": P("data", None),
        "Dense_1/b": P(),  # replicated over both
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
                fields[f] = jax.make_array_from_callback(shape, sharding, lambda i, x=x: x[i])
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
        await original(*args, **kwargs)
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
    from .internal import _checkpoint as impl

    replace = impl._replace

    def failing_replace(*args, **kwargs):
        raise OSError("rename failed")

    impl._replace = failing_replace
    try:
        lora.save(ck, make(4)[1], config)
    except OSError as e:
        want = "rename failed" if pid == 0 else "the primary process failed to move"
        assert want in str(e), e
    else:
        raise AssertionError(f"process {pid}: the failed move went unnoticed")
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


def run() -> None:
    pid, port, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    # a process that hangs (at a barrier) shows where, before the test gives up on it
    faulthandler.dump_traceback_later(float(sys.argv[5]), exit=True)
    report: dict[str, Any] = {"pid": pid, "done": [], "error": None}
    try:
        main(pid, port, root, out, report)
    except BaseException:
        report["error"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(report, fh)
    sys.stdout.flush()
    os._exit(1 if report["error"] else 0)


if __name__ == "__main__":
    run()
