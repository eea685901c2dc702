"""LoRA dropout keys are explicit: each branch's mask comes from ``lora_rng`` folded with where
the branch is in the model (the equation's position; the layer index inside a scan), not from
how many masks were drawn before it (tests/test_factored.py checks the masks' statistics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import flax_lora as lora


def _two_layers(p: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def test_a_branch_mask_does_not_depend_on_masks_drawn_before_it() -> None:
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(rng.normal(size=(6, 6)), jnp.float32) for n in ("w1", "w2")}
    config = lora.LoraConfig(rank=2, init="random", dropout=0.5, targets="w1|w2")
    adapters = lora.init(jax.random.key(1), params, config)
    # w1's branch is zero whatever its mask (b = 0), so the output depends on w2's mask alone
    adapters["w1"] = adapters["w1"].replace(b=jnp.zeros_like(adapters["w1"].b))
    no_draw = dict(adapters, w1=adapters["w1"].replace(dropout=0.0))  # w1 draws no mask
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    fn = lora.wrap(_two_layers)
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(fn(params, adapters, x, lora_rng=key)),
        np.asarray(fn(params, no_draw, x, lora_rng=key)),
    )
    assert not np.allclose(fn(params, adapters, x, lora_rng=key), fn(params, adapters, x))
