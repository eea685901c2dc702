"""Checkpoints: `lora.save` / `lora.load` / `lora.load_config`, and orbax's CheckpointManager."""

from __future__ import annotations

import asyncio
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from support.models import build, mlp
from support.trees import adapter_entries

import flax_lora as lora


def _adapters(name="nnx_mha", dtype=jnp.float32, key=0, **kw):
    m = build(name)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", dtype=dtype, **kw)
    return lora.init(jax.random.key(key), m.params, config, probe=m.probe), config


def _assert_same(got, want) -> None:
    """Same tree structure (incl. static metadata), dtypes and values, bit for bit."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    g, w = adapter_entries(got), adapter_entries(want)
    assert set(g) == set(w)
    for path in w:
        for f in ("scale", "in_axes", "kernel_shape", "kind", "dropout"):
            assert getattr(g[path], f) == getattr(w[path], f), (path, f)
            assert type(getattr(g[path], f)) is type(getattr(w[path], f)), (path, f)
        for f in ("a", "b"):
            x, y = getattr(g[path], f), getattr(w[path], f)
            assert x.dtype == y.dtype and x.shape == y.shape, (path, f)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["nnx_mha", "linen_conv2d", "linen_embed"])
def test_round_trip_is_exact(tmp_path, dtype, name) -> None:
    adapters, config = _adapters(name, dtype, rank_pattern={"out": 3}, alpha_pattern={"q": 0.7})
    path = lora.save(tmp_path / "ckpt", adapters, config)
    assert path == (tmp_path / "ckpt").absolute() and path.is_dir()
    loaded = lora.load(tmp_path / "ckpt")
    _assert_same(loaded, adapters)
    assert isinstance(jax.tree.leaves(loaded)[0], jax.Array)
    # and it merges to the same kernels
    m = build(name)
    merged = zip(
        jax.tree.leaves(lora.merge(m.params, loaded)),
        jax.tree.leaves(lora.merge(m.params, adapters)),
        strict=True,
    )
    for x, y in merged:
        np.testing.assert_array_equal(x, y)


def test_load_config(tmp_path) -> None:
    config = lora.LoraConfig(
        rank=3,
        alpha=7.5,
        targets=[r".*/query/kernel", r".*/value/kernel"],
        exclude=r".*h0.*",
        rank_pattern={"query": 2},
        alpha_pattern={"value": 1.5},
        init="gaussian",
        dropout=0.1,
        rslora=True,
        dtype=jnp.bfloat16,
        layers=[1, 2],
    )
    adapters, _ = _adapters()
    lora.save(tmp_path / "a", adapters, config)
    got = lora.load_config(tmp_path / "a")
    assert got == config
    assert jnp.dtype(got.dtype) == jnp.bfloat16
    assert got.scale_for("h1/query/kernel") == config.scale_for("h1/query/kernel") == 7.5 / 2**0.5
    lora.save(tmp_path / "b", adapters)
    assert lora.load_config(tmp_path / "b") is None


def test_save_replaces_an_earlier_checkpoint(tmp_path) -> None:
    first, _ = _adapters(key=0)
    second, _ = _adapters(key=1)
    lora.save(tmp_path / "c", first)
    lora.save(tmp_path / "c", second)
    _assert_same(lora.load(tmp_path / "c"), second)
    assert os.listdir(tmp_path) == ["c"]


def test_checkpoint_manager_training_loop(tmp_path) -> None:
    model, variables, x = mlp()
    adapters = lora.init(jax.random.key(0), variables, lora.LoraConfig(rank=2))
    y = jnp.sin(jnp.arange(15.0)).reshape(5, 3)
    fn = lora.wrap(model.apply, mode="merged")
    loss = lambda ad: jnp.mean((fn(variables, ad, x) - y) ** 2)
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(ad, s):
        updates, s = tx.update(jax.grad(loss)(ad), s, ad)
        return optax.apply_updates(ad, updates), s

    saved = {}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        for i in range(1, 7):
            adapters, opt_state = step(adapters, opt_state)
            if mngr.save(i, args=ocp.args.StandardSave(adapters)):
                saved[i] = adapters
        mngr.wait_until_finished()
        assert mngr.latest_step() == 6 and list(mngr.all_steps()) == [4, 6]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, adapters)
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        _assert_same(restored, saved[6])
        # with real adapters as the target, too, and an older step
        restored = mngr.restore(4, args=ocp.args.StandardRestore(adapters))
        _assert_same(restored, saved[4])
    # training resumes from the restored adapters
    resumed, _ = step(restored, tx.init(restored))
    assert float(loss(resumed)) < float(loss(restored))


async def _async_boom(*args, **kwargs):
    await asyncio.sleep(0.01)
    raise OSError("disk full")


def _boom(*args, **kwargs):
    raise OSError("disk full")


def _after_original(original):
    """Starts the original (async) save, lets it write, then fails."""

    async def save(*args, **kwargs):
        await original(*args, **kwargs)
        await asyncio.sleep(0.01)
        raise OSError("disk full")

    return save


# orbax's background threads report the injected failure once more as the event loop closes
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "target, make",
    [
        (ocp.handlers.JsonCheckpointHandler, lambda orig: _async_boom),
        (ocp.handlers.StandardCheckpointHandler, lambda orig: _boom),
        (ocp.handlers.StandardCheckpointHandler, _after_original),
        (ocp.CompositeCheckpointHandler, None),  # finalize: all written, not committed
    ],
)
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, make) -> None:
    old, _ = _adapters(key=0)
    new, _ = _adapters(key=1)
    lora.save(tmp_path / "ckpt", old)
    if make is None:
        monkeypatch.setattr(target, "finalize", _boom)
    else:
        monkeypatch.setattr(target, "async_save", make(target.async_save))
    with pytest.raises(OSError, match="disk full"):
        lora.save(tmp_path / "ckpt", new)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directories behind
    _assert_same(lora.load(tmp_path / "ckpt"), old)
    # a first save that fails leaves nothing at all
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", _async_boom)
    with pytest.raises(OSError):
        lora.save(tmp_path / "fresh", new)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_load_a_directory_that_is_not_a_checkpoint(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for fn in (lora.load, lora.load_config):
        with pytest.raises(ValueError) as e:
            fn(tmp_path / "empty")
        assert str(tmp_path / "empty") in str(e.value) and "lora.save" in str(e.value)
        with pytest.raises(ValueError) as e:
            fn(tmp_path / "missing")
        assert str(tmp_path / "missing") in str(e.value) and "does not exist" in str(e.value)
    # an orbax checkpoint of something else
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            tmp_path / "other",
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave({"w": np.ones(3)}), meta=ocp.args.JsonSave({"x": 1})
            ),
        )
    for fn in (lora.load, lora.load_config):
        with pytest.raises(ValueError) as e:
            fn(tmp_path / "other")
        assert str(tmp_path / "other") in str(e.value) and "flax_lora.adapters" in str(e.value)


def test_save_rejects_non_adapters(tmp_path) -> None:
    with pytest.raises(TypeError, match="params/w"):
        lora.save(tmp_path / "x", {"params": {"w": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match="empty"):
        lora.save(tmp_path / "x", {})
    assert not (tmp_path / "x").exists()
