"""One base model, several tasks: task switching, saving per task, combining, routed inference.

A small MLP is pretrained on the scikit-learn digits 0-4. Two LoRA adapter sets are then trained
on top of the frozen base, interleaved, by ONE jitted step function (the task is just which
adapter pytree is passed in, so nothing recompiles when the task changes):

  task "a": recognise the digits 5-9 (which the base never saw), same 10-way head;
  task "b": parity (even -> class 0, odd -> class 1) of all digits.

Then each task's adapters are saved and loaded alone (orbax), the two are merged into one with
`lora.combine`, and a mixed batch (task a, task b and base examples) runs in one call with each
example routed through its own adapter (id -1 = the base model).

Run: python examples/multi_task.py   (about a minute on a laptop CPU)
Writes examples/out/multi_task_loss.png and examples/out/adapters_{a,b}/.
"""

from __future__ import annotations

import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import flax_lora as lora

OUT = Path(__file__).parent / "out"
BATCH = 64


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def batches(x, y, key, steps):
    """An endless stream of random minibatches (fixed shape, so one compilation)."""
    for k in jax.random.split(key, steps):
        idx = np.asarray(jax.random.choice(k, len(x), (BATCH,), replace=False))
        yield x[idx], y[idx]


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(logits, y):
    return float((np.asarray(logits).argmax(-1) == np.asarray(y)).mean())


