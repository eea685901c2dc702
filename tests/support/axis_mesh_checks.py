"""Checks on 8 devices of the layered models whose kernels hold their layer axis second
(MaxText's ``param_scan_axis: 1``, tests/support/axis_models.py), run by
tests/test_layered_axis.py in a subprocess (``python -m support.axis_mesh_checks``).

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set here, before jax is imported. The
kernels are sharded Megatron-style over 'model' on a 2x4 ('data', 'model') mesh, the batch over
'data'; the results (computed values only) are printed as one JSON line.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_lora as lora

from .axis_models import X, axis_model
from .trees import adapter_entries, leaves_by_path

# the stored kernels' specs, by hand: (d, L, H, K) q split on K, (H, L, K, d) out on K,
# (d, L, F) wi on F, (F, L, d) wo on F; the layer axis (3 layers) is never split
SPECS = {
    "params/layers/query/kernel": P(None, None, None, "model"),
    "params/layers/out/kernel": P(None, None, "model", None),
    "params/layers/wi/kernel": P(None, None, "model"),
    "params/layers/wo/kernel": P("model", None, None),
}
# the factors' specs that follow from them, by hand: a (L, *I, r), b (L, r, *O)
WANT = {
    "params/layers/query/kernel": ([None, None, None], [None, None, None, "model"]),
    "params/layers/out/kernel": ([None, None, "model", None], [None, None, None]),
    "params/layers/wi/kernel": ([None, None, None], [None, None, "model"]),
    "params/layers/wo/kernel": ([None, "model", None], [None, None, None]),
}


def spec_list(x: Any) -> list[Any]:
    spec = tuple(x.sharding.spec)
    return [*spec, *([None] * (x.ndim - len(spec)))]


def main() -> None:
    res: dict[str, Any] = {"devices": len(jax.devices())}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    apply, params = axis_model("linen")
    placed = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.device_put(
            x,
            NamedSharding(
                mesh,
                SPECS.get(
                    "/".join(str(getattr(k, "key", k)) for k in kp), P(*([None] * np.ndim(x)))
                ),
            ),
        ),
        params,
    )
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    probe = lambda p: apply(p, X)
    adapters = lora.init(jax.random.key(2), placed, config, probe=probe)
    one = lora.init(jax.random.key(2), params, config, probe=probe)  # the same, one device
    res["init"] = {
        path: {
            "a": spec_list(w.a),
            "b": spec_list(w.b),
            "want": WANT[path],
            "same": bool(np.array_equal(np.asarray(w.a), np.asarray(adapter_entries(one)[path].a))),
        }
        for path, w in adapter_entries(adapters).items()
        if path in WANT
    }
    merged = leaves_by_path(jax.jit(lora.merge)(placed, adapters))
    res["merge_keeps"] = {
        p: bool(merged[p].sharding.is_equivalent_to(x.sharding, x.ndim))
        for p, x in leaves_by_path(placed).items()
        if p in SPECS
    }
    x_mesh = jax.device_put(X, NamedSharding(mesh, P("data", None, None)))
    target = np.random.default_rng(3).normal(size=np.shape(apply(params, X)))
    res["steps"] = {}
    for mode in ("merged", "factored", "auto"):
        run = lora.wrap(apply, mode=mode)
        loss = lambda ad, p, x, run=run: jnp.mean((run(p, ad, x) - target) ** 2)
        step = jax.jit(jax.value_and_grad(loss))
        l_mesh, g_mesh = step(adapters, placed, x_mesh)
        l_one, g_one = step(one, params, X)
        diffs = [
            float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
            for u, v in zip(jax.tree.leaves(g_mesh), jax.tree.leaves(g_one), strict=True)
        ]
        res["steps"][mode] = {
            "loss_mesh": float(l_mesh),
            "loss_one": float(l_one),
            "max_grad_diff": max(diffs),
            "min_grad": min(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(g_one)),
        }
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
