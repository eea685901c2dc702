"""The quickstart on a Flax NNX model: LoRA-adapt a CNN from digits 0-4 to digits 5-9.

1. Train an NNX CNN (two ``nnx.Conv`` + two ``nnx.Linear``) on scikit-learn's digits 0-4, the
   usual NNX way (``nnx.Optimizer``, ``nnx.jit``).
2. Split it into ``graphdef, state = nnx.split(model)``. The adapters live beside ``state``
   (paths like ``conv1/kernel``); ``apply(state, x) = nnx.merge(graphdef, state)(x)`` is a
   pure function of the state, so ``lora.wrap(apply)`` runs the model with its adapters. Only
   the adapters are trained, on digits 5-9 relabelled 0-4 (digit 5 -> class 0, ..., 9 -> 4),
   so the same 5-way head serves both tasks.
3. Save the adapters with orbax, load them back, and merge them into a plain NNX model with
   ``nnx.merge(graphdef, lora.merge(state, adapters))``; it predicts what the wrapped one does.

Run:  python examples/nnx.py    (20-50 s on a 2-core CPU)
Outputs: examples/out/nnx_adapter/ (orbax checkpoint), examples/out/nnx_loss.png
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import OUT, accuracy, digits, fit, plot_losses
from flax import nnx

import flax_lora as lora


class CNN(nnx.Module):
    """Two 3x3 convolutions, 2x2 average pooling, a hidden Linear layer and a 5-way head."""

    def __init__(self, rngs: nnx.Rngs, classes: int = 5) -> None:
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
        self.head = nnx.Linear(64, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.hidden(x))
        return self.head(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-steps", type=int, default=300, help="training steps on 0-4")
    parser.add_argument("--lora-steps", type=int, default=300, help="adapter steps on 5-9")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (scale = alpha/rank)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, both phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT, help="where the checkpoint and plot go")
    args = parser.parse_args()
    start = time.perf_counter()

    base_data = digits(range(0, 5), seed=args.seed)
    new_data = digits(range(5, 10), seed=args.seed)
    print(
        f"digits 0-4: {len(base_data.x_train)} train / {len(base_data.x_test)} test; "
        f"digits 5-9 (labels 0-4): {len(new_data.x_train)} train / {len(new_data.x_test)} test"
    )

    # -- phase 1: train the base model on digits 0-4, the usual NNX way -----------------------
    model = CNN(nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    @nnx.jit
    def base_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    def base_fit_step(carry, x, y):
        return carry, base_step(*carry, x, y)

    _, base_losses = fit(
        base_fit_step,
        (model, optimizer),
        base_data.x_train,
        base_data.y_train,
        args.base_steps,
        args.batch_size,
        args.seed,
        "base 0-4",
    )

    # -- phase 2: split the model; adapt its state with LoRA ----------------------------------
    graphdef, state = nnx.split(model)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # a pure function of the state
    predict = jax.jit(apply)
    base_acc_04 = accuracy(predict(state, base_data.x_test), base_data.y_test)
    base_acc_59 = accuracy(predict(state, new_data.x_test), new_data.y_test)
    print(f"base model, held-out digits 0-4: {base_acc_04:.2%}")
    print(f"base model, held-out digits 5-9 (before adaptation): {base_acc_59:.2%}")

    config = lora.LoraConfig(rank=args.rank, alpha=args.alpha)  # targets=None: every kernel
    x_sample = new_data.x_train[:1]
    adapters = lora.init(
        jax.random.key(args.seed + 1), state, config, probe=lambda s: apply(s, x_sample)
    )
    lora.summary(state, adapters)

    wrapped = lora.wrap(apply)  # wrapped(state, adapters, x)
    tx = optax.adam(args.lr)  # the optimizer sees the adapters only

    @functools.partial(jax.jit, donate_argnums=0)
    def lora_step(carry, state, x, y):
        adapters, opt_state = carry
        loss, grads = jax.value_and_grad(lambda ad: cross_entropy(wrapped(state, ad, x), y))(
            adapters
        )
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return (optax.apply_updates(adapters, updates), opt_state), loss

    (adapters, _), lora_losses = fit(
        lambda carry, x, y: lora_step(carry, state, x, y),
        (adapters, tx.init(adapters)),
        new_data.x_train,
        new_data.y_train,
        args.lora_steps,
        args.batch_size,
        args.seed + 1,
        "LoRA 5-9",
    )
    adapted = jax.jit(wrapped)
    lora_acc_59 = accuracy(adapted(state, adapters, new_data.x_test), new_data.y_test)
    base_acc_04_after = accuracy(adapted(state, None, base_data.x_test), base_data.y_test)
    print(
        f"adapted model, held-out digits 5-9: {base_acc_59:.2%} before -> {lora_acc_59:.2%} after"
    )
    print(
        f"base model (adapters=None), held-out digits 0-4: {base_acc_04:.2%} before, "
        f"{base_acc_04_after:.2%} after (the base state was never updated)"
    )
    assert base_acc_04_after == base_acc_04

    # -- save, load, merge back into an NNX model ---------------------------------------------
    ckpt = args.out / "nnx_adapter"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    lora.save(ckpt, adapters, config)
    loaded = lora.load(ckpt)
    same = jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), adapters, loaded)
    assert all(jax.tree.leaves(same)), "the loaded adapters differ from the saved ones"
    print(f"saved and reloaded adapters: {ckpt}")

    merged_model = nnx.merge(graphdef, lora.merge(state, loaded))  # a plain CNN instance
    y_merged = merged_model(new_data.x_test)
    y_wrapped = adapted(state, adapters, new_data.x_test)
    diff = float(jnp.max(jnp.abs(y_merged - y_wrapped)))
    print(f"merged nnx model vs wrapped logits: max |diff| = {diff:.2e}")
    assert diff < 1e-4, diff
    print(
        f"merged {type(merged_model).__name__}, held-out digits 5-9: "
        f"{accuracy(y_merged, new_data.y_test):.2%}"
    )

    png = plot_losses(
        {"phase 1: base on digits 0-4": base_losses, "phase 2: LoRA on digits 5-9": lora_losses},
        args.out / "nnx_loss.png",
        f"flax_lora on NNX (rank {args.rank})",
    )
    print(f"loss curves: {png}")
    print(f"total time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