def main() -> None:
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x_all, y_all, test_size=0.3, random_state=0, stratify=y_all
    )
    # The three data sets: base (0-4), task a (5-9, labels = digit), task b (parity of all)
    low_tr, low_te = y_tr < 5, y_te < 5
    data = {
        "base": (x_tr[low_tr], y_tr[low_tr], x_te[low_te], y_te[low_te]),
        "a": (x_tr[~low_tr], y_tr[~low_tr], x_te[~low_te], y_te[~low_te]),
        "b": (x_tr, y_tr % 2, x_te, y_te % 2),
    }

    # ---- 1. pretrain the base on digits 0-4 -------------------------------------------------
    model = MLP()
    params = model.init(jax.random.key(0), x_tr[:1])
    tx_base = optax.adam(3e-3)

    @jax.jit
    def base_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, x), y))(params)
        updates, opt_state = tx_base.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx_base.init(params)
    base_losses = []
    xb_tr, yb_tr = data["base"][:2]
    for x, y in tqdm(batches(xb_tr, yb_tr, jax.random.key(1), 400), total=400, desc="base"):
        params, opt_state, loss = base_step(params, opt_state, x, y)
        base_losses.append(float(loss))

    # ---- 2. two adapter sets, trained interleaved by one jitted step ------------------------
    config = lora.LoraConfig(rank=8, alpha=16.0)
    tasks = {
        "a": lora.init(jax.random.key(2), params, config),
        "b": lora.init(jax.random.key(3), params, config),
    }
    lora.summary(params, tasks["a"])
    tx = optax.adam(1e-2)
    opt_states = {name: tx.init(ad) for name, ad in tasks.items()}
    fn = lora.wrap(model.apply)
    traces = {"step": 0}

    @jax.jit
    def step(adapters, opt_state, x, y):
        traces["step"] += 1  # runs only while tracing: counts compilations
        loss, grads = jax.value_and_grad(lambda ad: xent(fn(params, ad, x), y))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    steps = 300
    streams = {
        name: batches(data[name][0], data[name][1], jax.random.key(10 + i), steps)
        for i, name in enumerate(tasks)
    }
    losses = {name: [] for name in tasks}
    for _ in tqdm(range(steps), desc="tasks a+b (interleaved)"):
        for name in tasks:  # switch task every step: same step function, same compilation
            x, y = next(streams[name])
            tasks[name], opt_states[name], loss = step(tasks[name], opt_states[name], x, y)
            losses[name].append(float(loss))
    print(f"jitted step traced {traces['step']} time(s) for {2 * steps} steps over 2 tasks")

    # ---- 3. evaluate, save and load each task's adapters alone ------------------------------
    eval_fn = jax.jit(fn)

    def acc(adapters, task):
        x_te_, y_te_ = data[task][2:]
        return accuracy(eval_fn(params, adapters, x_te_), y_te_)

    print("\ntest accuracy        base   task a   task b")
    print(
        f"  base model        {acc(None, 'base'):.3f}  {acc(None, 'a'):.3f}    {acc(None, 'b'):.3f}"
    )
    for name, ad in tasks.items():
        print(
            f"  adapters {name!r}      {acc(ad, 'base'):.3f}  {acc(ad, 'a'):.3f}    "
            f"{acc(ad, 'b'):.3f}"
        )

    for name, ad in tasks.items():
        path = lora.save(OUT / f"adapters_{name}", ad, config)
        loaded = lora.load(path)
        same = all(
            np.array_equal(u, v)
            for u, v in zip(jax.tree.leaves(ad), jax.tree.leaves(loaded), strict=True)
        )
        print(f"saved task {name!r} alone to {path} and loaded it back: identical={same}, "
              f"task accuracy {acc(loaded, name):.3f}")  # fmt: skip

    # ---- 4. combine the two adapter sets into one ------------------------------------------
    print("\ncombined adapters (weights 1, 1)   task a   task b")
    for method, kw in [("cat", {}), ("svd", {"rank": 8}), ("linear", {})]:
        both = lora.combine([tasks["a"], tasks["b"]], [1.0, 1.0], method=method, **kw)
        rank = both["params"]["Dense_0"]["kernel"].rank
        print(f"  {method:<6} (rank {rank:>2})                {acc(both, 'a'):.3f}    "
              f"{acc(both, 'b'):.3f}")  # fmt: skip

    print("  (both tasks write to the same 10 logits with conflicting labels, so one merged")
    print("   adapter cannot serve both at once: serving both is what routing below is for)")

    # ---- 5. routed inference: one mixed batch, each example through its own adapter --------
    stacked = lora.stack([tasks["a"], tasks["b"]])
    n = 40
    groups = [("a", 0), ("b", 1), ("base", -1)]
    x_mix = np.concatenate([data[t][2][:n] for t, _ in groups])
    y_mix = np.concatenate([data[t][3][:n] for t, _ in groups])
    ids = np.repeat([i for _, i in groups], n)
    perm = np.random.default_rng(0).permutation(len(ids))  # interleave the tasks in the batch
    x_mix, y_mix, ids = x_mix[perm], y_mix[perm], ids[perm]
    routed = jax.jit(lora.wrap(model.apply))
    logits = routed(params, stacked, x_mix, lora_ids=jnp.asarray(ids))
    print(f"\nrouted mixed batch of {len(ids)} (ids {ids[:8].tolist()}...):")
    for task, i in groups:
        sel = ids == i
        alone = eval_fn(params, tasks[task] if i >= 0 else None, x_mix[sel])
        err = float(jnp.abs(logits[sel] - alone).max())
        print(f"  id {i:>2} ({task:<4}): accuracy {accuracy(logits[sel], y_mix[sel]):.3f}, "
              f"max |routed - alone| = {err:.2e}")  # fmt: skip

    # ---- 6. loss plot ----------------------------------------------------------------------
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(base_losses)
    ax[0].set(title="base pretraining (digits 0-4)", xlabel="step", ylabel="loss", yscale="log")
    for name, label in [("a", "task a: digits 5-9"), ("b", "task b: parity")]:
        ax[1].plot(losses[name], label=label)
    ax[1].set(title="LoRA adapters, interleaved", xlabel="step", yscale="log")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(OUT / "multi_task_loss.png", dpi=100)
    print(f"\nloss plot: {OUT / 'multi_task_loss.png'}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
