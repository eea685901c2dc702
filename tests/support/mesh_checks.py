"""Checks that need 8 devices, run by tests/test_sharding.py in a subprocess
(``python -m support.mesh_checks``, with the repository root and tests/ on ``PYTHONPATH``).

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set here, before jax is imported, so
the CPU backend has 8 devices. The results (computed values only) are printed as one JSON line.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_lora as lora
from benchmarks.decoder import TARGETS, Decoder, loss_fn, make_batch

from .mlp_stack import Stack

# the kernels' input axes, by hand (Flax's layouts): q/k/v (d, heads, hd) contract d;
# out (heads, hd, d) contracts heads and hd; fc1/fc2 (in, out) contract in
IN_AXES = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1), "fc1": (0,), "fc2": (0,)}


def spec_for(path: str, ndim: int) -> P:
    """Megatron-style model parallelism over 'model'; the rest replicated."""
    name = path.split("/")[-2]
    leaf = path.split("/")[-1]
    if leaf == "kernel" and name in ("query", "key", "value"):
        return P(None, "model", None)
    if leaf == "kernel" and name == "out":
        return P("model", None, None)
    if leaf == "kernel" and name == "fc1":
        return P(None, "model")
    if leaf == "bias" and name == "fc1":
        return P("model")
    if leaf == "kernel" and name == "fc2":
        return P("model", None)
    if leaf == "embedding":
        return P(None, "model")
    return P(*([None] * ndim))


def path_of(kp: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)


def shard_params(params: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.device_put(x, NamedSharding(mesh, spec_for(path_of(kp), x.ndim))), params
    )


def norm_spec(spec: Any, ndim: int) -> list:
    s = list(spec) + [None] * (ndim - len(tuple(spec)))
    return [x if x is None or isinstance(x, str) else list(x) for x in s]


def all_gathers(hlo: str) -> list[list[int]]:
    """The result shapes of the all-gather ops of an optimized HLO module."""
    out = []
    for m in re.finditer(r"= (\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", hlo):
        out.append([int(d) for d in m.group(2).split(",") if d])
    return out


def main() -> None:
    res: dict[str, Any] = {"devices": len(jax.devices())}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    model = Decoder(vocab=256, d_model=64, heads=4, hidden=128, layers=2)
    batch = make_batch(jax.random.key(0), batch=4, seq=16, vocab=256)
    params = jax.jit(model.init)(jax.random.key(1), batch["tokens"])
    sharded = shard_params(params, mesh)
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, init="random")
    probe = lambda p: model.apply(p, batch["tokens"])
    adapters = lora.init(jax.random.key(2), sharded, config, probe=probe)

    # 1. adapter shardings vs the kernels' (a <- input axes, b <- output axes, rank unsharded)
    kernels = {path_of(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
    rows = {}
    for kp, w in jax.tree_util.tree_flatten_with_path(
        adapters, is_leaf=lambda x: hasattr(x, "a") and hasattr(x, "b")
    )[0]:
        path = path_of(kp)
        k = kernels[path]
        kspec = norm_spec(k.sharding.spec, k.ndim)
        ins = IN_AXES[path.split("/")[-2]]
        outs = [i for i in range(k.ndim) if i not in ins]
        rows[path] = dict(
            a=norm_spec(w.a.sharding.spec, w.a.ndim),
            b=norm_spec(w.b.sharding.spec, w.b.ndim),
            want_a=[kspec[i] for i in ins] + [None],
            want_b=[None] + [kspec[i] for i in outs],
            a_named=isinstance(w.a.sharding, NamedSharding),
            b_named=isinstance(w.b.sharding, NamedSharding),
        )
    res["init"] = rows

    # 2. merge / unmerge keep each kernel's sharding, eagerly and under jit
    def kept(tree: Any) -> dict[str, bool]:
        flat = {path_of(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        return {
            p: bool(
                isinstance(flat[p].sharding, NamedSharding)
                and flat[p].sharding.is_equivalent_to(kernels[p].sharding, flat[p].ndim)
            )
            for p in rows
        }

    merged = lora.merge(sharded, adapters)
    res["merge_eager"] = kept(merged)
    res["unmerge_eager"] = kept(lora.unmerge(merged, adapters))
    res["merge_jit"] = kept(jax.jit(lora.merge)(sharded, adapters))
    res["unmerge_jit"] = kept(jax.jit(lora.unmerge)(merged, adapters))

    # 3. a training step on the mesh == on one device
    tx = optax.adam(1e-2)
    data_sharding = NamedSharding(mesh, P("data", None))

    def make_step(mode: str, pinned: bool) -> Any:
        fn = lora.wrap(model.apply, mode=mode)

        def step(ad: Any, opt: Any, p: Any, b: Any) -> Any:
            loss, g = jax.value_and_grad(lambda a: loss_fn(fn, p, b, a))(ad)
            upd, opt = tx.update(g, opt, ad)
            return optax.apply_updates(ad, upd), opt, loss

        if not pinned:
            return jax.jit(step)
        # the recipe for a training loop: pin the new adapters (and optimizer state) to the
        # shardings lora.init gave them, or XLA picks output shardings of its own
        replicated = NamedSharding(mesh, P())
        shardings = lambda t: jax.tree.map(lambda x: x.sharding if x.ndim else replicated, t)
        out = (shardings(adapters), shardings(tx.init(adapters)), None)
        return jax.jit(step, out_shardings=out)

    one = jax.devices()[0]
    to_one = lambda t: jax.device_put(t, one)
    sbatch = jax.device_put(batch, data_sharding)
    steps = {}
    for mode in ("auto", "factored", "merged"):
        step, step_mesh = make_step(mode, False), make_step(mode, True)
        ad1, opt1 = to_one(adapters), tx.init(to_one(adapters))
        adm, optm = adapters, tx.init(adapters)
        p1, b1 = to_one(params), to_one(batch)
        losses1, lossesm = [], []
        for _ in range(3):
            ad1, opt1, l1 = step(ad1, opt1, p1, b1)
            adm, optm, lm = step_mesh(adm, optm, sharded, sbatch)
            losses1.append(float(l1))
            lossesm.append(float(lm))
        diffs = jax.tree.map(
            lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), ad1, adm
        )
        moved = jax.tree.map(
            lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), adapters, adm
        )
        same_sharding = jax.tree.map(
            lambda x, y: bool(x.sharding.is_equivalent_to(y.sharding, x.ndim)), adapters, adm
        )
        steps[mode] = dict(
            loss_one=losses1,
            loss_mesh=lossesm,
            max_update_diff=max(jax.tree.leaves(diffs)),
            min_update=min(jax.tree.leaves(moved)),
            adapter_shardings_kept=all(jax.tree.leaves(same_sharding)),
        )
    res["steps"] = steps

    # 4. compiled HLO: all-gathers of the LoRA step vs the base model's own step
    def hlo(fn: Any, *args: Any) -> str:
        return jax.jit(fn).lower(*args).compile().as_text()

    base_step = lambda p, b: jax.grad(lambda q: loss_fn(model.apply, q, b))(p)
    base_fwd_bwd = lambda p, b, off: jax.grad(
        lambda o: loss_fn(lambda q, t: model.apply(q, t, o), p, b)
    )(off)

    def lora_step(mode: str) -> Any:
        fn = lora.wrap(model.apply, mode=mode)
        return lambda ad, p, b: jax.grad(lambda a: loss_fn(fn, p, b, a))(ad)

    kernel_sizes = sorted({int(np.prod(kernels[p].shape)) for p in rows})
    offset = jax.device_put(
        jnp.zeros((4, 16, 64), jnp.float32), NamedSharding(mesh, P("data", None, None))
    )
    gathers = {
        "base_full_step": all_gathers(hlo(base_step, sharded, sbatch)),
        "base_activation_step": all_gathers(hlo(base_fwd_bwd, sharded, sbatch, offset)),
    }
    for mode in ("factored", "auto", "merged"):
        gathers[mode] = all_gathers(hlo(lora_step(mode), adapters, sharded, sbatch))
    res["all_gathers"] = gathers
    res["kernel_sizes"] = kernel_sizes
    res["kernel_shard_sizes"] = sorted(
        {int(np.prod(kernels[p].sharding.shard_shape(kernels[p].shape))) for p in rows}
    )
    res["scan"] = scan_checks(mesh)
    print("RESULT " + json.dumps(res))


SCAN_SPECS = {
    "params/layers/fc1/kernel": P(None, None, "model"),
    "params/layers/fc1/bias": P(None, "model"),
    "params/layers/fc2/kernel": P(None, "model", None),
    "params/layers/fc2/bias": P(None, None),
}


def scan_checks(mesh: Mesh) -> dict[str, Any]:
    """A scan-stacked MLP (kernels (3, in, out)), model-parallel on the mesh."""
    model = Stack(16, 32, head=None)
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)
    sharded = jax.tree_util.tree_map_with_path(
        lambda kp, v: jax.device_put(v, NamedSharding(mesh, SCAN_SPECS[path_of(kp)])), params
    )
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    config = lora.LoraConfig(rank=2, init="random", layers=(0, 2))
    adapters = lora.init(jax.random.key(1), sharded, config, probe=lambda p: model.apply(p, x))
    out: dict[str, Any] = {}
    entries = {
        path_of(kp): w
        for kp, w in jax.tree_util.tree_flatten_with_path(
            adapters, is_leaf=lambda v: hasattr(v, "a") and hasattr(v, "b")
        )[0]
    }
    out["specs"] = {
        p: [norm_spec(w.a.sharding.spec, w.a.ndim), norm_spec(w.b.sharding.spec, w.b.ndim)]
        for p, w in entries.items()
    }
    kernels = {path_of(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(sharded)[0]}
    merged = {
        path_of(kp): v
        for kp, v in jax.tree_util.tree_flatten_with_path(lora.merge(sharded, adapters))[0]
    }
    out["merge_kept"] = all(
        merged[p].sharding.is_equivalent_to(kernels[p].sharding, merged[p].ndim) for p in entries
    )
    fn = lora.wrap(model.apply, mode="factored")
    loss = lambda ad, p, v: jnp.sum(jnp.sin(fn(p, ad, v)))
    grad = jax.jit(jax.value_and_grad(loss))
    one = jax.devices()[0]
    l1, g1 = grad(jax.device_put(adapters, one), jax.device_put(params, one), x)
    lm, gm = grad(adapters, sharded, xs)
    out["loss"] = [float(l1), float(lm)]
    out["grad_diff"] = max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(gm), strict=True)
    )
    out["grad_max"] = max(float(np.max(np.abs(np.asarray(u)))) for u in jax.tree.leaves(g1))
    base = lambda v, p: jnp.sum(jnp.sin(model.apply(p, v)))
    out["gathers_base"] = all_gathers(
        jax.jit(jax.grad(base)).lower(xs, sharded).compile().as_text()
    )
    out["gathers_factored"] = all_gathers(
        jax.jit(jax.grad(loss)).lower(adapters, sharded, xs).compile().as_text()
    )
    out["kernel_sizes"] = sorted({int(np.prod(kernels[p].shape)) for p in entries})
    out["layer_kernel_sizes"] = sorted({int(np.prod(kernels[p].shape[1:])) for p in entries})
    return out


if __name__ == "__main__":
    main()
