"""Quickstart: LoRA-adapt a small Linen CNN from digits 0-4 to digits 5-9.

1. Train a small CNN (two ``nn.Conv`` + two ``nn.Dense``) on scikit-learn's 8x8 digits 0-4.
2. Freeze it. Add LoRA adapters to all its Conv and Dense kernels and train only the adapters
   on digits 5-9. The classifier head keeps its 5 outputs: digits 5-9 are relabelled 0-4
   (digit 5 -> class 0, ..., digit 9 -> class 4), so the same 5-way head serves both tasks.
3. Save the adapters with orbax, load them back, merge them into the base kernels, and check
   that the merged model predicts what the wrapped (base + adapters) model predicts.

Run:  python examples/quickstart.py    (15-40 s on a 2-core CPU)
Outputs: examples/out/quickstart_adapter/ (orbax checkpoint), examples/out/quickstart_loss.png
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
from flax import linen as nn

import flax_lora as lora


class CNN(nn.Module):
    """Two 3x3 convolutions, 2x2 average pooling, a hidden Dense layer and a 5-way head."""

    classes: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.classes)(x)


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

    # -- data: digits 0-4 for the base model, 5-9 (relabelled 0-4) for the adapter -------------
    base_data = digits(range(0, 5), seed=args.seed)
    new_data = digits(range(5, 10), seed=args.seed)
    print(
        f"digits 0-4: {len(base_data.x_train)} train / {len(base_data.x_test)} test; "
        f"digits 5-9 (labels 0-4): {len(new_data.x_train)} train / {len(new_data.x_test)} test"
    )

    # -- phase 1: train the base model on digits 0-4 (an ordinary Flax + optax loop) -----------
    model = CNN()
    params = model.init(jax.random.key(args.seed), base_data.x_train[:1])
    tx = optax.adam(args.lr)

    @jax.jit
    def base_step(carry, x, y):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), base_losses = fit(
        base_step,
        (params, tx.init(params)),
        base_data.x_train,
        base_data.y_train,
        args.base_steps,
        args.batch_size,
        args.seed,
        "base 0-4",
    )
    predict = jax.jit(model.apply)
    base_acc_04 = accuracy(predict(params, base_data.x_test), base_data.y_test)
    base_acc_59 = accuracy(predict(params, new_data.x_test), new_data.y_test)
    print(f"base model, held-out digits 0-4: {base_acc_04:.2%}")
    print(f"base model, held-out digits 5-9 (before adaptation): {base_acc_59:.2%}")

    # -- phase 2: freeze the base, LoRA-adapt every Conv and Dense kernel to digits 5-9 --------
    config = lora.LoraConfig(rank=args.rank, alpha=args.alpha)  # targets=None: every kernel
    x_sample = new_data.x_train[:1]
    # Conv kernels are 4-D (3, 3, in, out): the probe, traced abstractly, tells which axes are
    # input axes (3 x 3 x in) and which are output axes (out).
    adapters = lora.init(
        jax.random.key(args.seed + 1),
        params,
        config,
        probe=lambda p: model.apply(p, x_sample),
    )
    lora.summary(params, adapters)

    apply = lora.wrap(model.apply)  # apply(params, adapters, x) = model with W0 + scale * a @ b
    lora_tx = optax.adam(args.lr)  # the optimizer sees the adapters only

    @functools.partial(jax.jit, donate_argnums=0)
    def lora_step(carry, params, x, y):
        adapters, opt_state = carry
        # Gradients w.r.t. the adapters only: the base params are a constant input.
        loss, grads = jax.value_and_grad(lambda ad: cross_entropy(apply(params, ad, x), y))(
            adapters
        )
        updates, opt_state = lora_tx.update(grads, opt_state, adapters)
        return (optax.apply_updates(adapters, updates), opt_state), loss

    (adapters, _), lora_losses = fit(
        lambda carry, x, y: lora_step(carry, params, x, y),
        (adapters, lora_tx.init(adapters)),
        new_data.x_train,
        new_data.y_train,
        args.lora_steps,
        args.batch_size,
        args.seed + 1,
        "LoRA 5-9",
    )
    adapted = jax.jit(apply)
    lora_acc_59 = accuracy(adapted(params, adapters, new_data.x_test), new_data.y_test)
    base_acc_04_after = accuracy(adapted(params, None, base_data.x_test), base_data.y_test)
    print(
        f"adapted model, held-out digits 5-9: {base_acc_59:.2%} before -> {lora_acc_59:.2%} after"
    )
    print(
        f"base model (adapters=None), held-out digits 0-4: {base_acc_04:.2%} before, "
        f"{base_acc_04_after:.2%} after (the base params were never updated)"
    )
    assert base_acc_04_after == base_acc_04

    # -- save the adapters with orbax, load them back, merge --------------------------------------
    ckpt = args.out / "quickstart_adapter"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    lora.save(ckpt, adapters, config)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    print(f"saved adapters to {ckpt} ({size / 1024:.1f} KiB on disk)")
    loaded = lora.load(ckpt)
    same = jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), adapters, loaded)
    assert all(jax.tree.leaves(same)), "the loaded adapters differ from the saved ones"
    assert lora.load_config(ckpt) == config

    merged = jax.jit(lora.merge)(params, loaded)  # W = W0 + scale * a @ b: a plain params tree
    y_merged = predict(merged, new_data.x_test)  # the plain model, zero added latency
    y_wrapped = adapted(params, adapters, new_data.x_test)
    diff = float(jnp.max(jnp.abs(y_merged - y_wrapped)))
    agree = float(np.mean(np.argmax(y_merged, -1) == np.argmax(y_wrapped, -1)))
    print(
        f"merged (from the reloaded checkpoint) vs wrapped logits: max |diff| = {diff:.2e}, "
        f"same predicted class on {agree:.2%} of held-out 5-9"
    )
    assert diff < 1e-4, diff
    print(f"merged model, held-out digits 5-9: {accuracy(y_merged, new_data.y_test):.2%}")

    png = plot_losses(
        {"phase 1: base on digits 0-4": base_losses, "phase 2: LoRA on digits 5-9": lora_losses},
        args.out / "quickstart_loss.png",
        f"flax_lora quickstart (rank {args.rank})",
    )
    print(f"loss curves: {png}")
    print(f"total time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
