"""Task switching: one base, a dict of adapter sets, the task chosen per call."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_lora as lora


def test_two_tasks_trained_interleaved_in_one_jitted_step(tmp_path: Path) -> None:
    model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (64, 8))
    params = model.init(jax.random.key(1), x)
    # two regression tasks the base does not solve
    targets = {
        "a": jnp.sin(x[:, :4] * 2.0),
        "b": jnp.cos(x[:, 4:] - 1.0),
    }
    config = lora.LoraConfig(rank=4, alpha=8.0)
    tasks = {t: lora.init(jax.random.key(2 + i), params, config) for i, t in enumerate(targets)}
    tx = optax.adam(3e-2)
    states = {t: tx.init(ad) for t, ad in tasks.items()}
    apply = lora.wrap(model.apply)
    traces = []

    @jax.jit
    def step(adapters, opt_state, x, y):
        traces.append(1)
        loss_fn = lambda ad: jnp.mean((apply(params, ad, x) - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(adapters, updates), opt_state, loss

    base_loss = {t: float(jnp.mean((model.apply(params, x) - y) ** 2)) for t, y in targets.items()}
    losses: dict[str, list[float]] = {t: [] for t in targets}
    for _ in range(60):
        for t in ("a", "b"):  # interleaved
            tasks[t], states[t], loss = step(tasks[t], states[t], x, targets[t])
            losses[t].append(float(loss))
    assert len(traces) == 1  # one compilation serves both tasks
    for t in targets:
        assert losses[t][-1] < 0.5 * base_loss[t], (t, base_loss[t], losses[t][-1])
    # each task's adapters serve their own task, not the other's
    err = lambda t, u: float(jnp.mean((apply(params, tasks[t], x) - targets[u]) ** 2))
    assert err("a", "a") < err("b", "a") and err("b", "b") < err("a", "b")

    # each task saved and loaded alone, exactly
    for t, ad in tasks.items():
        lora.save(tmp_path / t, ad, config)
    for t, ad in tasks.items():
        back = lora.load(tmp_path / t)
        for u, v in zip(jax.tree.leaves(ad), jax.tree.leaves(back), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        assert lora.load_config(tmp_path / t) == config
