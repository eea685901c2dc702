"""Data- and model-parallel LoRA training of the benchmark decoder on a 2x4 device mesh.

The mesh has a ``data`` axis (2: the batch is split) and a ``model`` axis (4: Megatron-style
tensor parallelism; q/k/v and fc1 split their output features, out and fc2 their input
features). The base params are created sharded, `lora.init` gives each adapter factor the
sharding of its kernel's axes (``a`` <- input axes, ``b`` <- output axes), a few jitted
training steps run on the mesh, and the merged model is then served by a `jax.jit` with the
kernels' shardings as ``in_shardings``.

On this CPU, 8 devices are simulated with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(set below, before jax is imported). On a TPU slice or a multi-GPU host, drop that line: the
mesh is built from ``jax.devices()`` the same way (see the README's "Sharding" section).

Run:
  python examples/sharded.py            # the benchmark decoder (6 blocks, d512)
  python examples/sharded.py --small    # a smaller decoder, for a quick look
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import collections
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax_lora as lora
from benchmarks.decoder import TARGETS, Decoder, loss_fn, make_batch


def param_spec(path: str, ndim: int) -> P:
    """Megatron-style model parallelism over 'model'; everything else replicated."""
    parts = path.split("/")
    name, leaf = (parts[-2], parts[-1]) if len(parts) > 1 else ("", parts[-1])
    rules = {
        ("query", "kernel"): P(None, "model", None),  # (d, heads, head_dim): split heads
        ("key", "kernel"): P(None, "model", None),
        ("value", "kernel"): P(None, "model", None),
        ("query", "bias"): P("model", None),
        ("key", "bias"): P("model", None),
        ("value", "bias"): P("model", None),
        ("out", "kernel"): P("model", None, None),  # (heads, head_dim, d)
        ("fc1", "kernel"): P(None, "model"),
        ("fc1", "bias"): P("model"),
        ("fc2", "kernel"): P("model", None),
        ("embed", "embedding"): P(None, "model"),
    }
    return rules.get((name, leaf), P(*([None] * ndim)))


def _path(kp: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)


def shardings_of(tree: Any, mesh: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(mesh, param_spec(_path(kp), len(x.shape))), tree
    )


def all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    shapes = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", hlo)
    return [tuple(int(d) for d in s.split(",") if d) for s in shapes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="a 2-block d128 decoder")
    args = parser.parse_args()
    t_start = time.perf_counter()

    devices = jax.devices()
    # GSPMD-style ("auto") mesh axes: jit propagates the shardings of the inputs
    mesh = Mesh(np.array(devices).reshape(2, -1), ("data", "model"))
    print(f"{len(devices)} {devices[0].platform} devices, mesh {dict(mesh.shape)}")

    if args.small:
        model = Decoder(vocab=1024, d_model=128, heads=4, hidden=512, layers=2)
    else:
        model = Decoder()  # the benchmark decoder: 6 blocks, d512, vocab 8192
    batch = make_batch(jax.random.key(0), batch=8, seq=128, vocab=model.vocab)
    data = NamedSharding(mesh, P("data", None))
    batch = jax.device_put(batch, data)

    # the base params are born sharded: no device ever holds a whole model-parallel kernel
    abstract = jax.eval_shape(model.init, jax.random.key(1), batch["tokens"])
    param_shardings = shardings_of(abstract, mesh)
    params = jax.jit(model.init, out_shardings=param_shardings)(jax.random.key(1), batch["tokens"])

    config = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    adapters = lora.init(
        jax.random.key(2), params, config, probe=lambda p: model.apply(p, batch["tokens"])
    )
    s = lora.summary(params, adapters, show=False)
    print(
        f"{len(s.rows)} adapted kernels, trainable {s.trainable_params:,} of "
        f"{s.total_params:,} params ({100 * s.trainable_fraction:.2f}%)"
    )
    is_entry = lambda x: isinstance(x, lora.LoraWeights)
    table = {
        _path(kp): w
        for kp, w in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_entry)[0]
    }
    kernels = {_path(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    print("kernel -> factor shardings (a <- input axes, b <- output axes, rank unsharded):")
    for path in [p for p in table if p.startswith("params/h0/")]:
        w = table[path]
        print(
            f"  {path:28s} {kernels[path].sharding.spec!s:28s} "
            f"a {w.a.sharding.spec!s:24s} b {w.b.sharding.spec}"
        )

    # training: grads w.r.t. the adapters only; new adapters and optimizer state pinned to the
    # shardings lora.init gave them (else XLA picks output shardings of its own)
    tx = optax.adamw(2e-3)
    opt = tx.init(adapters)
    replicated = NamedSharding(mesh, P())
    pin = lambda t: jax.tree.map(lambda x: x.sharding if x.ndim else replicated, t)
    fn = lora.wrap(model.apply)  # mode "auto": factored, no kernel is ever merged

    def train_step(ad: Any, opt: Any, params: Any, batch: Any) -> Any:
        loss, grads = jax.value_and_grad(lambda a: loss_fn(fn, params, batch, a))(ad)
        updates, opt = tx.update(grads, opt, ad)
        return optax.apply_updates(ad, updates), opt, loss

    step = jax.jit(train_step, out_shardings=(pin(adapters), pin(opt), replicated))
    t0 = time.perf_counter()
    compiled = step.lower(adapters, opt, params, batch).compile()
    print(f"compiled the training step in {time.perf_counter() - t0:.1f} s")

    # what the step moves between devices beyond what the base model's own forward and
    # backward pass does (backprop to the activations, the floor of any LoRA step)
    def base_step(params: Any, batch: Any, offset: Any) -> Any:
        return jax.grad(lambda o: loss_fn(lambda p, t: model.apply(p, t, o), params, batch))(offset)

    offset = jax.device_put(
        jnp.zeros((*batch["tokens"].shape, model.d_model)), NamedSharding(mesh, P("data"))
    )
    base_hlo = jax.jit(base_step).lower(params, batch, offset).compile().as_text()
    extra = collections.Counter(all_gather_shapes(compiled.as_text()))
    extra.subtract(collections.Counter(all_gather_shapes(base_hlo)))
    extra = {s: n for s, n in extra.items() if n > 0}
    shard = min(int(np.prod(kernels[p].sharding.shard_shape(kernels[p].shape))) for p in table)
    largest = max([int(np.prod(s)) for s in extra] or [0])
    print(
        f"all-gathers beyond the base model's own: {sum(extra.values())} of shapes "
        f"{sorted(extra)} (LoRA factors); largest {largest:,} elements, vs {shard:,} in the "
        f"smallest shard of a base kernel: no base kernel is gathered: {largest < shard}"
    )
    losses, times = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        adapters, opt, loss = compiled(adapters, opt, params, batch)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        print(f"step {i}: loss {loss:.4f} ({times[-1] * 1e3:.0f} ms)")
    print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
    kept = all(
        x.sharding.is_equivalent_to(y, x.ndim)
        for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(pin(adapters)), strict=True)
    )
    print(f"adapter shardings kept through training: {kept}")

    # merged inference, jitted with the kernels' shardings
    merged = jax.jit(lora.merge, out_shardings=param_shardings)(params, adapters)
    same = all(
        m.sharding.is_equivalent_to(k.sharding, m.ndim)
        for m, k in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True)
    )
    print(f"merged params keep every kernel's sharding: {same}")
    infer = jax.jit(
        model.apply,
        in_shardings=(param_shardings, data),
        out_shardings=NamedSharding(mesh, P("data")),
    )
    logits = infer(merged, batch["tokens"])
    wrapped = jax.jit(fn)(params, adapters, batch["tokens"])
    base = infer(params, batch["tokens"])
    diff = float(jnp.max(jnp.abs(logits - wrapped)))
    moved = float(jnp.max(jnp.abs(logits - base)))
    print(f"logits {logits.shape}, sharding {logits.sharding.spec}")
    print(f"merged vs wrapped (factored) logits: max |diff| {diff:.2e}")
    print(f"merged vs base logits (what training changed): max |diff| {moved:.2e}")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
