"""Expert-parallel placement of expert factors on a 2x4 ('data', 'model') mesh of 8 CPU devices,
run in a subprocess by tests/test_moe_sharding.py (``python -m support.moe_mesh_checks``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and the repository root and tests/ on
``PYTHONPATH``). Prints one line ``RESULT <json>``: the partition specs of the placed factors and
the largest differences between computations on the mesh and on one device.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_lora as lora
from support.internal import place_adapter
from support.moe_adapters import expert_adapters, nest
from support.moe_models import build, random_factors
from support.trees import adapter_entries, leaves_by_path

# kernel specs by role, for a block (no layer axis); a stacked kernel gets None in front
SPECS = {"w_in": ("model", None, "data"), "w_out": ("model", "data", None), "kernel": ()}


def _spec(path: str, ndim: int) -> P:
    role = path.rsplit("/", 1)[-1]
    spec = SPECS[role]
    return P(*((None,) * (ndim - 3) if spec else ()), *spec)


def _names(sharding: Any) -> list[Any]:
    return [s if s is None or isinstance(s, str) else list(s) for s in sharding.spec]


def _max_diff(x: Any, y: Any) -> float:
    return float(
        max(
            np.max(np.abs(np.asarray(a) - np.asarray(b)))
            for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
        )
    )


def check(stacked: bool, mesh: Mesh) -> dict[str, Any]:
    case = build("linen", "einsum", stacked=stacked)
    factors = random_factors(case)
    adapters = expert_adapters(case, factors)
    sharded = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.device_put(
            x, NamedSharding(mesh, _spec("/".join(str(k.key) for k in kp), x.ndim))
        ),
        case.params,
    )
    kernels = leaves_by_path(sharded)
    table = adapter_entries(adapters)
    placed = nest({p: place_adapter(w, kernels[p]) for p, w in table.items()})
    out: dict[str, Any] = {"specs": {}}
    for path, w in adapter_entries(placed).items():
        dora = place_adapter(w.replace(m=jnp.ones(w.b.shape[:-2] + w.b.shape[-1:])), kernels[path])
        out["specs"][path] = {
            "kernel": _names(kernels[path].sharding),
            "a": _names(w.a.sharding),
            "b": _names(w.b.sharding),
            "m": _names(dora.m.sharding),
            "a_shape": list(w.a.shape),
        }
    merge = jax.jit(lora.merge)
    merged_mesh, merged_one = merge(sharded, placed), merge(case.params, adapters)
    out["merge"] = _max_diff(merged_mesh, merged_one)
    out["merged_specs"] = {p: _names(x.sharding) for p, x in leaves_by_path(merged_mesh).items()}
    out["forward"] = _max_diff(
        jax.jit(case.apply)(merged_mesh, case.x), jax.jit(case.apply)(merged_one, case.x)
    )
    other = expert_adapters(case, random_factors(case, seed=9))
    out["combine"] = _max_diff(
        lora.combine([placed, other], [0.5, 0.5], "cat"),
        lora.combine([adapters, other], [0.5, 0.5], "cat"),
    )
    return out


def main() -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    res = {"devices": len(jax.devices()), "block": check(False, mesh), "stack": check(True, mesh)}
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
