"""Training with optax: `lora.trainable`, `lora.freeze_base`, and the adapters-only pattern."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
from support.models import mlp
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora

STEPS = 4


def _setup(also_bias_neg_zero: bool = True):
    model, variables, x = mlp()
    if also_bias_neg_zero:
        # a -0.0 in a frozen leaf: a "+0.0" update would flip its sign bit
        bias = variables["params"]["fc0"]["bias"].at[0].set(-0.0)
        variables = {"params": {**variables["params"], "fc0": {**variables["params"]["fc0"]}}}
        variables["params"]["fc0"]["bias"] = bias
    config = lora.LoraConfig(rank=2, alpha=4.0, targets=r".*/fc\d/kernel")
    adapters = lora.init(jax.random.key(1), variables, config)
    y = jnp.asarray(np.random.default_rng(3).standard_normal((x.shape[0], 3)), jnp.float32)
    fn = lora.wrap(model.apply, mode="merged")

    def loss(tree):
        return jnp.mean((fn(tree["params"], tree["lora"], x) - y) ** 2)

    return {"params": variables, "lora": adapters}, loss


def _train(tx, tree, loss, steps=STEPS, eager_steps=0):
    state = tx.init(tree)

    def step(tree, state):
        grads = jax.grad(loss)(tree)
        updates, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state

    jitted = jax.jit(step)
    for i in range(steps):
        tree, state = (step if i < eager_steps else jitted)(tree, state)
    return tree, state


def _bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _array_shapes(state):
    return collections.Counter(
        tuple(x.shape) for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0
    )


def _twice(trained):
    """The shapes of adam's mu and nu for the arrays of ``trained``: each shape twice."""
    shapes = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(trained))
    return collections.Counter({s: 2 * n for s, n in shapes.items()})


def test_trainable_mask() -> None:
    tree, _ = _setup()
    mask = leaves_by_path(lora.trainable(tree))
    on = {p for p, m in mask.items() if m}
    expected = {f"lora/params/fc{i}/kernel/{f}" for i in (0, 1) for f in ("a", "b")}
    assert on == expected
    assert len(mask) == len(leaves_by_path(tree))
    on = {p for p, m in leaves_by_path(lora.trainable(tree, also="head")).items() if m}
    assert on == expected | {"params/params/head/kernel", "params/params/head/bias"}


def test_freeze_base_trains_only_the_adapters() -> None:
    tree, loss = _setup()
    tx = lora.freeze_base(optax.adamw(1e-2, weight_decay=0.1), tree)
    new, state = _train(tx, tree, loss, eager_steps=1)
    # every base leaf bit-identical (weight decay and a -0.0 included, eager steps and jitted)
    old_base, new_base = leaves_by_path(tree["params"]), leaves_by_path(new["params"])
    for path, leaf in old_base.items():
        assert new_base[path].dtype == leaf.dtype
        np.testing.assert_array_equal(_bits(new_base[path]), _bits(leaf), err_msg=path)
    # every adapter leaf moved, and the loss went down
    old_ad, new_ad = adapter_entries(tree["lora"]), adapter_entries(new["lora"])
    for path, w in old_ad.items():
        for f in ("a", "b"):
            assert not np.array_equal(getattr(new_ad[path], f), getattr(w, f)), (path, f)
        assert new_ad[path].scale == w.scale and new_ad[path].in_axes == w.in_axes
    assert float(loss(new)) < float(loss(tree))
    # the optimizer state holds exactly adam's mu and nu for each adapter array
    assert _array_shapes(state) == _twice(tree["lora"])


def test_freeze_base_also_trains_the_head() -> None:
    tree, loss = _setup()
    tx = lora.freeze_base(optax.adamw(1e-2), tree, also="head")
    new, state = _train(tx, tree, loss)
    old_base, new_base = leaves_by_path(tree["params"]), leaves_by_path(new["params"])
    for path, leaf in old_base.items():
        same = np.array_equal(_bits(new_base[path]), _bits(leaf))
        assert same == ("head" not in path), path
    assert _array_shapes(state) == _twice([tree["lora"], tree["params"]["params"]["head"]])


def test_adapters_only_pattern_trains_and_matches_the_joint_pattern() -> None:
    tree, loss = _setup()
    params = tree["params"]
    tx = optax.adamw(1e-2, weight_decay=0.1)
    adapters, state = _train(tx, tree["lora"], lambda ad: loss({"params": params, "lora": ad}))
    assert float(loss({"params": params, "lora": adapters})) < float(loss(tree))
    assert _array_shapes(state) == _twice(tree["lora"])
    # same gradients, same optimizer: the same adapters as with freeze_base on the joint tree
    joint, _ = _train(lora.freeze_base(tx, tree), tree, loss)
    got, want = adapter_entries(adapters), adapter_entries(joint["lora"])
    for path in want:
        np.testing.assert_allclose(got[path].a, want[path].a, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[path].b, want[path].b, rtol=1e-6, atol=1e-7)


def test_plain_optax_masked_would_pass_raw_gradients() -> None:
    tree, loss = _setup()
    grads = jax.grad(loss)(tree)
    base_grads = leaves_by_path(grads["params"])
    assert any(np.abs(g).max() > 0 for g in base_grads.values())
    # optax.masked leaves masked-out leaves' "updates" as the raw gradients...
    masked = optax.masked(optax.sgd(1.0), lora.trainable(tree))
    updates, _ = masked.update(grads, masked.init(tree), tree)
    for path, u in leaves_by_path(updates["params"]).items():
        np.testing.assert_array_equal(u, base_grads[path])
    # ...where freeze_base gives exact zeros
    frozen = lora.freeze_base(optax.sgd(1.0), tree)
    updates, _ = frozen.update(grads, frozen.init(tree), tree)
    for path, u in leaves_by_path(updates["params"]).items():
        assert not np.asarray(u).any(), path


def test_bf16_base_stays_bit_identical() -> None:
    tree, loss = _setup(also_bias_neg_zero=False)
    tree = {
        "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree["params"]),
        "lora": tree["lora"],
    }
    tx = lora.freeze_base(optax.adam(1e-2), tree)
    new, _ = _train(tx, tree, loss, steps=2)
    new_base = leaves_by_path(new["params"])
    for path, leaf in leaves_by_path(tree["params"]).items():
        assert new_base[path].dtype == jnp.bfloat16
        np.testing.assert_array_equal(_bits(new_base[path]), _bits(leaf), err_msg=path)
